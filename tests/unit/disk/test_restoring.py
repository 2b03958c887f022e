"""A disk restored instantly from a restore point (a `ChunkSource`): its content is the point's
at once, whatever is local yet; writes are tracked from the first one against the point's change
ID; a chunk that cannot be fetched fails that read and never reads as zeros; the fill makes the
base local and the disk an ordinary one."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blocktrail.disk import Disk
from blocktrail.disk.layers import BaseLayer
from blocktrail.disk.restoring import ChunkUnavailable, RestoringLayer
from blocktrail.errors import InvalidChangeId, StaleChangeId

CHUNK = 64 * 1024
SIZE = 4 << 20
POINT_EPOCH = "0b8e6c1f-2d5a-4f27-9b1e-6f3a0d7c9e42"
POINT_ID = f"{POINT_EPOCH}/7"


class MemorySource:
    """A restore point held in memory; ``broken`` chunks cannot be fetched."""

    def __init__(self, content: bytes, broken: set[int] | None = None) -> None:
        self.content = content
        self.broken = broken or set()
        self.fetched: list[int] = []
        self.lock = threading.Lock()
        self.closed = False

    @property
    def chunk_size(self) -> int:
        return CHUNK

    @property
    def size_bytes(self) -> int:
        return len(self.content)

    def holes(self) -> list[bool]:
        return [not any(self.content[i : i + CHUNK]) for i in range(0, len(self.content), CHUNK)]

    def fetch(self, indexes: list[int]) -> Iterator[tuple[int, bytes]]:
        for index in indexes:
            if index in self.broken:
                raise ChunkUnavailable(f"chunk {index} of restore point P is damaged")
            with self.lock:
                self.fetched.append(index)
            yield index, self.content[index * CHUNK : (index + 1) * CHUNK]

    def describe(self) -> dict[str, Any]:
        return {"repository": "/nowhere", "point": "P"}

    def close(self) -> None:
        self.closed = True


def point_content(seed: int = 1) -> bytes:
    rng = random.Random(seed)
    out = bytearray(SIZE)
    for index in range(SIZE // CHUNK):
        if rng.random() < 0.6:
            out[index * CHUNK : (index + 1) * CHUNK] = rng.randbytes(CHUNK)
    return bytes(out)


def test_content_is_the_points_before_any_fill(tmp_path: Path) -> None:
    content = point_content()
    source = MemorySource(content)
    with Disk.create_restored(tmp_path / "d", source, POINT_ID, granularity=4096) as disk:
        assert disk.restore_progress is not None and disk.restore_progress.local == 0
        assert disk.pread(100, CHUNK * 3 + 5) == content[CHUNK * 3 + 5 : CHUNK * 3 + 105]
        assert source.fetched[0] == 3
        assert disk.pread(SIZE, 0) == content
        holes = sum(source.holes())
        assert sorted(set(source.fetched)) == [i for i, h in enumerate(source.holes())
                                               if not h]
        assert disk.restore_progress.local == SIZE // CHUNK - holes


def test_writes_are_tracked_against_the_points_change_id(tmp_path: Path) -> None:
    content = point_content()
    with Disk.create_restored(tmp_path / "d", MemorySource(content), POINT_ID,
                              granularity=4096) as disk:
        disk.pwrite(b"x" * 5000, 70000)
        disk.zero(4096, 2 * CHUNK)
        areas = disk.query_changed_areas(POINT_ID).changed_areas
        assert [(e.offset, e.length) for e in areas] == [(69632, 8192), (131072, 4096)]
        with pytest.raises(StaleChangeId, match="restored from"):
            disk.query_changed_areas(f"{POINT_EPOCH}/6")
        with pytest.raises(StaleChangeId):  # the original disk's later point
            disk.query_changed_areas(f"{POINT_EPOCH}/8")
        with pytest.raises(InvalidChangeId):
            disk.query_changed_areas("11111111-2d5a-4f27-9b1e-6f3a0d7c9e42/7")
        snap = disk.create_snapshot("after")
        assert [(e.offset, e.length) for e in disk.query_changed_areas(
            POINT_ID, snapshot="after").changed_areas] == [(69632, 8192), (131072, 4096)]
        assert disk.query_changed_areas(snap.change_id).changed_areas == ()


def test_a_broken_chunk_fails_its_reads_and_no_other(tmp_path: Path) -> None:
    content = point_content()
    data_chunks = [i for i, h in enumerate(MemorySource(content).holes()) if not h]
    bad = data_chunks[5]
    with Disk.create_restored(tmp_path / "d", MemorySource(content, {bad}), POINT_ID) as disk:
        with pytest.raises(ChunkUnavailable, match=f"chunk {bad}"):
            disk.pread(10, bad * CHUNK + 7)
        with pytest.raises(ChunkUnavailable):
            disk.pread(3 * CHUNK, (bad - 1) * CHUNK)
        assert disk.pread(CHUNK, data_chunks[4] * CHUNK) == \
            content[data_chunks[4] * CHUNK : (data_chunks[4] + 1) * CHUNK]
        with pytest.raises(ChunkUnavailable):
            while True:
                progress = disk.fill(8)
                assert progress is not None and not progress.done
        # a write over the whole broken chunk needs nothing from it
        disk.pwrite(b"w" * CHUNK, bad * CHUNK)
        assert disk.pread(CHUNK, bad * CHUNK) == b"w" * CHUNK


class SkippingSource(MemorySource):
    """As a repository reads: every chunk that can be had is yielded (in another order than
    asked), then the first that could not be is named."""

    def fetch(self, indexes: list[int]) -> Iterator[tuple[int, bytes]]:
        good = [i for i in reversed(indexes) if i not in self.broken]
        yield from MemorySource.fetch(self, good)
        bad = [i for i in indexes if i in self.broken]
        if bad:
            raise ChunkUnavailable(f"chunk {bad[0]} of restore point P is damaged")


@pytest.mark.parametrize("source", [MemorySource, SkippingSource])
def test_a_sequential_read_fails_only_for_its_own_chunks_not_those_read_ahead(
        tmp_path: Path, source: type[MemorySource]) -> None:
    """A read that goes on from the last one also fetches the chunks after it; one of those
    that cannot be had fails the read that needs it, not the reads before it."""
    content = bytes(range(1, 65)) * (SIZE // 64)  # every chunk holds data
    bad = 10
    with Disk.create_restored(tmp_path / "d", source(content, {bad}), POINT_ID) as disk:
        for index in range(bad):  # in order: each read ahead reaches the broken chunk
            assert disk.pread(CHUNK, index * CHUNK) == content[index * CHUNK:(index + 1) * CHUNK]
        with pytest.raises(ChunkUnavailable, match=f"chunk {bad} of restore point P"):
            disk.pread(CHUNK, bad * CHUNK)
        start = (bad + 1) * CHUNK
        assert disk.pread(CHUNK, start) == content[start:start + CHUNK]


def test_fill_to_the_end_makes_an_ordinary_disk(tmp_path: Path) -> None:
    content = point_content()
    path = tmp_path / "d"
    source = MemorySource(content)
    disk = Disk.create_restored(path, source, POINT_ID, granularity=4096)
    disk.pwrite(b"y" * 9000, 123456)
    expected = bytearray(content)
    expected[123456 : 123456 + 9000] = b"y" * 9000
    fills = 0
    while True:
        progress = disk.fill(5)
        fills += 1
        assert progress is not None
        if progress.done:
            break
    assert fills > 3
    assert disk.restore_progress is None and source.closed
    assert isinstance(disk._layers[0], BaseLayer) and len(disk._layers) == 1
    assert disk.pread(SIZE, 0) == bytes(expected)
    assert [(e.offset, e.length) for e in disk.query_changed_areas(POINT_ID).changed_areas] \
        == [(122880, 12288)]
    disk.close()
    with Disk.open(path) as again:  # no source needed any more
        assert again.pread(SIZE, 0) == bytes(expected)
        again.query_changed_areas(POINT_ID)


def test_crash_mid_fill_resumes(tmp_path: Path) -> None:
    content = point_content()
    path = tmp_path / "d"
    disk = Disk.create_restored(path, MemorySource(content), POINT_ID)
    disk.fill(10)
    disk.pwrite(b"z" * 100, 0)
    disk.flush()
    disk.abandon()
    with pytest.raises(ChunkUnavailable, match="no source is open"), Disk.open(path) as orphan:
        local = orphan.restore_progress
        assert local is not None and 0 < local.local < local.chunks
        orphan.pread(SIZE, 0)
    source = MemorySource(content)
    with Disk.open(path, chunk_sources=lambda info: source) as disk:
        assert info_is_recorded(disk)
        while not disk.fill(16).done:  # type: ignore[union-attr]
            pass
        assert disk.pread(SIZE, 0) == b"z" * 100 + content[100:]
    assert len(set(source.fetched)) < sum(not h for h in source.holes())  # resumed


def info_is_recorded(disk: Disk) -> bool:
    base = disk._layers[0]
    return isinstance(base, RestoringLayer) and base.source_info == {
        "repository": "/nowhere", "point": "P"}


def test_unfetched_reads_are_not_mapped_without_waiting(tmp_path: Path) -> None:
    content = point_content()
    with Disk.create_restored(tmp_path / "d", MemorySource(content), POINT_ID) as disk:
        data_chunk = next(i for i, h in enumerate(MemorySource(content).holes()) if not h)
        assert disk.map_read(4096, data_chunk * CHUNK, wait=False) is None
        with disk.map_read(4096, data_chunk * CHUNK) as mapped:  # type: ignore[union-attr]
            assert mapped.read() == content[data_chunk * CHUNK : data_chunk * CHUNK + 4096]
        mapped_now = disk.map_read(4096, data_chunk * CHUNK, wait=False)
        assert mapped_now is not None
        mapped_now.close()


def test_snapshots_and_removals_while_restoring(tmp_path: Path) -> None:
    content = point_content()
    with Disk.create_restored(tmp_path / "d", MemorySource(content), POINT_ID,
                              granularity=4096) as disk:
        disk.pwrite(b"1" * 70000, 0)
        disk.create_snapshot("s1")
        disk.pwrite(b"2" * 5000, 300000)
        disk.create_snapshot("s2")
        disk.remove_snapshot("s1")
        disk.revert_to_snapshot("s2")
        expected = bytearray(content)
        expected[0:70000] = b"1" * 70000
        expected[300000:305000] = b"2" * 5000
        assert disk.pread(SIZE, 0) == bytes(expected)
        while not disk.fill(32).done:  # type: ignore[union-attr]
            pass
        assert disk.pread(SIZE, 0) == bytes(expected)
        assert disk.open_snapshot("s2").pread(SIZE, 0) == bytes(expected)


def test_a_broken_chunk_does_not_hold_up_the_fill_of_the_chunks_after_it(tmp_path: Path) -> None:
    content = point_content()
    data_chunks = [i for i, h in enumerate(MemorySource(content).holes()) if not h]
    bad = data_chunks[3]
    source = MemorySource(content, {bad})
    with Disk.create_restored(tmp_path / "d", source, POINT_ID) as disk:
        failures = 0
        for _ in range(4 * len(data_chunks)):
            try:
                progress = disk.fill(4)
            except ChunkUnavailable:
                failures += 1
                continue
            assert progress is not None
        progress = disk.restore_progress
        assert progress is not None and progress.remaining == 1  # every chunk but the bad one
        assert failures >= 2  # tried again each time the fill came round
        source.broken.clear()
        while not disk.fill(4).done:  # type: ignore[union-attr]
            pass
        assert disk.restore_progress is None
        assert disk.pread(SIZE, 0) == content


def test_a_point_without_a_change_id_restores_into_a_new_epoch(tmp_path: Path) -> None:
    content = point_content()
    with Disk.create_restored(tmp_path / "d", MemorySource(content), None,
                              granularity=4096) as disk:
        assert disk.pread(SIZE, 0) == content
        assert disk.tracker.epochs[-1].inherits is None
        with pytest.raises(InvalidChangeId):  # another disk's history
            disk.query_changed_areas(POINT_ID)


def test_the_source_the_io_counter_and_the_origin_are_visible(tmp_path: Path) -> None:
    content = point_content()
    source = MemorySource(content)
    with Disk.create_restored(tmp_path / "d", source, POINT_ID) as disk:
        assert disk.restore_source is source
        assert disk.restore_origin == {"repository": "/nowhere", "point": "P"}
        before = disk.io_requests
        disk.pread(10, 0)
        disk.pwrite(b"x", 5)
        disk.zero(10, 100)
        with disk.map_read(10, 0) as mapped:  # type: ignore[union-attr]
            mapped.read()
        assert disk.io_requests == before + 4
        disk.fill(1 << 20)  # the fill is no guest I/O
        assert disk.io_requests == before + 4
        assert disk.restore_source is None and disk.restore_origin is None
