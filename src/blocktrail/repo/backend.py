"""The backend contract: what the repository asks of the storage under it (docs/storage.md).

A backend holds named objects (borgstore is the model): ``create`` (create-only: an object is
written whole or not at all, and never over another), ``replace`` (conditional overwrite, only of
the version the caller read: for leases), ``load`` (whole or a byte range), ``info``, ``list`` (by
prefix), ``delete``, and ``now`` (the store's own clock). Errors are typed: an object that exists,
one that is missing, a precondition that no longer holds, a store that cannot be reached (after
retries), credentials refused. Every name is checked by `check_name` before it reaches a backend.

Two backends implement it: a local directory (repo/localdir.py) and S3 (repo/s3.py); one test
suite runs against both (tests/unit/repo/test_backend_contract.py).
"""

from __future__ import annotations

import builtins
import re
from dataclasses import dataclass
from typing import Protocol

from blocktrail.errors import BlocktrailError, ExitCode

_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


class BackendError(BlocktrailError):
    """A storage operation failed (the message names the object and the store)."""

    exit_code = ExitCode.IO_FAILURE


class ObjectExists(BackendError):
    """A create-only write found the name taken."""

    exit_code = ExitCode.NOT_FOUND_OR_EXISTS


class ObjectNotFound(BackendError):
    """No object of that name."""

    exit_code = ExitCode.NOT_FOUND_OR_EXISTS


class BucketNotFound(BackendError):
    """The S3 bucket that should hold the repository does not exist."""

    exit_code = ExitCode.NOT_FOUND_OR_EXISTS


class PreconditionFailed(BackendError):
    """A conditional replace or delete found another version than the one it was given."""

    exit_code = ExitCode.BUSY


class BackendUnavailable(BackendError):
    """The store did not answer (or answered with server errors) through every retry."""

    exit_code = ExitCode.UNREACHABLE


class BackendDenied(BackendError):
    """The store refused the credentials, or the access."""

    exit_code = ExitCode.UNAUTHORIZED


class BackendReadOnly(BackendError):
    """The store may be read but not written: a read-only file system, or files and
    directories this user may not write. (S3 credentials that may only read are refused as
    `BackendDenied`.)"""


class BackendUnsupported(BackendError):
    """The store lacks a guarantee the repository relies on (create-only writes)."""

    exit_code = ExitCode.FORMAT


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One stored object. ``modified`` and ``observed`` are the store's clock (seconds since the
    epoch): when the object was last written, and when this answer was given. Lease expiry
    compares the two, so no client clock is involved."""

    name: str
    size: int
    modified: float
    etag: str
    observed: float = 0.0


class Releasable(Protocol):
    def release(self) -> None: ...


class Backend(Protocol):
    """Named objects. Names are ``/``-separated segments (see `check_name`)."""

    url: str
    remote: bool  # requests cost round trips: read ahead further, write in parallel
    host_locks: bool  # has `host_lock` (a lock among the processes of one machine)

    def create(self, name: str, data: bytes | bytearray | memoryview) -> ObjectInfo:
        """Write a new object whole; `ObjectExists` if the name is taken (an identical object
        left by a retried request of this same write counts as written)."""
        ...

    def replace(self, name: str, data: bytes, etag: str) -> ObjectInfo:
        """Overwrite ``name`` only if its version is still ``etag``; else `PreconditionFailed`
        (also when it is gone). An object of the same bytes left by a retried request of this
        same write counts as written."""
        ...

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """The object's bytes (``length`` from ``offset``; fewer at its end); else
        `ObjectNotFound` (also for a ``length`` of 0)."""
        ...

    def info(self, name: str) -> ObjectInfo: ...

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object whose name starts with ``prefix`` (a directory: ends in ``/``), in name
        order."""
        ...

    def delete(self, name: str, etag: str | None = None) -> None:
        """Delete ``name`` (gone already, with or without ``etag``: nothing to do). With
        ``etag``: only that version, else `PreconditionFailed`."""
        ...

    def now(self) -> float:
        """The store's clock now."""
        ...

    def leftovers(self) -> builtins.list[str]:
        """What interrupted writes left behind (a local directory's ``*.tmp`` files), relative
        to the repository; never read as objects."""
        ...

    def delete_leftovers(self) -> int:
        """Delete them; safe while other writers run. -> how many."""
        ...

    def host_lock(self, *, exclusive: bool, wait: bool) -> Releasable | None:
        """With ``host_locks``: a lock shared by the writers on this machine, or exclusive;
        None when ``wait`` is false and it is held the other way."""
        ...

    def close(self) -> None: ...


def check_name(name: str) -> str:
    """A valid object name or `InvalidObjectName`: segments of ``A-Z a-z 0-9 . _ -``, each
    starting with a letter, digit or ``_``, at most 128 characters; no empty segment, no ``.``
    or ``..``, no leading or trailing ``/``; at most 512 characters."""
    if len(name) > 512 or not all(_SEGMENT.fullmatch(s) for s in name.split("/")):
        raise InvalidObjectName(f"invalid object name {name!r}")
    return name


class InvalidObjectName(BackendError):
    exit_code = ExitCode.USAGE
