"""Named scenarios: the CBT failures seen in the field (reference/cbt-field-notes.md §3)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blocktrail.disk import Disk
from blocktrail.errors import (
    DiskBusy,
    InvalidChangeId,
    OutOfRange,
    SnapshotNotFound,
    StaleChangeId,
    UnsupportedFormat,
)
from blocktrail.extents import Extent
from blocktrail.tracking import tracker as tracker_module

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def changed(disk: Disk, change_id: str, snapshot: str | None = None) -> list[Extent]:
    """Every page of the answer, merged."""
    size = disk.open_snapshot(snapshot).size_bytes if snapshot else disk.size_bytes
    out: list[Extent] = []
    start = 0
    while start < size:
        info = disk.query_changed_areas(change_id, start, snapshot)
        out.extend(info.changed_areas)
        start = info.end
    return out


def covers(areas: list[Extent], offset: int, length: int) -> bool:
    return all(any(a.offset <= o < a.end for a in areas) for o in (offset, offset + length - 1))


# F1, F13: consolidation under writes, at every position relative to the copy -----------------

def test_writes_at_every_stage_of_a_consolidation_are_tracked(tmp_path: Path) -> None:
    disk = Disk.create(tmp_path / "d", 8 * MiB, 4 * KiB, cluster_size=64 * KiB)
    for cluster in range(0, 64):
        disk.pwrite(bytes([cluster + 1]) * 64 * KiB, cluster * 64 * KiB)
    disk.create_snapshot("base")
    for cluster in range(0, 64, 2):
        disk.pwrite(b"\xee" * 64 * KiB, cluster * 64 * KiB)
    snap = disk.create_snapshot("s")
    consolidation = disk.begin_remove_snapshot("base")  # merges the 32 frozen clusters down
    written = []
    position = 0
    while not consolidation.step(max_clusters=4):
        position += 4
        for offset in (max(0, position - 2) * 128 * KiB,  # already copied
                       position * 128 * KiB + 4 * KiB,  # being copied next
                       60 * 128 * KiB - 8 * KiB,  # not copied yet
                       7 * MiB + position * 4 * KiB):  # never in any snapshot
            disk.pwrite(b"\x77" * 1000, offset)
            written.append(offset)
    areas = changed(disk, snap.change_id)
    assert all(covers(areas, o, 1000) for o in written)
    for o in written:
        assert disk.pread(1000, o) == b"\x77" * 1000
    assert disk.open_snapshot("s").pread(64 * KiB, 0) == b"\xee" * 64 * KiB
    disk.close()


# F3: grow past power-of-two boundaries ----------------------------------------------------------

def test_grow_past_power_of_two_boundaries(tmp_path: Path) -> None:
    disk = Disk.create(tmp_path / "d", 100 * GiB)
    start = disk.create_snapshot("start")
    size = 100 * GiB
    writes = []
    while size < 1100 * GiB:  # crosses 128, 256, 512 and 1024 GiB in 20 GiB steps, then more
        old = size
        size += 20 * GiB if size < 300 * GiB else 200 * GiB
        disk.resize(size)
        for offset in (old - 4 * KiB, old + 123 * KiB, size - 64 * KiB, 17 * GiB):
            disk.pwrite(b"\x42" * 4 * KiB, offset)
            writes.append(offset)
        areas = changed(disk, start.change_id)
        assert covers(areas, old, size - old), f"grown range {old}..{size} not reported"
        assert all(covers(areas, o, 4 * KiB) for o in writes)
    snap = disk.create_snapshot("end")
    since_start = changed(disk, start.change_id, "end")
    assert covers(since_start, 100 * GiB, size - 100 * GiB)
    assert sum(e.length for e in since_start) < size - 99 * GiB  # the old range is not all dirty
    assert disk.open_snapshot(snap.name).size_bytes == size
    disk.close()


# F19: shrink, then grow: the tail reads zeros and is reported ------------------------------------

@pytest.mark.parametrize("with_snapshot", [False, True])
def test_shrink_then_grow_reads_zeros_and_is_reported(tmp_path: Path,
                                                      with_snapshot: bool) -> None:
    disk = Disk.create(tmp_path / "d", 4 * MiB, 4 * KiB, cluster_size=16 * KiB)
    disk.pwrite(b"\x11" * 4 * MiB, 0)
    if with_snapshot:
        disk.create_snapshot("keep")
    point = disk.create_snapshot("point")
    disk.resize(1 * MiB + 1000)
    disk.resize(4 * MiB)
    assert disk.pread(3 * MiB - 1000, MiB + 1000) == bytes(3 * MiB - 1000)
    assert disk.pread(1000, MiB) == b"\x11" * 1000
    areas = changed(disk, point.change_id)
    assert covers(areas, MiB + 1000, 3 * MiB - 1000)
    assert not covers(areas, 0, 4 * KiB)
    assert disk.open_snapshot("point").pread(4 * MiB, 0) == b"\x11" * 4 * MiB
    disk.close()
    with Disk.open(tmp_path / "d") as reopened:  # and nothing comes back after a reopen
        assert reopened.pread(3 * MiB - 1000, MiB + 1000) == bytes(3 * MiB - 1000)


# revert -------------------------------------------------------------------------------------------

def test_revert_refuses_later_change_ids_and_keeps_earlier_ones(tmp_path: Path) -> None:
    disk = Disk.create(tmp_path / "d", 1 * MiB, 4 * KiB)
    start = disk.current_change_id
    disk.pwrite(b"a" * 4096, 0)
    s1 = disk.create_snapshot("s1")
    disk.pwrite(b"b" * 4096, 8192)
    s2 = disk.create_snapshot("s2")
    disk.pwrite(b"c" * 4096, 65536)
    disk.revert_to_snapshot("s1")
    assert [s.name for s in disk.snapshots] == ["s1"]
    assert disk.pread(4096, 8192) == bytes(4096) and disk.pread(4096, 65536) == bytes(4096)
    with pytest.raises(StaleChangeId, match="reverted past"):
        disk.query_changed_areas(s2.change_id)
    assert changed(disk, start) == [Extent(0, 4096)]
    assert changed(disk, s1.change_id) == []
    disk.pwrite(b"d" * 10, 200000)
    assert changed(disk, s1.change_id) == [Extent(200704 - 4096, 4096)]
    disk.close()


# F20: trim and zero count as changes; trimmed blocks are holes -----------------------------------

def test_trim_is_a_change_and_leaves_a_hole(tmp_path: Path) -> None:
    disk = Disk.create(tmp_path / "d", 4 * MiB, 64 * KiB)
    disk.pwrite(os.urandom(MiB), 0)
    point = disk.create_snapshot("p")
    disk.trim(256 * KiB, 256 * KiB)
    disk.zero(64 * KiB, 640 * KiB)
    assert disk.pread(256 * KiB, 256 * KiB) == bytes(256 * KiB)
    assert changed(disk, point.change_id) == [Extent(256 * KiB, 256 * KiB),
                                              Extent(640 * KiB, 64 * KiB)]
    disk.remove_snapshot("p")
    allocated = changed(disk, "*")
    assert not covers(allocated, 256 * KiB + 4096, 4096), "a trimmed range stays allocated"
    base = next(p for p in (tmp_path / "d").iterdir() if p.suffix == ".img")
    assert base.stat().st_blocks * 512 < 1 * MiB  # holes stay holes
    disk.close()


def test_sparse_two_tib_disk_costs_what_is_written(tmp_path: Path) -> None:
    disk = Disk.create(tmp_path / "d", 2 << 40)
    for i in range(16):
        disk.pwrite(os.urandom(MiB), i * 97 * GiB)
    disk.close()
    used = sum(p.stat().st_blocks * 512 for p in (tmp_path / "d").iterdir())
    assert used < 20 * MiB


# F6, F12: a disk file changed outside blocktrail ----------------------------------------------

def test_layer_file_edited_outside_blocktrail_is_detected(tmp_path: Path) -> None:
    disk = Disk.create(tmp_path / "d", 1 * MiB, 4 * KiB)
    disk.pwrite(b"x" * 4096, 0)
    point = disk.create_snapshot("p")
    disk.close()
    layer = next(p for p in (tmp_path / "d").iterdir() if p.suffix == ".img"
                 and p.stat().st_size > 0)
    with open(layer, "r+b") as f:  # another tool writes the image
        f.seek(500_000)
        f.write(b"foreign")
    with Disk.open(tmp_path / "d") as reopened:
        with pytest.raises(StaleChangeId, match="changed outside blocktrail"):
            reopened.query_changed_areas(point.change_id)
        assert reopened.tracker.epochs[-1].reason.startswith("disk file")
        fresh = reopened.current_change_id
    with Disk.open(tmp_path / "d") as again:  # the new epoch holds after a clean reopen
        assert again.query_changed_areas(fresh).changed_areas == ()


# F5, F10, F27: unclean shutdown ---------------------------------------------------------------

def test_crash_with_intact_intent_log_keeps_change_ids(tmp_path: Path) -> None:
    disk = Disk.create(tmp_path / "d", 64 * MiB, 64 * KiB)
    point = disk.create_snapshot("p")
    disk.pwrite(b"q" * 5000, 3 * MiB + 7)
    disk.abandon()  # killed: no flush, no checkpoint, no clean mark
    with Disk.open(tmp_path / "d") as reopened:
        areas = changed(reopened, point.change_id)
        assert covers(areas, 3 * MiB + 7, 5000)
        assert reopened.tracker.epochs[-1].reason == "tracking started with the disk"


def test_crash_with_lost_intent_log_refuses_change_ids(tmp_path: Path) -> None:
    disk = Disk.create(tmp_path / "d", 64 * MiB, 64 * KiB)
    point = disk.create_snapshot("p")
    disk.pwrite(b"q" * 5000, 3 * MiB)
    disk.flush()
    disk.abandon()
    os.unlink(tmp_path / "d" / "intent.bin")
    with Disk.open(tmp_path / "d") as reopened:
        with pytest.raises(StaleChangeId, match="unclean shutdown"):
            reopened.query_changed_areas(point.change_id)
        assert reopened.pread(5000, 3 * MiB) == b"q" * 5000


def test_crash_with_lost_checkpoint_refuses_change_ids(tmp_path: Path) -> None:
    disk = Disk.create(tmp_path / "d", 64 * MiB, 64 * KiB, intent_region_bytes=MiB)
    since = disk.current_change_id
    disk.pwrite(b"a" * 5000, 0)
    disk.checkpoint()  # the mark at 0 is in open.roar only: its intent bit is cleared
    disk.pwrite(b"b" * 5000, 32 * MiB)
    disk.flush()
    disk.abandon()
    os.unlink(tmp_path / "d" / "open.roar")
    disk = Disk.open(tmp_path / "d")
    with pytest.raises(StaleChangeId, match="unclean shutdown and the tracker checkpoint"):
        disk.query_changed_areas(since)
    assert disk.pread(5000, 0) == b"a" * 5000
    fresh = disk.current_change_id
    disk.pwrite(b"c" * 5000, 16 * MiB)
    disk.abandon()  # a crash before any checkpoint of the new epoch: it holds
    with Disk.open(tmp_path / "d") as reopened:
        assert covers(changed(reopened, fresh), 16 * MiB, 5000)


def test_crash_before_the_first_checkpoint_keeps_change_ids(tmp_path: Path) -> None:
    disk = Disk.create(tmp_path / "d", 64 * MiB, 64 * KiB)
    since = disk.current_change_id
    disk.pwrite(b"q" * 5000, 3 * MiB)
    disk.abandon()  # open.roar is the empty checkpoint written with the disk
    with Disk.open(tmp_path / "d") as reopened:
        assert covers(changed(reopened, since), 3 * MiB, 5000)
        assert reopened.tracker.epochs[-1].reason == "tracking started with the disk"


# F8, F2: reset and tracker upgrade -------------------------------------------------------------

def test_reset_refuses_every_earlier_change_id_at_once(tmp_path: Path) -> None:
    disk = Disk.create(tmp_path / "d", 1 * MiB, 4 * KiB)
    ids = [disk.current_change_id] + [disk.create_snapshot(f"s{i}").change_id for i in range(3)]
    new = disk.reset_tracking()
    for change_id in ids:
        with pytest.raises(StaleChangeId, match="tracking reset by request"):
            disk.query_changed_areas(change_id)
    with pytest.raises(StaleChangeId, match="before the current tracking epoch"):
        disk.query_changed_areas(new, snapshot="s1")
    assert changed(disk, new) == []
    assert changed(disk, "*", "s1") == []
    disk.close()


def test_tracker_format_upgrade_refuses_old_change_ids(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    disk = Disk.create(tmp_path / "d", 1 * MiB, 4 * KiB)
    point = disk.create_snapshot("p")
    disk.close()
    monkeypatch.setattr(tracker_module, "TRACKER_FORMAT", tracker_module.TRACKER_FORMAT + 1)
    with Disk.open(tmp_path / "d") as upgraded, pytest.raises(
            StaleChangeId, match="tracker format upgraded"):
        upgraded.query_changed_areas(point.change_id)
    monkeypatch.undo()
    with pytest.raises(UnsupportedFormat, match="newer blocktrail"):
        Disk.open(tmp_path / "d")  # written by the "newer" tracker


# query API edges (F25, F26) ------------------------------------------------------------------

def test_query_edges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = Disk.create(tmp_path / "d", 1 * MiB, 4 * KiB)
    other = Disk.create(tmp_path / "other", 1 * MiB, 4 * KiB)
    start = disk.current_change_id
    for i in range(0, 256, 2):
        disk.pwrite(b"z", i * 4096 + 100)
    info = disk.query_changed_areas(start, 4096 * 10 + 17)  # unaligned start offset
    assert info.changed_areas[0] == Extent(4096 * 10 + 17, 4096 - 17)
    assert all(e.offset % 4096 == 0 for e in info.changed_areas[1:])
    monkeypatch.setattr(tracker_module, "MAX_EXTENTS_PER_ANSWER", 10)
    page = disk.query_changed_areas(start)
    assert len(page.changed_areas) == 10 and page.length == 19 * 4096  # a prefix
    assert len(changed(disk, start)) == 128
    with pytest.raises(OutOfRange):
        disk.query_changed_areas(start, 1 * MiB)
    with pytest.raises(OutOfRange):
        disk.query_changed_areas(start, -1)
    with pytest.raises(InvalidChangeId, match="does not belong"):
        disk.query_changed_areas(other.current_change_id)
    epoch = start.split("/")[0]
    with pytest.raises(InvalidChangeId, match="future"):
        disk.query_changed_areas(f"{epoch}/5")
    for garbage in ("", "x/1", f"{epoch}/-1", f"{epoch}", f"{epoch}/1/2"):
        with pytest.raises(InvalidChangeId):
            disk.query_changed_areas(garbage)
    with pytest.raises(SnapshotNotFound):
        disk.query_changed_areas(start, snapshot="nope")
    s1 = disk.create_snapshot("s1")
    with pytest.raises(InvalidChangeId, match="newer than the snapshot"):
        disk.create_snapshot("s2") and disk.query_changed_areas(
            disk.snapshots[-1].change_id, snapshot="s1")
    assert disk.query_changed_areas(s1.change_id, snapshot="s1").changed_areas == ()
    with pytest.raises(OutOfRange):
        disk.pwrite(b"x", 1 * MiB)
    with pytest.raises(DiskBusy):
        Disk.open(tmp_path / "d")
    disk.close()
    other.close()
