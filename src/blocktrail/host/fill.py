"""The background fill of a host's instantly restored disks, and what a disk says about its
restore (`restore_status`: ``filling N%`` or ``local``).

A disk restored instantly reads the chunks a read needs from its repository at once (on the
NBD server's threads, on the source's reader pool); the fill copies every other chunk in the
background, in order from where it stopped (`Disk.fill`), one step of a few MiB at a time, each
made durable before the next. It keeps out of the guest's way: after a step during which the
guest did any I/O (`Disk.io_requests`), steps are small and the fill rests as long as it
worked (half the time at most), and its fetches run on the source's background pool, so a
guest read never queues behind them; its threads run at a lower CPU priority
(`pipeline.background_priority`), so a guest that only computes (a kernel booting under
emulation) is not slowed either. An optional rate limit caps it further. When no chunk is
missing any more the disk switches to a local base by itself (atomically, `Disk.fill`): it no
longer depends on the repository.

A step that fails (a chunk damaged, the repository unreachable) pauses the fill, with the
error in the disk's status and the host's log; it is tried again after 1 s, then 2, 4, ... up
to a minute, and the next good step resets that. A host that starts finds the restoring disks
of its data directory and resumes their fills (what was filled before a crash is kept; what
was fetched but not yet made durable is fetched again).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from blocktrail.disk import Disk
from blocktrail.disk.meta import META_FILE, DiskMeta
from blocktrail.disk.restoring import ChunkUnavailable
from blocktrail.errors import BlocktrailError, DiskClosed, InvalidArgument
from blocktrail.pipeline import background_priority

if TYPE_CHECKING:
    from blocktrail.host.registry import DiskRegistry

log = logging.getLogger("blocktrail.restore")


@dataclass(frozen=True, slots=True)
class FillPolicy:
    idle_chunks: int = 512  # a step while the guest is idle (32 MiB of 64 KiB chunks)
    busy_chunks: int = 16  # a step after the guest did I/O
    busy_share: float = 0.5  # the share of the time the fill may work while the guest is busy
    first_retry_s: float = 1.0
    max_retry_s: float = 60.0


class FillJob:
    """The fill of one disk, on a thread of its own."""

    def __init__(self, name: str, disk: Disk, policy: FillPolicy, *, paused: bool = False,
                 rate: int | None = None) -> None:
        self.name, self.disk, self.policy = name, disk, policy
        self._cond = threading.Condition()
        self.paused = paused  # by request
        self.rate = rate  # bytes per second, None: as fast as the guest allows
        self.retry_at: float | None = None  # monotonic: waiting after a failure until then
        self.error: str | None = None
        self.error_at: float | None = None  # time.time()
        self.finished = False
        self.filled_bytes = 0  # by this job
        self._stopping = False
        self._kicked = False  # a control call since the step began: it ends the next wait
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"blocktrail-fill-{name}")

    def start(self) -> None:
        self._thread.start()

    def control(self, *, paused: bool, rate: int | None) -> None:
        """Set the pause and the rate; a fill waiting to retry after a failure tries now (the
        repository may be back, a chunk stored again)."""
        with self._cond:
            self.paused, self.rate = paused, rate
            self._kicked = True
            self._cond.notify_all()

    def stop(self, timeout_s: float = 60) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _rest(self, seconds: float) -> bool:
        """Wait (a stop ends it early, and so does a control call made since the step before
        it began: a new rate or a pause takes effect, a retry is tried now); -> False once
        stopping."""
        deadline = time.monotonic() + seconds
        with self._cond:
            while not self._stopping and not self._kicked:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return not self._stopping

    def _run(self) -> None:
        from blocktrail.backup.chunksource import background_fetches

        background_priority()  # the guest first: its CPU too, not only its I/O
        policy = self.policy
        delay = policy.first_retry_s
        last_io: int | None = None
        budget_from = time.monotonic()
        budget_bytes = 0
        last_rate: int | None = None
        while True:
            with self._cond:
                waited = False
                while self.paused and not self._stopping:
                    self._cond.wait()
                    waited = True
                if self._stopping:
                    return
                rate = self.rate
                self._kicked = False  # a control call from now on ends the wait after this
                # step (one made while it runs too: the repository may be back already)
            if waited or rate != last_rate:  # a pause earns no burst; a new rate starts anew
                budget_from, budget_bytes = time.monotonic(), 0
            last_rate = rate
            disk = self.disk
            progress = disk.restore_progress
            if progress is None:
                self._done()
                return
            io = disk.io_requests
            busy = last_io is not None and io != last_io
            last_io = io
            chunks = policy.busy_chunks if busy else policy.idle_chunks
            source = disk.restore_source
            chunk_size = source.chunk_size if source is not None else 64 * 1024
            if rate is not None:  # at most a quarter of a second's worth a step
                chunks = max(1, min(chunks, rate // 4 // chunk_size))
            started = time.monotonic()
            before = progress.local
            try:
                with background_fetches():
                    after = disk.fill(chunks)
            except DiskClosed:
                return  # the host is closing (or the disk failed: it says why to its readers)
            except (ChunkUnavailable, BlocktrailError, OSError) as exc:
                why = exc.message if isinstance(exc, BlocktrailError) else str(exc)
                self._failed(why, delay)
                if not self._rest(delay):
                    return
                delay = min(delay * 2, policy.max_retry_s)
                with self._cond:
                    self.retry_at = None
                budget_from, budget_bytes = time.monotonic(), 0  # nor does waiting to retry
                continue
            delay = policy.first_retry_s
            if after is None or after.done:
                self.filled_bytes += progress.remaining * chunk_size
                self._done()
                return
            filled = (after.local - before) * chunk_size
            self.filled_bytes += filled
            worked = time.monotonic() - started
            rest = worked * (1 - policy.busy_share) / policy.busy_share if busy else 0.0
            if rate is not None:
                budget_bytes += filled
                rest = max(rest, budget_from + budget_bytes / rate - time.monotonic())
            else:
                budget_from, budget_bytes = time.monotonic(), 0
            if rest > 0 and not self._rest(rest):
                return

    def _failed(self, why: str, delay: float) -> None:
        with self._cond:
            self.error, self.error_at = why, time.time()
            self.retry_at = time.monotonic() + delay
        log.warning("disk %s: the fill of its restore pauses for %.0f s: %s", self.name, delay,
                    why)

    def _done(self) -> None:
        with self._cond:
            self.finished, self.retry_at = True, None
        log.info("disk %s: its restore is complete: every chunk is local, and the disk no "
                 "longer depends on the repository", self.name)


_JOBS: weakref.WeakKeyDictionary[Disk, FillJob] = weakref.WeakKeyDictionary()
_JOBS_LOCK = threading.Lock()


class FillScheduler:
    """The fills of a registry's restoring disks."""

    def __init__(self, registry: DiskRegistry, policy: FillPolicy | None = None) -> None:
        self._registry = registry
        self._policy = policy or FillPolicy()
        self._jobs: dict[str, FillJob] = {}
        self._lock = threading.Lock()
        self._closed = False
        if not log.handlers and not logging.getLogger().handlers:  # nobody set up logging
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s blocktrail host: %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
            log.propagate = False

    def resume(self) -> list[str]:
        """Start the fill of every restoring disk of the data directory (a restart); -> their
        names. A disk that cannot be opened is left to fail on its own when it is used."""
        started = []
        for name in self._registry.names():
            if not _restoring_on_file(os.path.join(self._registry.data_dir, "disks", name)):
                continue
            try:
                self.start(name)
            except BlocktrailError as exc:
                log.warning("disk %s: its restore cannot resume now: %s", name, exc.message)
                continue
            started.append(name)
        return started

    def start(self, name: str, *, paused: bool = False, rate: int | None = None) -> FillJob:
        disk = self._registry.get(name)
        with self._lock:
            if self._closed:
                raise DiskClosed("the host is closing")
            job = self._jobs.get(name)
            if job is not None and job.disk is disk and job.running:
                job.control(paused=paused, rate=rate)
                return job
            job = FillJob(name, disk, self._policy, paused=paused, rate=rate)
            self._jobs[name] = job
            with _JOBS_LOCK:
                _JOBS[disk] = job
            job.start()
        progress, origin = disk.restore_progress, disk.restore_origin or {}
        if progress is not None:
            log.info("disk %s: filling its restore from restore point %s in %s (%d%% local)%s",
                     name, origin.get("point"), origin.get("repository"), int(progress.percent),
                     " (paused)" if paused else "")
        return job

    def control(self, name: str, *, paused: bool | None = None, rate: int | None = None,
                set_rate: bool = False) -> None:
        """Pause or resume a disk's fill (``paused``; None: as it is), or limit its rate
        (``set_rate``: to ``rate`` bytes per second, None: no limit)."""
        disk = self._registry.get(name)
        if disk.restore_progress is None:
            raise InvalidArgument(f"disk {name!r} is local: it has nothing to fill")
        with self._lock:
            job = self._jobs.get(name)
        running = job is not None and job.disk is disk and job.running
        now_paused = job.paused if running and job is not None else False
        now_rate = job.rate if running and job is not None else None
        self.start(name, paused=now_paused if paused is None else paused,
                   rate=rate if set_rate else now_rate)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            jobs = list(self._jobs.values())
        for job in jobs:
            job.stop()


