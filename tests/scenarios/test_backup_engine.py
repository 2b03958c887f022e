"""The backup engine against real tracked disks: incrementals, fallbacks, the audit that catches a
lying tracker, verify and heal."""

from __future__ import annotations

import math
import os
import random
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from blocktrail.backup.engine import AUDIT_RUN_BYTES, BackupOptions, run_backup
from blocktrail.backup.plan import ReadPlan, audit_sample, stored_copy_sample
from blocktrail.backup.sources.local import LocalDiskSource
from blocktrail.backup.verify import verify_point
from blocktrail.disk import Disk
from blocktrail.errors import DiskIOFailure
from blocktrail.extents import Extent
from blocktrail.repo import Repository, RetentionPolicy, layout
from blocktrail.repo.objects import KIND_PAGE
from blocktrail.repo.runs import RANGE_BYTES
from faulty import DropsMarksDuringConsolidation
from repodamage import flip, object_file
from s3server import TEST_ENCRYPTION, RepoTarget

MiB, CS = 1 << 20, 64 * 1024


def restore_bytes(repo: Repository, point_id: str, tmp: Path) -> bytes:
    target = tmp / f"{point_id}.raw"
    repo.restore(point_id, str(target))
    return target.read_bytes()


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Disk, Repository, LocalDiskSource]:
    disk = Disk.create(tmp_path / "disk", 16 * MiB)
    rng = random.Random(1)
    for _ in range(40):
        disk.pwrite(rng.randbytes(100_000), rng.randrange(0, 15 * MiB))
    return disk, Repository.init(tmp_path / "repo",
                                 encryption=TEST_ENCRYPTION), LocalDiskSource(disk)


def test_incremental_reads_only_changes_and_restores_exactly(
        setup: tuple[Disk, Repository, LocalDiskSource], tmp_path: Path) -> None:
    disk, repo, source = setup
    full = run_backup(source, repo)
    assert full.kind == "full" and full.fallback_reason.startswith("no earlier")  # type: ignore[union-attr]
    assert disk.snapshots == []  # the backup's snapshot is gone again
    content = disk.pread(disk.size_bytes, 0)
    assert restore_bytes(repo, full.point.id, tmp_path) == content
    disk.pwrite(b"\x07" * 5000, 3 * MiB + 100)
    disk.trim(CS, 8 * MiB)  # dirty and now a hole: stored as zeros, not inherited
    disk.zero(10, 9 * MiB)
    inc = run_backup(source, repo, BackupOptions(seed=1))
    assert inc.kind == "incremental" and inc.fallback_reason is None
    assert inc.chunks_read == 3 and inc.audit.sampled_chunks == 16 and inc.audit.tracker_trusted
    assert restore_bytes(repo, inc.point.id, tmp_path) == disk.pread(disk.size_bytes, 0)
    assert restore_bytes(repo, full.point.id, tmp_path) == content


@pytest.mark.parametrize("event", ["reset", "resize", "forced", "failed-verify"])
def test_fallbacks_to_full_say_why(setup: tuple[Disk, Repository, LocalDiskSource],
                                   tmp_path: Path, event: str) -> None:
    disk, repo, source = setup
    first = run_backup(source, repo)
    options = BackupOptions()
    if event == "reset":
        disk.reset_tracking()
        reason = "refused"
    elif event == "resize":
        disk.resize(20 * MiB)
        reason = "size changed"
    elif event == "forced":
        options = BackupOptions(force_full=True)
        reason = "requested"
    else:
        repo.set_verify_state(first.point.id, "failed")
        reason = f"restore point {first.point.id} failed verification"
    report = run_backup(source, repo, options)
    assert report.kind == "full" and reason in (report.fallback_reason or "")
    assert report.point.fallback_reason == report.fallback_reason
    assert restore_bytes(repo, report.point.id, tmp_path) == disk.pread(disk.size_bytes, 0)


