"""The host's own jobs, started from the console: back up a disk now, verify a restore point.
Each runs on a thread of its own and reports its progress; the last finished ones are kept for
the console to show.

A backup reads the disk the host has open (Disk's public API: snapshot, changed areas, read),
at most at ``host --backup-bandwidth``, under the disk's lease in the repository, like the
worker's runs (one backup of a disk into a repository at a time). A verify compares the point
with a snapshot of the disk at the point's change ID when the disk still has one (every chunk
of both, the tracker not trusted; the verify state is recorded); otherwise the source state is
gone, and it reads and rehashes every stored chunk of the point instead (the verify state is
left as it is: it says whether the point equals its source).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from blocktrail.backup.engine import BackupOptions, run_backup
from blocktrail.backup.source import Source
from blocktrail.backup.sources.local import LocalDiskSource
from blocktrail.backup.throttle import Throttle, ThrottledSource
from blocktrail.backup.verify import verify_point
from blocktrail.disk import Disk
from blocktrail.errors import BlocktrailError, DiskBusy
from blocktrail.host.points import PointCatalog
from blocktrail.repo import DamagedCopy, Repository, RestorePoint
from blocktrail.repo.errors import RepositoryError
from blocktrail.repo.objects import ZERO_DIGEST

KEEP_FINISHED = 20


@dataclass
class HostJob:
    """One job; its thread writes, pages read (plain values, each replaced whole)."""

    id: int
    kind: str  # "backup" | "verify"
    disk: str
    repository: str
    state: str = "running"  # "running" | "succeeded" | "failed"
    phase: str = "starting"
    done_bytes: int = 0
    total_bytes: int = 0
    message: str = ""
    started: float = field(default_factory=time.time)
    ended: float | None = None

    @property
    def percent(self) -> float:
        return 100.0 * self.done_bytes / self.total_bytes if self.total_bytes else 0.0

    @property
    def rate_bytes_per_s(self) -> float:
        elapsed = (self.ended or time.time()) - self.started
        return self.done_bytes / elapsed if elapsed > 0 else 0.0

    def progress(self, unit_bytes: int) -> Callable[[int, int], None]:
        def report(done: int, total: int) -> None:
            self.done_bytes, self.total_bytes = done * unit_bytes, total * unit_bytes
        return report


class HostJobs:
    def __init__(self, get_disk: Callable[[str], Disk], names: Callable[[], list[str]],
                 catalog: PointCatalog, bandwidth_bytes_per_s: int | None = None) -> None:
        self._get_disk = get_disk
        self._bandwidth = bandwidth_bytes_per_s
        self._names = names
        self._catalog = catalog
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._running: dict[int, HostJob] = {}
        self._finished: deque[HostJob] = deque(maxlen=KEEP_FINISHED)

    def running(self) -> list[HostJob]:
        with self._lock:
            return list(self._running.values())

    def finished(self) -> list[HostJob]:
        with self._lock:
            return list(reversed(self._finished))

    def backup(self, disk_name: str, repository: str) -> HostJob:
        """Back up ``disk_name`` into ``repository`` (one of the catalog's) now."""
        disk = self._get_disk(disk_name)
        repo = self._catalog.repository(repository)
        with self._lock:
            if any(j.disk == disk_name and j.kind == "backup" for j in self._running.values()):
                raise DiskBusy(f"a backup of {disk_name} is running already")
        return self._start("backup", disk_name, repository,
                           lambda job: self._run_backup(job, disk, repo, self._bandwidth))

    def verify(self, repository: str, point_id: str) -> HostJob:
        repo = self._catalog.repository(repository)
        point = repo.point(point_id)
        disk_name, disk = self._disk_of(point)
        return self._start("verify", disk_name, repository,
                           lambda job: self._run_verify(job, disk, repo, point))

    def _disk_of(self, point: RestorePoint) -> tuple[str, Disk | None]:
        """The host's disk the point was taken of (None: the host has no such disk)."""
        for name in self._names():
            disk = self._get_disk(name)
            if disk.disk_id == point.disk_id:
                return name, disk
        return point.disk_id, None

    def _start(self, kind: str, disk: str, repository: str,
               work: Callable[[HostJob], str]) -> HostJob:
        job = HostJob(next(self._ids), kind, disk, repository)
        with self._lock:
            self._running[job.id] = job

        def body() -> None:
            try:
                job.message = work(job)
                job.state = "succeeded"
            except BlocktrailError as exc:
                job.state, job.message = "failed", f"{type(exc).__name__}: {exc.message}"
            except Exception as exc:  # a bug: shown, never fatal to the host
                job.state, job.message = "failed", f"internal error: {type(exc).__name__}: {exc}"
            job.ended = time.time()
            with self._lock:
                self._running.pop(job.id, None)
                self._finished.append(job)

        threading.Thread(target=body, name=f"host job {job.id}", daemon=True).start()
        return job

    @staticmethod
    def _run_backup(job: HostJob, disk: Disk, repo: Repository, bandwidth: int | None) -> str:
        source: Source = LocalDiskSource(disk)
        if bandwidth:
            source = ThrottledSource(source, Throttle(bandwidth))
        job.phase = "backup"  # under the disk's lease in the repository, as any backup
        report = run_backup(source, repo, BackupOptions(), job.progress(repo.chunk_size))
        text = (f"{report.kind} backup {report.point.id}: read {report.bytes_read} bytes, "
                f"stored {report.point.stats.get('bytes_stored', 0)}")
        if report.fallback_reason:
            text += f" (full, because {report.fallback_reason})"
        if not report.audit.tracker_trusted:
            text += "; AUDIT MISMATCH: the tracker missed changes (the right data was stored)"
        return text

    @staticmethod
    def _run_verify(job: HostJob, disk: Disk | None, repo: Repository,
                    point: RestorePoint) -> str:
        snapshot = None
        if disk is not None:
            snapshot = next((s.name for s in disk.snapshots if s.change_id == point.change_id),
                            None)
        if disk is not None and snapshot is not None:
            job.phase = f"verify against {snapshot}"
            report = verify_point(repo, point.id, LocalDiskSource(disk), snapshot,
                                  progress=job.progress(repo.chunk_size))
            if report.identical:
                return f"{point.id} equals snapshot {snapshot} ({report.chunks_compared} chunks)"
            raise _VerifyFailed(f"{point.id} differs from snapshot {snapshot} in "
                                f"{len(report.differing_areas)} areas, is damaged in "
                                f"{len(report.damaged_areas)}")
        job.phase = "read stored data"
        return read_point_data(repo, point, job.progress(repo.chunk_size))


class _VerifyFailed(BlocktrailError):
    pass


def read_point_data(repo: Repository, point: RestorePoint,
                    progress: Callable[[int, int], None]) -> str:
    """Read and rehash every stored chunk of ``point`` (a damaged copy goes to quarantine)."""
    entries = [(i, n) for i, n in repo.page_entries(point) if n != ZERO_DIGEST]
    found: list[DamagedCopy] = []
    lost = 0
    for done, (_index, name) in enumerate(entries, 1):
        try:
            repo.read_chunk(name, f"restore point {point.id}", found)
        except RepositoryError:
            lost += 1
        progress(done, len(entries))
    if lost or found:
        raise _VerifyFailed(f"{point.id}: {lost} of {len(entries)} chunks have no intact copy, "
                            f"{len(found)} damaged copies put in quarantine")
    return (f"every stored chunk of {point.id} is intact ({len(entries)} chunks; the disk has "
            "no snapshot at its change ID to compare with)")
