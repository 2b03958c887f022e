"""One run of a task: back up a disk (or every disk of a VM at one instant) of a host into a
repository, verify it when due, apply retention, check the repository when due.

A disk task: take a snapshot through the host's API, back it up (incremental from the tracker,
with the job's audit sample, read at most at the job's bandwidth), verify the new point
against that same snapshot when a verify is due (every chunk of both, without the tracker;
differences are healed into a corrected point), remove the snapshot, then forget what the
retention does not keep and prune. A VM task takes one VM snapshot (all disks at one instant)
and backs up each disk from it. The disk's lease in the repository (repo/leases.py) is taken
before the snapshot and held until retention is done: no other worker, host or `blocktrail
backup` backs the disk up into that repository meanwhile, on this machine or another, and a
killed run's lease is taken over at once on this machine (at its expiry from another).
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import tzinfo
from typing import Any
from urllib.parse import quote

from blocktrail.backup.engine import BackupOptions, BackupReport, run_backup
from blocktrail.backup.source import Source
from blocktrail.backup.sources.host import HostDiskSource
from blocktrail.backup.throttle import Throttle, ThrottledSource
from blocktrail.backup.verify import VerifyReport, verify_point
from blocktrail.errors import BlocktrailError, InvalidArgument
from blocktrail.extents import Extent
from blocktrail.host.client import HostClient
from blocktrail.passwords import PasswordSources, password_source
from blocktrail.repo import Repository, S3Options
from blocktrail.repo.errors import RepositoryBusy
from blocktrail.repo.leases import DEFAULT_TIMING, Lease, Timing
from blocktrail.repo.location import is_s3_url
from blocktrail.worker.config import JobConfig
from blocktrail.worker.retention import apply_retention
from blocktrail.worker.scheduler import Task


@dataclass
class JobProgress:
    """What a running task is doing, for the worker's status lines and metrics (written by the
    task's thread, read by others: plain values, replaced whole)."""

    key: str
    phase: str = "starting"
    done_bytes: int = 0
    total_bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    phase_started: float = field(default_factory=time.monotonic)

    def phase_is(self, phase: str) -> None:
        self.phase, self.done_bytes, self.total_bytes = phase, 0, 0
        self.phase_started = time.monotonic()

    def callback(self, unit_bytes: int) -> Callable[[int, int], None]:
        def report(done: int, total: int) -> None:
            self.done_bytes, self.total_bytes = done * unit_bytes, total * unit_bytes
        return report

    def line(self) -> str:
        elapsed = time.monotonic() - self.phase_started
        if not self.total_bytes:
            return f"{self.key}: {self.phase} ({elapsed:.0f} s)"
        rate = self.done_bytes / elapsed if elapsed > 0 else 0.0
        left = (self.total_bytes - self.done_bytes) / rate if rate > 0 else None
        pct = 100 * self.done_bytes / self.total_bytes
        return (f"{self.key}: {self.phase} {pct:5.1f}% {_mib(self.done_bytes)}/"
                f"{_mib(self.total_bytes)} MiB, {_mib(int(rate))} MiB/s"
                + (f", {left:.0f} s left" if left is not None else ""))


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}"


@dataclass(frozen=True, slots=True)
class DiskRun:
    """What one disk's backup did."""

    disk: str
    disk_id: str
    point_id: str
    kind: str
    fallback_reason: str | None
    bytes_read: int
    bytes_stored: int
    audit_sampled: int
    audit_mismatches: tuple[Extent, ...]
    audit_damaged: tuple[Extent, ...]
    verify: str | None = None  # None: not verified; "identical" | "differences" | "damaged"
    verify_differences: tuple[Extent, ...] = ()
    healed_point: str | None = None
    forgotten: tuple[str, ...] = ()
    kept_for_taint: tuple[str, ...] = ()  # kept beyond the policy: a kept point builds on
    #                                        them, and they taint (RestorePoint.taint)