def _lying_tracker_setup(tmp_path: Path) -> tuple[Disk, Repository, LocalDiskSource, set[int]]:
    """A disk whose tracker drops the writes made during a consolidation (ESXi 6.0)."""
    disk = Disk.create(tmp_path / "disk", 16 * MiB, tracker_class=DropsMarksDuringConsolidation)
    rng = random.Random(2)
    disk.pwrite(rng.randbytes(16 * MiB), 0)
    repo = Repository.init(tmp_path / "repo", encryption=TEST_ENCRYPTION)
    source = LocalDiskSource(disk)
    run_backup(source, repo)
    disk.create_snapshot("vm-snap")
    disk.pwrite(rng.randbytes(CS), 0)
    consolidation = disk.begin_remove_snapshot("vm-snap")
    missed = {17, 99, 180, 201, 222, 240, 250, 255}
    for chunk in missed:  # written during the consolidation: untracked by the faulty tracker
        disk.pwrite(rng.randbytes(CS), chunk * CS)
    consolidation.step(max_clusters=10**6)
    while not consolidation.step():
        pass
    return disk, repo, source, missed


def test_audit_catches_the_lying_tracker_with_the_expected_probability(tmp_path: Path) -> None:
    _, _, _, missed = _lying_tracker_setup(tmp_path)
    total, sample = 256, 16
    plan = ReadPlan("incremental", [0], None)
    unchanged = total - 1
    expected = 1 - math.comb(unchanged - len(missed), sample) / math.comb(unchanged, sample)
    trials = 2000
    caught = sum(bool(set(audit_sample(plan, 16 * MiB, CS, percent=1.0, minimum=sample,
                                       rng=random.Random(seed))) & missed)
                 for seed in range(trials))
    sigma = math.sqrt(trials * expected * (1 - expected))
    assert abs(caught - trials * expected) < 4 * sigma, (caught, trials * expected)


