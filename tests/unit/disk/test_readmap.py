"""Disk.map_read: a read mapped to layer files reads the same bytes as pread, for the live disk
and every snapshot, and keeps reading them after the layers it maps to are merged and deleted,
also after its own snapshot is removed (the merge into that snapshot's layer waits for it)."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

from blocktrail.disk import Disk, consolidation
from blocktrail.errors import OutOfRange, SnapshotNotFound, SnapshotReadsInFlight
from blocktrail.simfileio import SimulatedFileIO

MiB = 1 << 20


def _scribble(disk: Disk, rng: random.Random, count: int) -> None:
    for _ in range(count):
        length = rng.choice((1, 512, 4096, 65536, 300_000))
        offset = rng.randrange(0, disk.size_bytes - length)
        action = rng.random()
        if action < 0.8:
            disk.pwrite(rng.randbytes(length), offset)
        elif action < 0.9:
            disk.zero(length, offset)
        else:
            disk.trim(length, offset)


@pytest.mark.parametrize("seed", range(4))
def test_mapped_reads_equal_preads(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    with Disk.create(tmp_path / "d", 8 * MiB) as disk:
        for name in ("a", "b", "c"):
            _scribble(disk, rng, 30)
            disk.create_snapshot(name)
            if name == "b":
                disk.resize(6 * MiB)  # shrink: the top hides what lies past the end
        _scribble(disk, rng, 30)
        for snapshot in (None, "a", "b", "c"):
            view = disk if snapshot is None else disk.open_snapshot(snapshot)
            size = disk.size_bytes if snapshot is None else view.size_bytes  # type: ignore[union-attr]
            for _ in range(40):
                length = rng.randrange(1, 2 * MiB)
                offset = rng.randrange(0, size - length)
                with disk.map_read(length, offset, snapshot) as mapped:  # type: ignore[union-attr]
                    assert sum(s.length for s in mapped.segments) == length
                    assert mapped.read() == view.pread(length, offset)


def test_a_mapped_read_survives_the_merge_of_its_layers(tmp_path: Path) -> None:
    with Disk.create(tmp_path / "d", 4 * MiB) as disk:
        disk.pwrite(b"a" * MiB, 0)
        disk.create_snapshot("s1")
        disk.pwrite(b"b" * 65536, 65536)
        disk.create_snapshot("s2")
        mapped = disk.map_read(2 * MiB, 0, "s2")
        assert mapped is not None
        expected = disk.open_snapshot("s2").pread(2 * MiB, 0)
        disk.remove_snapshot("s1")  # merges layers and deletes their files
        disk.remove_snapshot("s2")
        assert mapped.read() == expected
        mapped.close()


def test_a_base_image_shorter_than_the_disk_maps_zeros(tmp_path: Path) -> None:
    with Disk.create(tmp_path / "d", 4 * MiB) as disk:
        disk.pwrite(b"x" * 1000, 0)  # the base file is 1000 bytes long
        with disk.map_read(8192, 0) as mapped:  # type: ignore[union-attr]
            assert [(s.offset, s.length, s.is_zero) for s in mapped.segments] == [
                (0, 1000, False), (1000, 7192, True)]
            assert mapped.read() == b"x" * 1000 + bytes(7192)


def test_files_without_descriptors_carry_their_bytes(tmp_path: Path) -> None:
    with Disk.create("/d", MiB, fileio=SimulatedFileIO()) as disk:
        disk.pwrite(b"y" * 4096, 4096)
        with disk.map_read(8192, 0) as mapped:  # type: ignore[union-attr]
            assert all(s.fd is None for s in mapped.segments)
            assert mapped.read() == bytes(4096) + b"y" * 4096


def test_busy_and_out_of_range(tmp_path: Path) -> None:
    with Disk.create(tmp_path / "d", MiB) as disk:
        with pytest.raises(OutOfRange):
            disk.map_read(4096, MiB - 100)
        with disk.io_paused():  # a writer holds the disk: no waiting when asked not to
            result: list[object] = []
            thread = threading.Thread(target=lambda: result.append(
                disk.map_read(4096, 0, wait=False)))
            thread.start()
            thread.join(10)
            assert result == [None]


def _two_snapshots(disk: Disk) -> None:
    disk.pwrite(b"A" * 4096, 0)
    disk.create_snapshot("s1")
    disk.pwrite(b"B" * 4096, 0)
    disk.create_snapshot("s2")  # removing s1 merges s2's layer into s1's, in place


def test_a_removed_snapshots_mapped_read_still_reads_its_bytes(tmp_path: Path) -> None:
    with Disk.create(tmp_path / "d", MiB, 4096, cluster_size=4096) as disk:
        _two_snapshots(disk)
        mapped = disk.map_read(4096, 0, "s1")
        assert mapped is not None
        removing = disk.begin_remove_snapshot("s1")
        assert [s.name for s in disk.snapshots] == ["s2"]  # gone for every new reader
        with pytest.raises(SnapshotNotFound):
            disk.map_read(4096, 0, "s1")
        assert not removing.step() and removing.reads_in_flight == 1  # nothing merged
        with pytest.raises(SnapshotReadsInFlight):
            removing.run(wait_seconds=0)
        assert mapped.read() == b"A" * 4096
        mapped.close()
        removing.run()
        assert removing.done and disk.open_snapshot("s2").pread(4, 0) == b"BBBB"


def test_the_merge_waits_for_the_reads_outside_the_lock(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    with Disk.create(tmp_path / "d", MiB, 4096, cluster_size=4096) as disk:
        _two_snapshots(disk)
        mapped = disk.map_read(4096, 0, "s1")
        assert mapped is not None
        waiting = threading.Event()
        wait = disk._stack.wait_unpinned

        def waits(change_id: str, timeout: float) -> bool:
            waiting.set()
            return wait(change_id, timeout)

        monkeypatch.setattr(disk._stack, "wait_unpinned", waits)
        remover = threading.Thread(target=disk.remove_snapshot, args=("s1",))
        remover.start()
        assert waiting.wait(10)
        assert disk.pread(4, 0) == b"BBBB"  # guest I/O goes on meanwhile
        assert mapped.read() == b"A" * 4096
        mapped.close()
        remover.join(10)
        assert not remover.is_alive()
        assert [s.name for s in disk.snapshots] == ["s2"] and len(disk._layers) == 2


def test_a_merge_that_cannot_start_is_left_for_later(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consolidation, "READS_WAIT_SECONDS", 0.0)
    path = tmp_path / "d"
    disk = Disk.create(path, MiB, 4096, cluster_size=4096)
    _two_snapshots(disk)
    s2 = disk.snapshots[1]
    mapped = disk.map_read(4096, 0, "s1")
    assert mapped is not None
    disk.remove_snapshot("s1")  # removed; its merge waits for the read
    assert [s.name for s in disk.snapshots] == ["s2"] and len(disk._layers) == 3
    with pytest.raises(SnapshotReadsInFlight):
        disk.resize(2 * MiB)  # a change of the layers finishes the merge first: not yet
    disk.close()  # closes without it
    assert mapped.read() == b"A" * 4096
    mapped.close()
    with Disk.open(path) as disk:  # the open finishes it, the change IDs still good
        assert len(disk._layers) == 2 and disk.open_snapshot("s2").pread(4, 0) == b"BBBB"
        disk.query_changed_areas(s2.change_id)  # not stale: no tracking restart