@dataclass(frozen=True, slots=True)
class CheckRun:
    ok: bool
    problems: int
    chunks_read: int
    subset_percent: float


@dataclass(frozen=True, slots=True)
class RepositoryStats:
    size_bytes: int
    objects: int
    points: int


@dataclass(frozen=True, slots=True)
class RunResult:
    disks: tuple[DiskRun, ...]
    seconds: float
    prune: str | None = None  # what prune did, or why it waits
    check: CheckRun | None = None
    repository: RepositoryStats | None = None


def host_client(job: JobConfig) -> HostClient:
    """The job's host; a TCP host's token from ``token_file`` or BLOCKTRAIL_TOKEN."""
    token = os.environ.get("BLOCKTRAIL_TOKEN")
    if job.token_file:
        try:
            with open(job.token_file) as f:
                token = f.read().strip()
        except OSError as exc:
            from blocktrail.errors import Unauthorized
            raise Unauthorized(f"job {job.name!r}: cannot read token_file {job.token_file}: "
                               f"{exc.strerror or exc}") from None
    return HostClient(job.host, token)


@dataclass(frozen=True, slots=True)
class RunOptions:
    verify: bool = False
    check: bool = False
    tz: tzinfo | None = None
    timing: Timing = DEFAULT_TIMING  # of the repository's leases


def open_repository(job: JobConfig, timing: Timing = DEFAULT_TIMING) -> Repository:
    """The job's repository: a directory, or an s3:// URL with the job's endpoint, region
    and profile (else boto3's own: AWS_ENDPOINT_URL, AWS_REGION, AWS_PROFILE, ~/.aws)."""
    s3 = S3Options(endpoint=job.endpoint, region=job.region, profile=job.profile) \
        if is_s3_url(job.repository) else None
    return Repository.open(job.repository, s3=s3, timing=timing, password=password_source(
        PasswordSources(job.password_file, job.password_command)))


def run_task(task: Task, options: RunOptions, progress: JobProgress) -> RunResult:
    """One run of ``task``; a failure raises the typed error (nothing half-published: a backup
    that fails publishes no point and removes its snapshot)."""
    started = time.monotonic()
    job = task.job
    client = host_client(job)
    try:
        if job.vm is None and len(job.disks) > 1:
            listed = client.call("GET", "/disks")
            refuse_shared_disk_ids(job, {str(d["name"]): str(d["disk_id"]) for d in listed
                                         if d.get("name") in job.disks and "disk_id" in d},
                                   task.target)
        with open_repository(job, options.timing) as repo:
            if job.vm is not None:
                disks = _run_vm(client, repo, job, job.vm, options, progress)
            else:
                disks = (_run_disk(client, repo, job, task.target, options, progress),)
            prune = _prune(repo, job, disks, progress)
            check = _check(repo, job, progress) if options.check else None
            stats = repository_stats(repo)
    finally:
        client.close()
    return RunResult(disks, time.monotonic() - started, prune, check, stats)


def refuse_shared_disk_ids(job: JobConfig, disk_ids: dict[str, str],
                           disk: str | None = None) -> None:
    """InvalidArgument if two of the job's disks (``disk_ids``: name -> disk ID) have one disk
    ID (of them, ``disk`` among them, if given): restore points, retention and leases are per
    disk ID, so the two disks' points would mix and retention would forget one's for the
    other's. Hosts give a disk restored beside its original a fresh disk ID; two such disks
    come from an older host."""
    by_id: dict[str, list[str]] = {}
    for name, disk_id in sorted(disk_ids.items()):
        by_id.setdefault(disk_id, []).append(name)
    for disk_id, names in sorted(by_id.items()):
        if len(names) > 1 and (disk is None or disk in names):
            raise InvalidArgument(
                f"job {job.name!r}: the disks {' and '.join(map(repr, names))} of {job.host} "
                f"have the same disk ID {disk_id}, so their restore points would mix and "
                "retention would forget one disk's for the other's; back up only one of them, "
                "or restore the other again as a new disk (which gets a disk ID of its own) "
                "and use that")