def test_audit_mismatch_stores_right_data_and_forces_a_full(tmp_path: Path) -> None:
    disk, repo, source, missed = _lying_tracker_setup(tmp_path)
    for seed in range(200):  # a backup whose sample hits a missed chunk
        if set(audit_sample(ReadPlan("incremental", [0], None), 16 * MiB, CS, percent=100,
                            minimum=0, rng=random.Random(seed))) & missed:
            break
    report = run_backup(source, repo, BackupOptions(audit_percent=100, seed=seed))
    assert not report.audit.tracker_trusted
    assert {e.offset // CS for e in report.audit.mismatched_areas} == missed
    assert not report.point.tracker_trusted
    assert restore_bytes(repo, report.point.id, tmp_path) == disk.pread(disk.size_bytes, 0)
    following = run_backup(source, repo)
    assert following.kind == "full" and "audit" in (following.fallback_reason or "")


def test_verify_always_names_the_missed_extents_and_heal_repairs(tmp_path: Path) -> None:
    disk, repo, source, missed = _lying_tracker_setup(tmp_path)
    disk.create_snapshot("kept")  # the point's own state: what a heal compares with
    report = run_backup(source, repo, BackupOptions(audit_percent=0, audit_minimum=0,
                                                    snapshot="kept"))
    assert report.kind == "incremental" and report.audit.sampled_chunks == 0
    assert restore_bytes(repo, report.point.id, tmp_path) != disk.pread(disk.size_bytes, 0)
    verdict = verify_point(repo, report.point.id, source, "kept", heal=True)
    assert {e.offset // CS for e in verdict.differing_areas} == missed
    assert repo.point(report.point.id).verify_state == "failed"
    assert verdict.healed_point is not None
    assert restore_bytes(repo, verdict.healed_point.id, tmp_path) == disk.pread(
        disk.size_bytes, 0)
    assert verify_point(repo, verdict.healed_point.id, source, None).identical
    # the next backup builds on the healed point, never on the failed one
    disk.pwrite(b"\x01" * 10, 5 * MiB)
    nxt = run_backup(source, repo)
    assert nxt.point.parent == verdict.healed_point.id
    assert restore_bytes(repo, nxt.point.id, tmp_path) == disk.pread(disk.size_bytes, 0)


def test_a_point_that_failed_verification_is_no_base_nor_are_its_children(
        tmp_path: Path) -> None:
    """B missed the tracker's lost writes; C builds on B and inherits them. Once verify finds
    B wrong, neither C (its chain holds B) nor anything older than B is a base."""
    disk, repo, source, missed = _lying_tracker_setup(tmp_path)
    no_audit = BackupOptions(audit_percent=0, audit_minimum=0)
    disk.create_snapshot("b")
    b = run_backup(source, repo, replace(no_audit, snapshot="b"))
    disk.pwrite(b"\x02" * 10, 3 * MiB)
    c = run_backup(source, repo, no_audit)
    assert c.kind == "incremental" and c.point.parent == b.point.id
    verdict = verify_point(repo, b.point.id, source, "b")
    assert {e.offset // CS for e in verdict.differing_areas} == missed
    disk.pwrite(b"\x03" * 10, 4 * MiB)
    d = run_backup(source, repo, no_audit)
    assert d.kind == "full" and d.point.parent is None
    assert d.fallback_reason == (
        f"restore point {b.point.id}, which restore point {c.point.id} builds on, failed "
        "verification: the change tracker may have missed changes since an older point; "
        "reading everything")
    assert restore_bytes(repo, d.point.id, tmp_path) == disk.pread(disk.size_bytes, 0)


def test_forget_keeps_a_failed_point_while_a_kept_point_builds_on_it(tmp_path: Path) -> None:
    """Retention keeps the newest: forgetting the failed B but keeping C, built on it, would
    leave C looking whole, and the next backup incremental on C and as wrong as B. forget keeps
    B, says so, and lets it go once no point kept builds on it."""
    disk, repo, source, _ = _lying_tracker_setup(tmp_path)
    no_audit = BackupOptions(audit_percent=0, audit_minimum=0)
    full = repo.points()[0]
    disk.create_snapshot("b")
    b = run_backup(source, repo, replace(no_audit, snapshot="b"))
    disk.pwrite(b"\x02" * 10, 3 * MiB)
    c = run_backup(source, repo, no_audit)
    assert not verify_point(repo, b.point.id, source, "b").identical
    result = repo.forget_points(RetentionPolicy(keep_last=1))
    assert [p.id for p in result.forgotten] == [full.id]
    assert [p.id for p in result.kept_for_taint] == [b.point.id]
    assert [p.id for p in repo.points()] == [b.point.id, c.point.id]
    disk.pwrite(b"\x03" * 10, 4 * MiB)
    d = run_backup(source, repo, no_audit)
    assert d.kind == "full" and d.fallback_reason is not None and d.fallback_reason.startswith(
        f"restore point {b.point.id}, which restore point {c.point.id} builds on, failed")
    assert restore_bytes(repo, d.point.id, tmp_path) == disk.pread(disk.size_bytes, 0)
    result = repo.forget_points(RetentionPolicy(keep_last=1))  # nothing kept builds on B now
    assert {p.id for p in result.forgotten} == {b.point.id, c.point.id}
    assert result.kept_for_taint == ()
    assert [p.id for p in repo.points()] == [d.point.id]


def test_a_failed_point_makes_older_points_no_base(tmp_path: Path) -> None:
    """Falling back past a failed point to an older one would ask the tracker about exactly
    the window in which verify proved it missed changes."""
    disk, repo, source, missed = _lying_tracker_setup(tmp_path)
    no_audit = BackupOptions(audit_percent=0, audit_minimum=0)
    b = run_backup(source, repo, no_audit)
    verdict = verify_point(repo, b.point.id, source, None)  # the disk still holds B's state
    assert {e.offset // CS for e in verdict.differing_areas} == missed
    disk.pwrite(b"\x01" * 10, 5 * MiB)
    d = run_backup(source, repo, no_audit)
    assert d.kind == "full"
    assert d.fallback_reason is not None and d.fallback_reason.startswith(
        f"restore point {b.point.id} failed verification")
    assert restore_bytes(repo, d.point.id, tmp_path) == disk.pread(disk.size_bytes, 0)


@pytest.mark.parametrize("against", ["older", "live"])
def test_heal_writes_no_corrected_point_from_another_state_of_the_disk(
        setup: tuple[Disk, Repository, LocalDiskSource], tmp_path: Path, against: str) -> None:
    """A healed point records the point's change ID: with another state's content, the next
    incremental (changes since that ID) would miss what differs between the two states."""
    disk, repo, source = setup
    disk.create_snapshot("older")
    disk.pwrite(b"\x55" * CS, 10 * CS)
    disk.create_snapshot("point")
    point = run_backup(source, repo, BackupOptions(snapshot="point")).point
    if against == "live":
        disk.pwrite(b"\x56" * CS, 10 * CS)
    verdict = verify_point(repo, point.id, source, "older" if against == "older" else None,
                           heal=True)
    assert verdict.differing_areas == (Extent(10 * CS, CS),)
    assert verdict.healed_point is None
    assert verdict.not_healed is not None and \
        f"is not the disk state restore point {point.id} was taken of" in verdict.not_healed
    assert repo.point(point.id).verify_state == "failed"
    disk.pwrite(b"\x66" * CS, 20 * CS)
    following = run_backup(source, repo)
    assert following.kind == "full"
    assert restore_bytes(repo, following.point.id, tmp_path) == disk.pread(disk.size_bytes, 0)


def test_writes_during_a_backup_belong_to_the_next(setup: tuple[Disk, Repository,
                                                                LocalDiskSource],
                                                   tmp_path: Path) -> None:
    disk, repo, source = setup
    first = run_backup(source, repo)
    before = disk.pread(disk.size_bytes, 0)

    class WritingSource(LocalDiskSource):
        def pread(self, snapshot: str, count: int, offset: int) -> bytes:
            disk.pwrite(os.urandom(4096), 12 * MiB)  # the guest writes while the copy runs
            return super().pread(snapshot, count, offset)

    disk.pwrite(b"\x05" * 4096, 2 * MiB)
    expected = disk.pread(disk.size_bytes, 0)
    second = run_backup(WritingSource(disk), repo)
    assert restore_bytes(repo, second.point.id, tmp_path) == expected
    third = run_backup(source, repo)
    assert restore_bytes(repo, third.point.id, tmp_path) == disk.pread(disk.size_bytes, 0)
    assert restore_bytes(repo, first.point.id, tmp_path) == before


def test_backup_of_an_existing_snapshot_keeps_it(setup: tuple[Disk, Repository,
                                                              LocalDiskSource],
                                                 tmp_path: Path) -> None:
    disk, repo, source = setup
    snap = disk.create_snapshot("vm-nightly")
    frozen = disk.open_snapshot("vm-nightly").pread(disk.size_bytes, 0)
    disk.pwrite(b"\x03" * 8192, 0)  # after the snapshot: not in this backup
    report = run_backup(source, repo, BackupOptions(snapshot="vm-nightly"))
    assert report.point.change_id == snap.change_id
    assert [s.name for s in disk.snapshots] == ["vm-nightly"]
    assert restore_bytes(repo, report.point.id, tmp_path) == frozen


def test_the_audit_reads_each_stored_chunk_once_and_neighbours_together(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = Disk.create(tmp_path / "disk", 16 * MiB)
    block = random.Random(2).randbytes(CS)
    for place in range(128):  # 8 MiB of one repeated block: one stored chunk
        disk.pwrite(block, place * CS)
    disk.pwrite(random.Random(3).randbytes(4 * MiB), 8 * MiB)  # 64 chunks, stored in order
    repo = Repository.init(tmp_path / "repo", encryption=TEST_ENCRYPTION)
    source = LocalDiskSource(disk)
    run_backup(source, repo)
    disk.pwrite(b"\x01", 15 * MiB)
    audit_reads: list[tuple[str, int, int]] = []
    read_range = Repository.read_range

    def counted(self: Repository, pack_id: str, offset: int, length: int, label: str) -> bytes:
        if "audit" in label:
            audit_reads.append((pack_id, offset, length))
        return read_range(self, pack_id, offset, length, label)

    monkeypatch.setattr(Repository, "read_range", counted)
    report = run_backup(source, repo, BackupOptions(audit_percent=100, seed=1))
    assert report.kind == "incremental" and report.audit.sampled_chunks == 255
    assert report.audit.tracker_trusted and not report.audit.damaged_areas
    # 65 stored chunks, one pack, stored one after the other: the 4 MiB of them in one read
    # (not 192 reads, one per sampled place that holds data)
    assert len(audit_reads) == 1 and audit_reads[0][2] >= 4 * MiB


def test_the_stored_copy_sample_is_aligned_runs_of_unchanged_chunks() -> None:
    plan = ReadPlan("incremental", [3, 9, 10, 40], None)
    picked = stored_copy_sample(plan, 64 * CS, CS, want=16, run_chunks=8,
                                rng=random.Random(4))
    runs = {index // 8 for index in picked}
    assert len(runs) == 2 and not set(picked) & set(plan.chunks)
    assert picked == sorted(index for run in runs for index in range(run * 8, run * 8 + 8)
                            if index not in plan.chunks)
    everything = stored_copy_sample(plan, 64 * CS + 5, CS, want=61, run_chunks=8,
                                    rng=random.Random(4))
    assert everything == [index for index in range(65) if index not in plan.chunks]
    assert stored_copy_sample(replace(plan, kind="full"), 64 * CS, CS, want=16, run_chunks=8,
                              rng=random.Random(4)) == []


def test_each_chunk_is_as_likely_in_the_stored_copy_sample_as_in_a_scattered_one() -> None:
    plan = ReadPlan("incremental", [0], None)
    trials, total, want = 4000, 1024, 64
    counts = [0] * total
    for seed in range(trials):
        for index in stored_copy_sample(plan, total * CS, CS, want=want, run_chunks=8,
                                        rng=random.Random(seed)):
            counts[index] += 1
    expected = trials * want / total  # 250 each: 64 of 1024 chunks a trial
    sigma = math.sqrt(trials * (want / total) * (1 - want / total))
    assert counts[0] == 0
    assert all(abs(count - expected) < 5 * sigma for count in counts[1:]), \
        (min(counts[1:]), max(counts), expected)


def test_the_audit_reads_stored_copies_in_a_few_ranged_reads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: RepoTarget) -> None:
    """About as many stored chunks as the source sample, read as runs of neighbours: with 10%
    of 1023 unchanged chunks (103) one read per run of 8, not one per chunk."""
    disk = Disk.create(tmp_path / "disk", 64 * MiB)
    disk.pwrite(random.Random(6).randbytes(64 * MiB), 0)
    repo = target.init()
    source = LocalDiskSource(disk)
    run_backup(source, repo)
    disk.pwrite(b"\x01", 5 * MiB)
    audit_reads: list[int] = []
    read_range = Repository.read_range

    def counted(self: Repository, pack_id: str, offset: int, length: int, label: str) -> bytes:
        if "audit" in label:
            audit_reads.append(length)
        return read_range(self, pack_id, offset, length, label)

    monkeypatch.setattr(Repository, "read_range", counted)
    report = run_backup(source, repo, BackupOptions(audit_percent=10, seed=3))
    assert report.kind == "incremental" and report.audit.sampled_chunks == 102
    assert report.audit.tracker_trusted and not report.audit.damaged_areas
    assert 96 <= report.audit.stored_copies_checked <= 104  # 13 runs of 8, less the change
    assert report.point.audit["stored_copies_checked"] == report.audit.stored_copies_checked
    assert len(audit_reads) <= 16  # 13 runs (neighbours share a read; one may span two packs)
    assert sum(audit_reads) >= 90 * CS


def _stored_only(repo: Repository, size: int, changed: list[int], seed: int) -> list[int]:
    """The chunks whose stored copies a backup with ``seed`` reads and whose source it does
    not (the engine draws both samples from one generator, in this order)."""
    plan, rng = ReadPlan("incremental", changed, None), random.Random(seed)
    sample = audit_sample(plan, size, CS, percent=1.0, minimum=16, rng=rng)
    stored = stored_copy_sample(plan, size, CS, want=len(sample),
                                run_chunks=AUDIT_RUN_BYTES // CS, rng=rng)
    return sorted(set(stored) - set(sample))


@pytest.mark.parametrize("lying", [False, True], ids=["same", "tracker-missed"])
def test_a_damaged_copy_found_outside_the_source_sample_is_stored_again(
        tmp_path: Path, lying: bool, target: RepoTarget) -> None:
    """The audit reads the source of a chunk it found damaged in the repository, also where
    its source sample did not take it: the right bytes are stored again, and a source that
    differs from the base (the tracker missed a change) is a mismatch."""
    disk = Disk.create(tmp_path / "disk", 16 * MiB, tracker_class=DropsMarksDuringConsolidation)
    disk.pwrite(random.Random(7).randbytes(16 * MiB), 0)
    repo = target.init()
    source = LocalDiskSource(disk)
    full = run_backup(source, repo)
    place = _stored_only(repo, 16 * MiB, [0], seed=5)[0]
    name = repo.chunk_digests(full.point.id, [place])[place]
    assert name is not None
    target.flip(layout.pack(repo.index[name].pack_id), repo.index[name].offset + 1000)
    disk.create_snapshot("vm-snap")
    disk.pwrite(b"\x01", 5)  # chunk 0: the one change the tracker reports
    consolidation = disk.begin_remove_snapshot("vm-snap")
    if lying:  # written during the consolidation: a change the faulty tracker never saw
        disk.pwrite(b"\x02" * 100, place * CS)
    while not consolidation.step():
        pass
    report = run_backup(source, repo, BackupOptions(seed=5))
    assert report.kind == "incremental"
    assert report.audit.damaged_areas == (Extent(place * CS, CS),)
    assert report.audit.mismatched_areas == ((Extent(place * CS, CS),) if lying else ())
    # where the source changed, the base's bytes are gone: only the base lacks them
    problems = repo.check(read_data=True).problems
    assert [p.affected_points for p in problems] == ([(full.point.id,)] if lying else [])
    assert restore_bytes(repo, report.point.id, tmp_path) == disk.pread(disk.size_bytes, 0)


def test_an_incremental_reads_the_pages_of_its_base_several_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each page of the base that the incremental changes is a round trip on object storage:
    they are read several at once, not one after the other."""
    disk = Disk.create(tmp_path / "disk", 512 * MiB)  # 8 pages of 1024 chunks
    for page in range(8):
        disk.pwrite(b"\x01" * CS, page * 1024 * CS + 3 * CS)
    repo = Repository.init(tmp_path / "repo", encryption=TEST_ENCRYPTION)
    source = LocalDiskSource(disk)
    run_backup(source, repo)
    for page in range(8):
        disk.pwrite(b"\x02", page * 1024 * CS + 7 * CS)
    reading, most = 0, 0
    lock = threading.Lock()
    read_page = Repository.read_page

    def slow(self: Repository, hexname: str, point_id: str = "", kind: int = KIND_PAGE
             ) -> bytes:
        nonlocal reading, most
        with lock:
            reading += 1
            most = max(most, reading)
        time.sleep(0.02)
        try:
            return read_page(self, hexname, point_id, kind)
        finally:
            with lock:
                reading -= 1

    monkeypatch.setattr(Repository, "read_page", slow)
    report = run_backup(source, repo)
    assert report.kind == "incremental" and report.chunks_read == 8
    assert most >= 2
    assert restore_bytes(repo, report.point.id, tmp_path) == disk.pread(disk.size_bytes, 0)


def test_the_pages_of_a_base_that_lie_together_are_read_together(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: RepoTarget) -> None:
    """A backup stores its pages one after the other: the incremental reads the 8 pages of
    its base it changes in one ranged read, not 8 (each a round trip on object storage)."""
    disk = Disk.create(tmp_path / "disk", 512 * MiB)  # 8 pages of 1024 chunks
    for page in range(8):  # pages of different content: 8 page objects
        disk.pwrite(bytes([page + 1]) * CS, page * 1024 * CS + 3 * CS)
    target.init().close()
    source = LocalDiskSource(disk)
    with target.open() as repo:
        run_backup(source, repo)
    for page in range(8):
        disk.pwrite(bytes([page + 11]), page * 1024 * CS + 7 * CS)
    page_reads: list[str] = []
    read_range = Repository.read_range

    def counted(self: Repository, pack_id: str, offset: int, length: int, label: str) -> bytes:
        if label.startswith("page"):
            page_reads.append(label)
        return read_range(self, pack_id, offset, length, label)

    monkeypatch.setattr(Repository, "read_range", counted)
    with target.open() as repo:  # nothing read yet
        report = run_backup(source, repo)
        assert report.kind == "incremental" and report.chunks_read == 8
        assert restore_bytes(repo, report.point.id, tmp_path) == disk.pread(disk.size_bytes, 0)
    # one read of the 8 pages, one of the page table; the restore: the new point's table and
    # its 8 pages, read together again
    assert len(page_reads) == 4, page_reads


def test_a_damaged_page_among_pages_read_together_is_found_as_when_read_alone(
        tmp_path: Path, target: RepoTarget) -> None:
    """Reading pages together changes nothing about a damaged one: it is put in quarantine,
    and the base that needs it is passed over (the backup reads everything, and says why)."""
    disk = Disk.create(tmp_path / "disk", 512 * MiB)
    for page in range(8):
        disk.pwrite(bytes([page + 1]) * CS, page * 1024 * CS + 3 * CS)
    source = LocalDiskSource(disk)
    with target.init() as repo:
        full = run_backup(source, repo)
        page_name = bytes.fromhex(repo.pages_of(full.point)[5])
        loc = repo.index[page_name]
    target.flip(layout.pack(loc.pack_id), loc.offset + loc.length - 3)
    for page in range(8):
        disk.pwrite(bytes([page + 11]), page * 1024 * CS + 7 * CS)
    with target.open() as repo:
        report = run_backup(source, repo)
        assert report.kind == "full"
        assert any(full.point.id in why and page_name.hex() in why
                   for why in report.passed_over), report.passed_over
        assert (page_name, loc.pack_id, loc.offset) in repo.quarantined()
        assert restore_bytes(repo, report.point.id, tmp_path) == disk.pread(disk.size_bytes, 0)


def test_a_restore_of_an_incremental_reads_each_pack_in_long_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In disk order an incremental's changes lie amid its base's chunks; the restore still
    reads the base's pack and the incremental's in long runs, not one read per change."""
    rng = random.Random(5)
    disk = Disk.create(tmp_path / "disk", 16 * MiB)
    disk.pwrite(rng.randbytes(16 * MiB), 0)  # 256 chunks, stored in disk order
    repo = Repository.init(tmp_path / "repo", encryption=TEST_ENCRYPTION)
    source = LocalDiskSource(disk)
    run_backup(source, repo)
    for place in range(3, 256, 8):  # 32 changes, one chunk in every 8
        disk.pwrite(rng.randbytes(CS), place * CS)
    second = run_backup(source, repo)
    assert second.kind == "incremental"
    reads: list[tuple[str, int]] = []
    read_range = Repository.read_range

    def counted(self: Repository, pack_id: str, offset: int, length: int, label: str) -> bytes:
        reads.append((pack_id, length))
        return read_range(self, pack_id, offset, length, label)

    monkeypatch.setattr(Repository, "read_range", counted)
    assert restore_bytes(repo, second.point.id, tmp_path) == disk.pread(disk.size_bytes, 0)
    packs = {pack for pack, _ in reads}
    # at most RANGE_BYTES a read: 16 MiB of base and 2 MiB of changes take a few reads
    # (read one run per change, they took 65)
    assert len(reads) <= 18 * MiB // RANGE_BYTES + 2 * len(packs) < 12
    assert sum(length for _, length in reads) < 19 * MiB


def test_the_audit_finds_a_damaged_repeated_chunk_in_every_place_and_stores_it_once(
        tmp_path: Path) -> None:
    disk = Disk.create(tmp_path / "disk", 4 * MiB)
    block = random.Random(2).randbytes(CS)
    for place in range(0, 4 * MiB, 2 * CS):  # every second chunk holds the same block
        disk.pwrite(block, place)
    repo = Repository.init(tmp_path / "repo", encryption=TEST_ENCRYPTION)
    source = LocalDiskSource(disk)
    full = run_backup(source, repo)
    name = repo.chunk_digests(full.point.id, [0])[0]
    assert name is not None
    flip(object_file(tmp_path / "repo", repo.index[name]), repo.index[name].offset + 1000)
    disk.pwrite(b"\x01", CS + 5)
    report = run_backup(source, repo, BackupOptions(audit_percent=100, seed=1))
    assert report.audit.tracker_trusted
    assert report.audit.damaged_areas == tuple(Extent(place, CS)
                                               for place in range(0, 4 * MiB, 2 * CS))
    assert repo.has_chunk(name) and repo.check(read_data=True).ok
    assert restore_bytes(repo, report.point.id, tmp_path) == disk.pread(disk.size_bytes, 0)
    assert restore_bytes(repo, full.point.id, tmp_path) == block + bytes(CS) + disk.pread(
        disk.size_bytes - 2 * CS, 2 * CS)


class _ShortReads(LocalDiskSource):
    """A source whose reads of more than one chunk come back one byte short (no source here
    does that; one that did must not make a point of less than the disk holds)."""

    def pread(self, snapshot: str, count: int, offset: int) -> bytes | memoryview:
        data = super().pread(snapshot, count, offset)
        return data[:-1] if count > CS else data


def test_a_read_that_comes_back_short_fails_the_backup_and_the_verify(
        setup: tuple[Disk, Repository, LocalDiskSource]) -> None:
    disk, repo, source = setup
    full = run_backup(source, repo).point
    short = _ShortReads(disk)
    with pytest.raises(DiskIOFailure, match=r"bytes of the \d+ asked"):
        run_backup(short, repo, BackupOptions(force_full=True))
    assert [p.id for p in repo.points()] == [full.id]  # nothing was published
    with pytest.raises(DiskIOFailure, match=r"bytes of the \d+ asked"):
        verify_point(repo, full.id, short, None)
    assert verify_point(repo, full.id, source, None).identical
