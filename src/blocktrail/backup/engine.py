"""Full and incremental backups: snapshot -> changed areas -> read -> store -> publish -> remove.

Nothing here trusts the tracker blindly: a refused change ID, a size change, a missing or failed
base point all fall back to a full read (and say why); every incremental re-reads a random sample
of the chunks the tracker calls unchanged and compares them with the base point's hashes.

Nor does it trust the repository blindly: a damaged base point is passed over (base.py), chunks
the repository lost are read from the source again, and the audit also reads the stored bytes of
as many unchanged chunks (in runs: a few ranged reads instead of one per chunk), so a damaged
stored copy is put in quarantine and stored again.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, replace

from blocktrail.backup.base import BaseChoice, choose_base, prepare_incremental
from blocktrail.backup.plan import BasePoint, ReadPlan, audit_sample, plan_read, stored_copy_sample
from blocktrail.backup.source import Source, SourceSnapshot, read_exact
from blocktrail.extents import Extent, consecutive, merge
from blocktrail.fileio import is_zeros
from blocktrail.pipeline import read_ahead
from blocktrail.repo import Repository, RestorePoint
from blocktrail.repo.errors import PointNotFound, RepositoryError
from blocktrail.repo.leases import Lease
from blocktrail.repo.objects import KIND_CHUNK, Buffer
from blocktrail.repo.quarantine import DamagedCopy
from blocktrail.repo.restore import fetch_run
from blocktrail.repo.runs import Run, place, ranged_runs

READ_RUN_BYTES = 4 << 20
READ_GAP_BYTES = 256 << 10  # a full backup reads through holes this small (no I/O, fewer reads)
READ_THREADS = 8  # reads in flight: scattered reads gain from a deep device queue
REMOTE_AUDIT_THREADS = 32  # the audit's reads of stored chunks from object storage: round trips
AUDIT_RUN_BYTES = 512 << 10  # the audit reads stored copies in runs of this much of the disk
Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class BackupOptions:
    force_full: bool = False
    audit_percent: float = 1.0  # of the chunks the tracker calls unchanged
    audit_minimum: int = 16
    seed: int | None = None
    snapshot: str | None = None  # back up this existing snapshot (kept); None: take one


@dataclass(frozen=True, slots=True)
class AuditReport:
    sampled_chunks: int  # of the source, compared with the base's names for them
    mismatched_areas: tuple[Extent, ...]  # the source differs: the tracker missed changes
    damaged_areas: tuple[Extent, ...] = ()  # the stored copy was damaged (now in quarantine)
    stored_copies_checked: int = 0  # distinct stored chunks read and checked

    @property
    def tracker_trusted(self) -> bool:
        return not self.mismatched_areas


@dataclass(frozen=True, slots=True)
class BackupReport:
    point: RestorePoint
    kind: str
    fallback_reason: str | None
    chunks_read: int
    bytes_read: int
    audit: AuditReport
    seconds: float
    passed_over: tuple[str, ...] = ()  # newer restore points not used as the base, and why
    chunks_read_again: int = 0  # chunks of the base the repository lost, read from the source


def run_backup(source: Source, store: Repository, options: BackupOptions = BackupOptions(),
               progress: Progress | None = None, *, lease: Lease | None = None) -> BackupReport:
    """Back up ``source`` under the disk's lease in the repository (`RepositoryBusy` while
    another process backs it up; a lease lost on the way stops the backup before it publishes
    anything). The base chosen is recorded in the lease, so no `forget` removes it meanwhile.
    ``lease``: the disk's lease, taken and released by the caller (a job that holds it from
    its snapshot until its retention is done); None: taken here for the backup."""
    if lease is not None:
        return _run_leased(source, store, options, progress, lease)
    with store.disk_lease(source.disk_id) as taken:
        return _run_leased(source, store, options, progress, taken)


def _run_leased(source: Source, store: Repository, options: BackupOptions,
                progress: Progress | None, lease: Lease) -> BackupReport:
    started = time.perf_counter()
    if options.snapshot is not None:
        snapshot = source.existing_snapshot(options.snapshot)
    else:
        snapshot = source.create_snapshot(f"blocktrail-backup-{uuid.uuid4().hex[:12]}")
    try:
        choice, plan, read_again = _plan(source, snapshot, store, options, lease)
        base = choice.base
        rng = random.Random(options.seed)
        sample = audit_sample(plan, snapshot.size_bytes, store.chunk_size,
                              percent=options.audit_percent, minimum=options.audit_minimum,
                              rng=rng)
        stored_sample = stored_copy_sample(
            plan, snapshot.size_bytes, store.chunk_size, want=len(sample),
            run_chunks=AUDIT_RUN_BYTES // store.chunk_size, rng=rng)
        writer = store.begin(source.disk_id, snapshot.size_bytes,
                             parent=base.point_id if plan.kind == "incremental" and base else None,
                             lease=lease, reload=False)  # the base choice just read it
        # The audit's reads (of the snapshot and of the stored copies) and hashing run beside
        # the copy: neither waits for the other. What it finds is stored after the copy, from
        # this thread, as the writer takes chunks from one thread.
        checking = ThreadPoolExecutor(1, thread_name_prefix="blocktrail-audit")
        try:
            checked = checking.submit(_audit_check, source, snapshot, store,
                                      base if plan.kind == "incremental" else None, sample,
                                      stored_sample)
            try:
                bytes_read = _copy_chunks(source, snapshot, plan, writer.put_chunks,
                                          store.chunk_size, progress)
            except BaseException:
                checked.cancel()  # the copy failed: an audit not begun never begins
                raise
            finally:
                wait([checked])  # it reads the snapshot: done before the snapshot goes
            findings, stored_checked = checked.result()
            audit = _audit_apply(findings, len(sample), stored_checked, store.chunk_size,
                                 writer.put_chunk)
        except BaseException:
            writer.close()  # nothing is published; the snapshot goes below
            raise
        finally:
            checking.shutdown(wait=True)
        point = writer.commit(
            change_id=snapshot.change_id, kind=plan.kind, fallback_reason=plan.fallback_reason,
            tracker_trusted=audit.tracker_trusted,
            audit={"sampled_chunks": audit.sampled_chunks,
                   "stored_copies_checked": audit.stored_copies_checked,
                   "mismatches": [[e.offset, e.length] for e in audit.mismatched_areas],
                   "damaged_in_repository": [[e.offset, e.length]
                                             for e in audit.damaged_areas]},
            stats={"chunks_read": len(plan.chunks), "bytes_read": bytes_read})
    finally:
        if options.snapshot is None:
            source.remove_snapshot(snapshot.name)
    return BackupReport(point, plan.kind, plan.fallback_reason, len(plan.chunks), bytes_read,
                        audit, time.perf_counter() - started, choice.passed_over, read_again)


def _plan(source: Source, snapshot: SourceSnapshot, store: Repository,
          options: BackupOptions, lease: Lease) -> tuple[BaseChoice, ReadPlan, int]:
    """The base and what to read: changed areas since the newest whole restore point (a point
    that cannot carry the incremental is passed over), plus the chunks of that point the
    repository lost. -> (choice, plan, chunks read again)."""
    passed: dict[str, str] = {}
    while True:
        choice = choose_base(store, source.disk_id, passed)
        if choice.point is not None:
            store.record_base(lease, choice.point.id)  # no forget removes it meanwhile
            if not _still_there(store, choice.point.id):
                passed[choice.point.id] = "it was forgotten while this backup started"
                continue
        plan = plan_read(source, snapshot, choice.base, force_full=options.force_full,
                         chunk_size=store.chunk_size, no_base=choice.no_base)
        if plan.kind != "incremental" or choice.point is None:
            return choice, plan, 0
        problem, lost_chunks = prepare_incremental(store, choice.point, plan)
        if problem is None:
            extra = set(lost_chunks) - set(plan.chunks)
            return choice, replace(plan, chunks=sorted({*plan.chunks, *extra})), len(extra)
        passed[choice.point.id] = problem


def _still_there(store: Repository, point_id: str) -> bool:
    try:
        store.point(point_id)
    except PointNotFound:
        return False
    return True


def _spans(chunks: list[int], chunk_size: int, gap_chunks: int = 0
           ) -> Iterator[tuple[int, int, list[int]]]:
    """Reads of at most READ_RUN_BYTES: (first chunk, chunk count, the chunks wanted in it),
    each spanning consecutive wanted chunks and gaps of at most ``gap_chunks`` others."""
    per_run = max(1, READ_RUN_BYTES // chunk_size)
    wanted: list[int] = []
    for index in chunks:
        if wanted and (index - wanted[-1] - 1 > gap_chunks or index - wanted[0] >= per_run):
            yield wanted[0], wanted[-1] - wanted[0] + 1, wanted
            wanted = []
        wanted.append(index)
    if wanted:
        yield wanted[0], wanted[-1] - wanted[0] + 1, wanted


def _copy_chunks(source: Source, snapshot: SourceSnapshot, plan: ReadPlan,
                 put_run: Callable[[int, Buffer], None], chunk_size: int,
                 progress: Progress | None) -> int:
    """Read the planned chunks, a few reads ahead, in reads of consecutive ones; a full
    backup reads through small gaps too (they are holes: no I/O, and one read instead of
    several). Each run of wanted chunks goes to ``put_run(first index, its bytes)``
    uncopied. -> the bytes of the chunks read."""
    total, done = len(plan.chunks), 0
    read = 0
    gap = READ_GAP_BYTES // chunk_size if plan.kind == "full" else 0

    def read_span(span: tuple[int, int, list[int]]) -> tuple[int, list[int], Buffer]:
        first, count, wanted = span
        offset = first * chunk_size
        length = min(count * chunk_size, snapshot.size_bytes - offset)
        return first, wanted, read_exact(source, snapshot.name, length, offset)

    spans = _spans(plan.chunks, chunk_size, gap)
    for first, wanted, data in read_ahead(spans, read_span, window=16, threads=READ_THREADS):
        if len(wanted) == wanted[-1] - first + 1:
            put_run(first, data)
            read += len(data)
        else:
            view = memoryview(data)
            for run_first, count in consecutive(wanted):
                piece = view[(run_first - first) * chunk_size :
                             (run_first - first + count) * chunk_size]
                put_run(run_first, piece)
                read += len(piece)
        done += len(wanted)
        if progress is not None:
            progress(done, total)
    return read


@dataclass(frozen=True, slots=True)
class _AuditFinding:
    index: int
    data: Buffer | None  # the source's bytes, kept where they must be stored
    length: int
    mismatched: bool  # the source differs: the tracker missed a change
    copy_damaged: bool  # the stored copy was damaged (now in quarantine)
    lost: bool  # no intact stored copy is left


def _audit_check(source: Source, snapshot: SourceSnapshot, store: Repository,
                 base: BasePoint | None, sample: list[int], stored_sample: list[int]
                 ) -> tuple[list[_AuditFinding], int]:
    """Re-read chunks the tracker calls unchanged, and compare: ``sample`` from the source,
    with the base's names for them; ``stored_sample`` from the repository, each stored copy's
    envelope checked. Stores nothing (`_audit_apply` does). -> (what differs, per chunk of
    either sample; how many distinct stored chunks were read)."""
    if base is None or not (sample or stored_sample):
        return [], 0
    audited = sorted({*sample, *stored_sample})
    expected = store.chunk_digests(base.point_id, audited)
    cs = store.chunk_size
    where = f"audit of restore point {base.point_id}"

    def read_source(index: int) -> Buffer:
        offset = index * cs
        return read_exact(source, snapshot.name, min(cs, snapshot.size_bytes - offset), offset)

    def compare(index: int) -> tuple[int, Buffer | None]:
        """-> (length, the source's bytes where they differ from the stored chunk's name)."""
        data = read_source(index)
        digest = None if is_zeros(data) else store.codec.name(KIND_CHUNK, data)
        return len(data), (data if digest != expected[index] else None)

    names = {name for index in stored_sample if (name := expected[index]) is not None}
    threads = REMOTE_AUDIT_THREADS if store.backend.remote else READ_THREADS
    with ThreadPoolExecutor(threads, thread_name_prefix="blocktrail-audit-stored") as pool:
        runs = [pool.submit(_check_stored_run, store, run, where)
                for run in ranged_runs(store, sorted(((0, name) for name in names),
                                                     key=lambda entry: place(store, entry[1])))]
        compared = dict(zip(sample, read_ahead(sample, compare, window=64,
                                               threads=READ_THREADS), strict=True))
        stored: dict[bytes, tuple[bool, bool]] = {}
        for run in runs:
            stored.update(run.result())
    findings = []
    for index in audited:
        name = expected[index]
        copy_damaged, lost = stored.get(name, (False, False)) if name is not None \
            else (False, False)
        if index in compared:
            length, differing = compared[index]
        elif copy_damaged:  # outside the source sample: the source is read only if needed
            length, differing = compare(index)
        else:
            continue
        keep = differing
        if keep is None and lost:  # the same content, with no intact stored copy left
            keep = read_source(index)
        findings.append(_AuditFinding(index, keep, length, differing is not None,
                                      copy_damaged, lost))
    return findings, len(names)


def _check_stored_run(store: Repository, run: Run, where: str
                      ) -> dict[bytes, tuple[bool, bool]]:
    """Read the stored copies of a run of chunks (one ranged read; the audit reads each
    sampled chunk once, however many sampled places hold it). -> per chunk: (a copy was
    damaged and is now in quarantine, no intact copy is left)."""
    found: list[DamagedCopy] = []
    lost: set[bytes] = set()
    try:
        fetch_run(store, run, where, found)
    except RepositoryError:  # which of them has no intact copy: read them one by one
        for _, name, _ in run:
            try:
                store.read_chunk(name, where, found)
            except RepositoryError:
                lost.add(name)
    damaged = {copy.digest for copy in found} | lost
    return {name: (name in damaged, name in lost) for _, name, _ in run}


def _audit_apply(findings: list[_AuditFinding], sampled: int, stored_checked: int,
                 chunk_size: int, put: Callable[[int, Buffer], None]) -> AuditReport:
    """Store what the audit found: a source that differs stores the right data (the tracker
    missed a change); a stored copy that is damaged is in quarantine, and its content is
    stored again when no intact copy is left."""
    mismatched: list[Extent] = []
    damaged: list[Extent] = []
    for found in findings:
        extent = Extent(found.index * chunk_size, found.length)
        if found.data is not None:  # differs, or the same content with no intact copy left
            put(found.index, found.data)
        if found.mismatched:
            mismatched.append(extent)
        if found.copy_damaged:
            damaged.append(extent)
    return AuditReport(sampled, tuple(merge(mismatched)), tuple(merge(damaged)),
                       stored_checked)


__all__ = ["AuditReport", "BackupOptions", "BackupReport", "ReadPlan", "choose_base",
           "run_backup"]