def _source(client: HostClient, job: JobConfig, disk: str) -> Source:
    source: Source = HostDiskSource(client, disk, api_host=client.endpoint.host)
    if job.bandwidth_bytes_per_s:
        source = ThrottledSource(source, Throttle(job.bandwidth_bytes_per_s))
    return source


def _run_disk(client: HostClient, repo: Repository, job: JobConfig, disk: str,
              options: RunOptions, progress: JobProgress) -> DiskRun:
    with contextlib.closing(_source(client, job, disk)) as source, \
            repo.disk_lease(source.disk_id) as lease:
        prefix = snapshot_prefix(repo)
        for stale in _snapshots(client, disk, prefix):  # a killed run's (we hold the lease)
            with contextlib.suppress(BlocktrailError):
                source.remove_snapshot(stale)
        snapshot = f"{prefix}{uuid.uuid4().hex[:12]}"
        source.create_snapshot(snapshot)
        try:
            run = _backup_one(repo, job, disk, source, lease, snapshot, options, progress)
        finally:
            with contextlib.suppress(BlocktrailError):
                source.remove_snapshot(snapshot)
        return _retain(repo, job, run, options, progress)


def _run_vm(client: HostClient, repo: Repository, job: JobConfig, vm: str, options: RunOptions,
            progress: JobProgress) -> tuple[DiskRun, ...]:
    info = client.call("GET", "/vms")
    disks = next((list(v["disks"]) for v in info if v["name"] == vm), None)
    if disks is None:
        from blocktrail.errors import VmNotFound
        raise VmNotFound(f"the host {job.host} has no VM {vm!r}")
    with contextlib.ExitStack() as stack:
        sources = {d: stack.enter_context(contextlib.closing(_source(client, job, d)))
                   for d in sorted(disks)}
        refuse_shared_disk_ids(job, {d: s.disk_id for d, s in sources.items()})
        leases = {d: stack.enter_context(repo.disk_lease(s.disk_id)) for d, s in sources.items()}
        prefix = snapshot_prefix(repo)
        # left by a killed run (we hold every disk's lease)
        for stale in {s for d in sources for s in _snapshots(client, d, prefix)}:
            with contextlib.suppress(BlocktrailError):
                client.call("DELETE", f"/vms/{quote(vm, safe='')}/snapshots/{stale}")
        snapshot = f"{prefix}{uuid.uuid4().hex[:12]}"
        client.call("POST", f"/vms/{quote(vm, safe='')}/snapshots", json={"name": snapshot})
        try:
            runs = [_backup_one(repo, job, d, s, leases[d], snapshot, options, progress)
                    for d, s in sources.items()]
        finally:
            with contextlib.suppress(BlocktrailError):
                client.call("DELETE", f"/vms/{quote(vm, safe='')}/snapshots/{snapshot}")
        return tuple(_retain(repo, job, run, options, progress) for run in runs)


def snapshot_prefix(repo: Repository) -> str:
    """The names of the worker's snapshots for this repository: ``blocktrail-job-<repo>-``. A
    run that finds one of its disk's (under the disk's lease) removes it: a killed run left
    it."""
    return f"blocktrail-job-{repo.repo_id[:8]}-"


def _snapshots(client: HostClient, disk: str, prefix: str) -> list[str]:
    snaps = client.call("GET", f"/disks/{quote(disk, safe='')}/snapshots")
    return [str(s["name"]) for s in snaps if str(s["name"]).startswith(prefix)]