def _restoring_on_file(path: str) -> bool:
    try:
        with open(os.path.join(path, META_FILE), "rb") as f:
            meta = DiskMeta.from_bytes(f.read(), path)
    except (OSError, BlocktrailError):
        return False
    return any(layer.kind == "restoring" for layer in meta.layers)


def restore_status(disk: Disk) -> dict[str, Any]:
    """What a disk says about its restore: ``local`` (its base is all here), or ``filling N%``
    from which restore point, whether and why the fill is paused, and its last error."""
    progress = disk.restore_progress
    if progress is None:
        return {"state": "local", "summary": "local", "percent": 100.0, "chunks": None,
                "local_chunks": None, "repository": None, "point": None, "paused": None,
                "retry_in_s": None, "rate_bytes_per_second": None, "last_error": None,
                "last_error_at": None}
    origin = disk.restore_origin or {}
    with _JOBS_LOCK:
        job = _JOBS.get(disk)
    source = disk.restore_source
    errors: list[tuple[float, str]] = []
    if source is not None:
        last, at = getattr(source, "last_error", None), getattr(source, "last_error_at", None)
        if isinstance(last, str) and isinstance(at, float):
            errors.append((at, last))
    paused: str | None = None
    retry_in: float | None = None
    rate: int | None = None
    if job is None or not job.running:
        paused = ("no fill runs for it in this process: the host that serves the disk fills "
                  "it" if job is None or not job.finished else None)
    else:
        rate = job.rate
        if job.error is not None and job.error_at is not None:
            errors.append((job.error_at, job.error))
        if job.paused:
            paused = "by request"
        elif job.retry_at is not None:
            retry_in = max(0.0, round(job.retry_at - time.monotonic(), 1))
            paused = f"{job.error}; trying again in {retry_in:.0f} s"
    if source is None and paused is None:
        paused = "no source is open for its chunks"
    last_error = max(errors)[1] if errors else None
    last_at = max(errors)[0] if errors else None
    percent = progress.percent
    shown = int(percent) if not progress.done else 100
    summary = f"filling {shown}%" + (f", paused: {paused}" if paused else "")
    return {"state": "paused" if paused else "filling", "summary": summary,
            "percent": round(min(percent, 99.9) if not progress.done else 100.0, 1),
            "chunks": progress.chunks, "local_chunks": progress.local,
            "repository": origin.get("repository"), "point": origin.get("point"),
            "paused": paused, "retry_in_s": retry_in, "rate_bytes_per_second": rate,
            "last_error": last_error,
            "last_error_at": None if last_at is None else
            datetime.fromtimestamp(last_at, UTC).isoformat()}
