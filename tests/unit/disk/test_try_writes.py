"""The event loop's write path: `Disk.try_pwrite` and `Disk.try_zero` do the write at once or
nothing, through the same choke point as `pwrite` and `zero` (marked in the tracker first), and
take any buffer without keeping it."""

from __future__ import annotations

from pathlib import Path

import pytest

from blocktrail.disk import Disk
from blocktrail.tracking import tracker as tracker_module

SIZE = 4 << 20
CLUSTER = 64 << 10


def _changed(disk: Disk, since: str) -> list[tuple[int, int]]:
    info = disk.query_changed_areas(since)
    return [(int(o), int(n)) for o, n in zip(info.offsets, info.lengths, strict=True)]


def _disk(path: Path) -> Disk:
    """A disk with one write-intent region, made durable by a write at 3 clusters (a write
    whose region is not durable yet waits for its sync: never done at once)."""
    disk = Disk.create(path, SIZE, cluster_size=CLUSTER, intent_region_bytes=SIZE)
    disk.pwrite(b"x" * (2 * CLUSTER), 0)
    return disk


def test_try_zero_zeroes_and_is_tracked(tmp_path: Path) -> None:
    with _disk(tmp_path / "d") as disk:
        since = disk.create_snapshot("s").change_id
        assert not disk.try_zero(CLUSTER, CLUSTER)  # the region's intent is not durable
        disk.pwrite(b"y" * CLUSTER, 3 * CLUSTER)  # now it is
        assert disk.try_zero(CLUSTER, CLUSTER)  # a whole cluster of the delta: at once
        assert disk.pread(2 * CLUSTER, 0) == b"x" * CLUSTER + bytes(CLUSTER)
        assert _changed(disk, since) == [(CLUSTER, CLUSTER), (3 * CLUSTER, CLUSTER)]


def test_try_zero_of_part_of_a_cluster_below_waits_for_the_worker(tmp_path: Path) -> None:
    with _disk(tmp_path / "d") as disk:
        since = disk.create_snapshot("s").change_id
        disk.pwrite(b"y" * CLUSTER, 3 * CLUSTER)
        assert not disk.try_zero(512, 0)  # needs a copy-up: nothing done
        assert disk.pread(CLUSTER, 0) == b"x" * CLUSTER
        assert _changed(disk, since) == [(3 * CLUSTER, CLUSTER)]
        disk.zero(512, 0)
        assert disk.pread(CLUSTER, 0) == bytes(512) + b"x" * (CLUSTER - 512)


def test_writes_take_buffers_without_keeping_them(tmp_path: Path) -> None:
    with _disk(tmp_path / "d") as disk:
        disk.create_snapshot("s")  # writes go to a delta, in cluster pieces
        disk.pwrite(b"y" * CLUSTER, 3 * CLUSTER)
        buffer = bytearray(b"a" * (3 * CLUSTER))
        assert disk.try_pwrite(buffer, CLUSTER)  # whole clusters: no copy-up
        buffer[:] = b"b" * len(buffer)  # reused at once, as the NBD server does
        disk.pwrite(memoryview(buffer)[:CLUSTER], 0)
        buffer[:] = b"c" * len(buffer)
        assert disk.pread(4 * CLUSTER, 0) == b"b" * CLUSTER + b"a" * (3 * CLUSTER)


def test_try_pwrite_with_a_checkpoint_due_leaves_it_to_the_worker(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with _disk(tmp_path / "d") as disk:
        since = disk.create_snapshot("s").change_id
        disk.pwrite(b"y" * CLUSTER, 3 * CLUSTER)
        monkeypatch.setattr(tracker_module, "CHECKPOINT_EVERY_S", -1.0)  # always due
        assert not disk.try_pwrite(b"z" * CLUSTER, CLUSTER)  # nothing recorded, nothing written
        assert disk.pread(CLUSTER, CLUSTER) == b"x" * CLUSTER
        assert _changed(disk, since) == [(3 * CLUSTER, CLUSTER)]
        monkeypatch.setattr(tracker_module, "CHECKPOINT_EVERY_S", 3600.0)
        assert disk.try_pwrite(b"z" * CLUSTER, CLUSTER)
        assert _changed(disk, since) == [(CLUSTER, CLUSTER), (3 * CLUSTER, CLUSTER)]
