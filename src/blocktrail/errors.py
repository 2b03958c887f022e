"""The typed errors users see, and the exit codes the CLI maps them to (the one table).

Every error carries the message a user needs to act and its exit code. Lower layers raise these;
the CLI translates them to exit codes in one place (`cli/main.py`).
"""

from __future__ import annotations

import errno
from enum import IntEnum


class ExitCode(IntEnum):
    """Every exit code the `blocktrail` command uses (README, "Exit codes")."""

    OK = 0
    INTERNAL = 1  # a bug: an error blocktrail did not expect (one line, never a traceback)
    USAGE = 2  # a bad argument or option
    OUT_OF_RANGE = 3
    CHANGE_ID_REFUSED = 4  # stale or invalid: take a full backup
    SNAPSHOT_OR_POINT = 5  # a snapshot or restore point not found / already there
    NOT_FOUND_OR_EXISTS = 6  # a disk, VM or repository not found / already there
    BUSY = 7  # a disk or repository in use by another process
    FORMAT = 8  # unsupported or corrupt format
    UNAUTHORIZED = 9
    UNREACHABLE = 10  # a host or NBD server does not answer
    IO_FAILURE = 11
    REPOSITORY_DAMAGED = 12
    VERIFY_DIFFERENCES = 13
    NBD = 14  # an NBD protocol, TLS or connection failure
    NO_SPACE = 15  # a file system (or quota) is full
    AUTHENTICATION_FAILED = 16  # an encrypted repository's object was altered (or another key)
    INTERRUPTED = 130


class BlocktrailError(Exception):
    """Base of every error blocktrail raises on purpose."""

    exit_code: int = ExitCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(BlocktrailError):
    """A caller passed a value that can never be right (bad size, bad name, ...)."""

    exit_code = ExitCode.USAGE


class OutOfRange(BlocktrailError):
    """An offset or length lies outside the disk."""

    exit_code = ExitCode.OUT_OF_RANGE


class ChangeIdError(BlocktrailError):
    """A change ID cannot be answered; the backup must fall back to a full read."""

    exit_code = ExitCode.CHANGE_ID_REFUSED


class StaleChangeId(ChangeIdError):
    """The change ID belongs to an earlier tracking epoch (reset, unsafe crash, revert past it,
    tracker upgrade, disk file changed outside blocktrail)."""


class InvalidChangeId(ChangeIdError):
    """The change ID is malformed, belongs to another disk, or lies in the future."""


class SnapshotNotFound(BlocktrailError):
    exit_code = ExitCode.SNAPSHOT_OR_POINT


class SnapshotRemoved(SnapshotNotFound):
    """A snapshot a reader holds the record of was removed (a snapshot taken since under its
    name is another one: another change ID)."""


class SnapshotExists(BlocktrailError):
    exit_code = ExitCode.SNAPSHOT_OR_POINT


class DiskNotFound(BlocktrailError):
    exit_code = ExitCode.NOT_FOUND_OR_EXISTS


class DiskExists(BlocktrailError):
    exit_code = ExitCode.NOT_FOUND_OR_EXISTS


class VmNotFound(BlocktrailError):
    exit_code = ExitCode.NOT_FOUND_OR_EXISTS


class DiskBusy(BlocktrailError):
    """Another process or handle has the disk open."""

    exit_code = ExitCode.BUSY


class SnapshotReadsInFlight(DiskBusy):
    """Merging a removed snapshot's layer waits for reads of that snapshot that were mapped
    before it was removed and are still being sent (an NBD client that takes its replies
    slowly, or not at all)."""


class FileInUse(BlocktrailError):
    """A file another process holds a lock on (the image of a running VM): not replaced by a
    restore, nor imported."""

    exit_code = ExitCode.BUSY


class DiskClosed(BlocktrailError):
    exit_code = ExitCode.BUSY


class HostBusy(BlocktrailError):
    """Another `blocktrail host` owns the data directory."""

    exit_code = ExitCode.BUSY


class ReadOnly(BlocktrailError):
    exit_code = ExitCode.USAGE


class UnsupportedFormat(BlocktrailError):
    """A file was written by a newer blocktrail, or is not a blocktrail file at all."""

    exit_code = ExitCode.FORMAT


class CorruptMetadata(BlocktrailError):
    """A disk's metadata cannot be decoded; nothing was changed."""

    exit_code = ExitCode.FORMAT


class Unauthorized(BlocktrailError):
    """The host's API wants its token (or another one)."""

    exit_code = ExitCode.UNAUTHORIZED


class HostUnreachable(BlocktrailError):
    exit_code = ExitCode.UNREACHABLE


class DiskIOFailure(BlocktrailError):
    """The operating system failed an I/O of a disk file (EIO, ...). The disk handle is closed;
    reopening the disk recovers it from its files."""

    exit_code = ExitCode.IO_FAILURE


class NoSpace(BlocktrailError):
    """A file system (or quota) is full. What was being written was given up; nothing that was
    there before is lost."""

    exit_code = ExitCode.NO_SPACE


class DiskNoSpace(NoSpace, DiskIOFailure):
    """A disk's file system is full: the disk handle is closed (reopening recovers it)."""


def is_no_space(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def io_error(what: str, exc: OSError, advice: str = "") -> DiskIOFailure:
    """The typed error for an OS error while doing ``what`` to a disk or the host's files: no
    space (exit 15) for a full file system or quota, else an I/O failure (exit 11)."""
    if is_no_space(exc):
        return DiskNoSpace(f"{what}: the file system is full ({exc.strerror}){advice}; free "
                           "space and retry")
    return DiskIOFailure(f"{what}: {exc.strerror or exc}{advice}")