def _backup_one(repo: Repository, job: JobConfig, disk: str, source: Source, lease: Lease,
                snapshot: str, options: RunOptions, progress: JobProgress) -> DiskRun:
    progress.phase_is(f"backup {disk}")
    report = run_backup(source, repo, BackupOptions(audit_percent=job.audit_percent,
                                                    snapshot=snapshot),
                        progress.callback(repo.chunk_size), lease=lease)
    verified: VerifyReport | None = None
    if options.verify:
        progress.phase_is(f"verify {disk}")
        verified = verify_point(repo, report.point.id, source, snapshot, heal=True,
                                progress=progress.callback(repo.chunk_size), lease=lease)
    return _disk_run(disk, report, verified)


def _disk_run(disk: str, report: BackupReport, verified: VerifyReport | None) -> DiskRun:
    verify = None
    if verified is not None:
        verify = "differences" if verified.differing_areas else \
            "damaged" if verified.damaged_areas else "identical"
    return DiskRun(
        disk=disk, disk_id=report.point.disk_id, point_id=report.point.id, kind=report.kind,
        fallback_reason=report.fallback_reason, bytes_read=report.bytes_read,
        bytes_stored=int(report.point.stats.get("bytes_stored", 0)),
        audit_sampled=report.audit.sampled_chunks,
        audit_mismatches=report.audit.mismatched_areas,
        audit_damaged=report.audit.damaged_areas, verify=verify,
        verify_differences=verified.differing_areas if verified else (),
        healed_point=verified.healed_point.id if verified and verified.healed_point else None)


def _retain(repo: Repository, job: JobConfig, run: DiskRun, options: RunOptions,
            progress: JobProgress) -> DiskRun:
    if job.keep.empty:
        return run
    progress.phase_is(f"retention {run.disk}")
    protected = {run.point_id}
    if run.healed_point:
        protected.add(run.healed_point)
    retained = apply_retention(repo, run.disk_id, job.keep, tz=options.tz, protected=protected)
    return replace(run, forgotten=tuple(p.id for p in retained.forgotten),
                   kept_for_taint=tuple(retained.kept_for_taint))


def _prune(repo: Repository, job: JobConfig, runs: tuple[DiskRun, ...],
           progress: JobProgress) -> str | None:
    if not job.prune or not any(r.forgotten for r in runs):
        return None
    progress.phase_is("prune")
    try:
        report = repo.prune()
    except RepositoryBusy as exc:  # backups are running: the next run prunes
        return f"deferred: {exc.message}"
    text = f"{report.packs_deleted} packs deleted, {report.bytes_freed} bytes freed"
    if report.packs_waiting:
        text += f"; {report.packs_waiting} unused packs wait for running backups to end"
    return text


def _check(repo: Repository, job: JobConfig, progress: JobProgress) -> CheckRun:
    progress.phase_is("check")
    report = repo.check(read_data_subset_pct=job.check_subset_percent)
    return CheckRun(report.ok, len(report.problems), report.chunks_read,
                    job.check_subset_percent)


STORED = ("packs/", "index/", "points/", "verify/")  # what a repository's size counts


def repository_stats(repo: Repository) -> RepositoryStats:
    """The repository's stored bytes (packs, index files, manifests, verify records), its
    object count (chunks, pages, page tables) and its restore points: listings, no manifest
    read."""
    size = sum(info.size for prefix in STORED for info in repo.backend.list(prefix))
    return RepositoryStats(size, len(repo.index), len(repo.manifest_files()))


def result_json(result: RunResult) -> dict[str, Any]:
    return {"seconds": round(result.seconds, 3), "prune": result.prune,
            "check": None if result.check is None else vars_of(result.check),
            "disks": [{**vars_of(d), "audit_mismatches": [list(e) for e in d.audit_mismatches],
                       "audit_damaged": [list(e) for e in d.audit_damaged],
                       "verify_differences": [list(e) for e in d.verify_differences],
                       "forgotten": list(d.forgotten),
                       "kept_for_taint": list(d.kept_for_taint)} for d in result.disks]}


def vars_of(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__slots__}
