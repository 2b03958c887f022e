"""Leases: who is writing to a repository, and which disk each backup holds (docs/storage.md,
"Leases").

A lease is a small object under ``leases/``, created create-only, renewed by its holder with a
conditional replace (``If-Match`` its last version) every quarter of its duration, and deleted
when the holder is done. Every writer holds one: a backup ``leases/disk-<hash of disk id>.json``
(so two processes never back up one disk at once), any other writer
``leases/writer-<session>.json``; prune and repair hold ``leases/maintenance.json``, a command
that adds, removes or replaces a key file ``leases/keys.json``.

Timing, with ``D`` the lease duration and ``M`` the margin (default D/10, at least 2 s):

- Others judge a lease **expired** by the store's clock alone: when an answer about it (its
  ``Date``) is more than ``D + M`` after its last write (its ``Last-Modified``). No client clock
  is compared with another, or with the store's.
- The holder counts on its own boot clock (CLOCK_BOOTTIME: it runs on through a suspend and a
  SIGSTOP): its lease is valid until ``D - M`` after it *sent* its last successful renewal. It
  sends nothing that publishes (index file, manifest) and no renewal after that, and a request
  that took longer than ``M`` to answer counts as late: the lease is then lost, and a manifest
  sent late is deleted again. So whatever the holder publishes reaches the store before anyone
  can see its lease expired, as long as the store's clock and the holder's run at the same rate
  (within M over D) and Last-Modified/Date are within 1 s of the truth (M >= 2 s).
- A lease whose holder stops renewing (killed, stalled, cut off) can be taken over, by a
  conditional replace of the version that was seen expired, once it has expired.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from blocktrail.errors import InvalidArgument
from blocktrail.repo.backend import (
    Backend,
    BackendError,
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    PreconditionFailed,
)
from blocktrail.repo.errors import LeaseLost, RepositoryBusy

FORMAT = "blocktrail-lease"


def boot_clock() -> float:
    """Seconds that also count while the machine is suspended or the process stopped."""
    clock = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(clock) if clock is not None else time.monotonic()


@dataclass(frozen=True, slots=True)
class Timing:
    """Lease duration and margin, in seconds (short ones for tests)."""

    lease_s: float = 300.0
    margin_s: float | None = None

    @property
    def margin(self) -> float:
        return self.margin_s if self.margin_s is not None else max(2.0, self.lease_s / 10)

    @property
    def renew_every(self) -> float:
        return self.lease_s / 4


DEFAULT_TIMING = Timing()
LEASE_VARIABLE = "BLOCKTRAIL_LEASE_SECONDS"


def timing_from_environment() -> Timing:
    """Lease duration: BLOCKTRAIL_LEASE_SECONDS (default 300 s; short ones for tests)."""
    value = os.environ.get(LEASE_VARIABLE)
    if not value:
        return Timing()
    try:
        seconds = float(value)
    except ValueError:
        raise InvalidArgument(f"{LEASE_VARIABLE}={value!r} is not a number of seconds") from None
    if seconds < 3:
        raise InvalidArgument(f"{LEASE_VARIABLE} must be at least 3 seconds")
    # M >= 2 s: S3's Last-Modified and Date are whole seconds (docs/storage.md, "Leases")
    return Timing(lease_s=seconds, margin_s=max(2.0, min(seconds / 4, 30.0)))


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """A lease as another process sees it."""

    name: str
    owner: str
    purpose: str  # "backup" | "writer" | "maintenance" | "keys"
    disk_id: str | None
    host: str
    pid: int
    base: str | None  # the base point of a running incremental: it cannot be forgotten
    duration_s: float
    acquired_at: str
    info: ObjectInfo
    process: str | None = None  # `process_identity` of the holder

    def holder_dead(self) -> bool:
        """The holder ran on this machine (same boot, same PID namespace) and is gone: it can
        publish nothing more, so its lease need not run out (a killed backup's)."""
        mine = process_identity()
        if not self.process or mine is None:
            return False
        machine = mine.rsplit("/", 2)[0]  # boot and PID namespace
        if self.process.rsplit("/", 2)[0] != machine:
            return False  # another machine (or container): only expiry tells
        if proc_hides_processes():
            return False  # another user's live process may look gone: only expiry tells
        try:
            return f"{machine}/{self.pid}/{_start_time(self.pid)}" != self.process
        except (FileNotFoundError, ProcessLookupError):
            return True  # no such process any more
        except (OSError, IndexError):
            return False  # it cannot be told: not gone

    def expired(self, margin: float) -> bool:
        """Its holder can publish nothing more: the lease ran out (by the store's clock), or
        the holder is a process of this machine that is gone."""
        return self.info.observed - self.info.modified > self.duration_s + margin \
            or self.holder_dead()

    def age(self) -> float:
        return max(0.0, self.info.observed - self.info.modified)

    def describe(self) -> str:
        return (f"{self.purpose} by {self.host} pid {self.pid} since {self.acquired_at} "
                f"(renewed {self.age():.0f} s ago; a lease lasts {self.duration_s:.0f} s)")


def read_lease(backend: Backend, name: str) -> LeaseRecord | None:
    """The lease ``name`` (None: there is none). A lease that does not decode still counts,
    with the duration of its version 1 default, so it expires like any other."""
    try:
        info = backend.info(name)
        data = backend.load(name)
    except ObjectNotFound:
        return None
    try:
        body: dict[str, Any] = json.loads(data)
        return LeaseRecord(name, str(body["owner"]), str(body["purpose"]),
                           body.get("disk_id"), str(body.get("host", "?")),
                           int(body.get("pid", 0)), body.get("base"),
                           float(body["duration_s"]), str(body.get("acquired_at", "?")), info,
                           body.get("process"))
    except (ValueError, KeyError, TypeError):
        return LeaseRecord(name, f"damaged:{info.etag}", "writer", None, "?", 0, None,
                           Timing().lease_s, "?", info)


def list_leases(backend: Backend) -> list[LeaseRecord]:
    records = []
    for info in backend.list("leases/"):
        record = read_lease(backend, info.name)
        if record is not None:
            records.append(record)
    return records


def live_writers(backend: Backend, margin: float) -> list[LeaseRecord]:
    """The leases of processes that may still write (all but the maintenance lease) and
    have not run out, nor have a holder that is a gone process of this machine."""
    return [record for record in list_leases(backend)
            if record.purpose != "maintenance" and not record.expired(margin)]


def _withdraw(backend: Backend, name: str, data: bytes) -> None:
    with contextlib.suppress(BackendError, OSError):
        if backend.load(name) == data:
            backend.delete(name)


def process_identity(pid: int | None = None) -> str | None:
    """This machine's boot, the PID namespace, the PID and the process's start time: a process
    that is gone (or a PID used again) never matches. None where /proc cannot tell."""
    pid = os.getpid() if pid is None else pid
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        namespace = os.readlink("/proc/self/ns/pid")
        started = _start_time(pid)
    except (OSError, IndexError):
        return None
    return f"{boot}/{namespace}/{pid}/{started}"


def _start_time(pid: int) -> str:
    """The process's start time (clock ticks after boot); FileNotFoundError if there is none."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[19]


@functools.cache
def proc_hides_processes() -> bool:
    """/proc is mounted with ``hidepid`` (1, 2, noaccess, invisible: systemd's ProtectProc=
    too): another user's processes look gone, or cannot be read, while they run."""
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return True  # cannot tell: trust no absence
    for line in lines:
        mounted, _, source = line.partition(" - ")
        fields, options = mounted.split(), source.split()
        if len(fields) > 4 and fields[4] == "/proc" and options[:1] == ["proc"]:
            hidepid = next((o.partition("=")[2] for o in options[-1].split(",")
                            if o.startswith("hidepid=")), "0")
            return hidepid not in ("0", "off")
    return False


class Lease:
    """A lease this process holds, renewed on a background thread until released."""

    def __init__(self, backend: Backend, name: str, body: dict[str, Any], info: ObjectInfo,
                 timing: Timing, sent_at: float) -> None:
        self.backend = backend
        self.name = name
        self.timing = timing
        self._body = body
        self._etag = info.etag
        self._valid_until = sent_at + timing.lease_s - timing.margin
        self._lost: str | None = None
        self._mutex = threading.Lock()
        self._released = threading.Event()
        self._on_release: list[Callable[[], None]] = []
        self._thread = threading.Thread(target=self._keep, name=f"lease {name}", daemon=True)
        self._thread.start()

    @property
    def owner(self) -> str:
        return str(self._body["owner"])

    @property
    def base(self) -> str | None:
        return self._body.get("base")

    @classmethod
    def acquire(cls, backend: Backend, name: str, *, purpose: str, timing: Timing,
                disk_id: str | None = None, what: str = "") -> Lease:
        """Create the lease, or take it over if its holder let it expire; else
        `RepositoryBusy` naming the holder."""
        body = {"format": FORMAT, "version": 1, "owner": secrets.token_hex(8),
                "purpose": purpose, "disk_id": disk_id, "host": socket.gethostname(),
                "pid": os.getpid(), "process": process_identity(), "base": None,
                "duration_s": timing.lease_s,
                "acquired_at": datetime.now(UTC).isoformat(timespec="seconds")}
        data = json.dumps(body).encode()
        for _ in range(5):
            sent = boot_clock()
            try:
                info = backend.create(name, data)
            except ObjectExists:
                held = read_lease(backend, name)
                if held is None:
                    continue  # released meanwhile: try again
                if not held.expired(timing.margin):
                    raise RepositoryBusy(f"cannot {what or purpose}: {held.describe()}; try "
                                         "again later") from None
                sent = boot_clock()
                try:
                    info = backend.replace(name, data, held.info.etag)
                except PreconditionFailed:
                    continue  # renewed or taken over meanwhile: look again
            except BaseException:
                _withdraw(backend, name, data)  # it may be there although the write failed
                raise
            if boot_clock() - sent > timing.margin:
                with contextlib.suppress(BackendError, OSError):
                    backend.delete(name, info.etag)
                raise LeaseLost(f"cannot {what or purpose}: taking the lease {name} took longer "
                                f"than its {timing.margin:.0f} s margin; try again")
            return cls(backend, name, body, info, timing, sent)
        raise RepositoryBusy(f"cannot {what or purpose}: the lease {name} keeps changing hands; "
                             "try again later")

    # ---------------------------------------------------------------- renewing

    def _keep(self) -> None:
        while not self._released.wait(self.timing.renew_every):
            with contextlib.suppress(LeaseLost):
                self.renew(tolerate=True)
            if self._lost is not None:
                return

    def renew(self, *, tolerate: bool = False, **changes: Any) -> None:
        """Renew now (with ``changes`` to the body, e.g. ``base``); `LeaseLost` if it cannot
        be any more. ``tolerate``: a failed request is tried again at the next round (the
        background renewal), instead of raised."""
        with self._mutex:
            self._check_locked("renew the lease")
            body = {**self._body, **changes}
            sent = boot_clock()
            try:  # a failure of the recovery below is one of the renewal, as any other
                try:
                    info = self.backend.replace(self.name, json.dumps(body).encode(),
                                                self._etag)
                except PreconditionFailed:
                    holder = read_lease(self.backend, self.name)
                    if holder is None or holder.owner != self.owner:
                        self._lost = ("another process took it over"
                                      + (f" ({holder.describe()})" if holder else ""))
                        raise LeaseLost(f"lost the lease {self.name}: {self._lost}") from None
                    self._etag = holder.info.etag  # a write of ours that reported a failure
                    info = self.backend.replace(self.name, json.dumps(body).encode(),
                                                self._etag)
            except (BackendError, OSError) as exc:
                if boot_clock() > self._valid_until:
                    self._lost = f"it could not be renewed in time ({exc})"
                if not tolerate:
                    raise
                return  # try again at the next round
            if boot_clock() - sent > self.timing.margin:
                self._lost = (f"a renewal took {boot_clock() - sent:.1f} s, longer than the "
                              f"{self.timing.margin:.0f} s margin")
                raise LeaseLost(f"lost the lease {self.name}: {self._lost}")
            self._body, self._etag = body, info.etag
            self._valid_until = sent + self.timing.lease_s - self.timing.margin

    @property
    def lost(self) -> bool:
        """It protects nothing any more: lost, expired (not renewed in time) or released."""
        with self._mutex:
            return self._why_lost_locked() is not None

    def check(self, what: str) -> None:
        """Before ``what`` is sent: the lease must still be valid (`LeaseLost` says why not)."""
        with self._mutex:
            self._check_locked(what)

    def _why_lost_locked(self) -> str | None:
        if self._released.is_set() and self._lost is None:
            self._lost = "it was released"
        if self._lost is None and boot_clock() > self._valid_until:
            valid = self.timing.lease_s - self.timing.margin
            self._lost = (f"it expired: not renewed for {valid:.0f} s (this process was "
                          "stopped or suspended, or could not reach the repository)")
        return self._lost

    def _check_locked(self, what: str) -> None:
        if self._why_lost_locked() is not None:
            raise LeaseLost(f"cannot {what}: the lease {self.name} is lost: {self._lost}; "
                            "nothing was published")

    def deadline_ok(self, sent: float) -> bool:
        """A request sent at ``sent`` (boot clock) and answered now was in time."""
        return boot_clock() - sent <= self.timing.margin and sent <= self._valid_until

    def on_release(self, action: Callable[[], None]) -> None:
        self._on_release.append(action)

    def release(self) -> None:
        """Stop renewing and delete the lease (if it is still ours)."""
        if self._released.is_set():
            return
        self._released.set()
        self._thread.join(timeout=self.timing.renew_every + 60)
        with self._mutex:
            if self._lost is None:
                with contextlib.suppress(BackendError, OSError):
                    try:
                        self.backend.delete(self.name, self._etag)
                    except PreconditionFailed:
                        holder = read_lease(self.backend, self.name)
                        if holder is not None and holder.owner == self.owner:
                            self.backend.delete(self.name, holder.info.etag)
        for action in self._on_release:
            action()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
