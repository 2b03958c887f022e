"""Dirty-map questions answered on the event loop (`Target.block_status_now`) get the bytes, or
the error, a worker thread's `block_status` gives; a large one, one that would wait, and
``base:allocation`` are left to the worker."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from blocktrail.disk import Disk
from blocktrail.host import exports
from blocktrail.host.exports import DiskCatalog
from blocktrail.nbd.proto import Command, CommandFlag, Request
from blocktrail.nbd.proto.constants import BASE_ALLOCATION, DIRTY_BITMAP_PREFIX, STATE_DIRTY
from blocktrail.nbd.proto.errors import RequestFailed
from blocktrail.tracking import ChangeTracker

MiB = 1 << 20
SIZE = 64 * MiB
GRAIN = 64 << 10


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    with Disk.create(str(tmp_path / "d0"), SIZE) as disk:
        yield disk


def status(offset: int, length: int, *, one: bool = False) -> Request:
    return Request(1, Command.BLOCK_STATUS, CommandFlag.REQ_ONE if one else CommandFlag(0),
                   offset, length)


def test_answers_at_once_equal_the_workers(disk: Disk) -> None:
    since = disk.create_snapshot("s0").change_id
    for block in (0, 1, 2, 7, 100, 101, 1023):  # runs, single blocks, the last block
        disk.pwrite(b"x" * GRAIN, block * GRAIN)
    disk.create_snapshot("s1")
    disk.pwrite(b"y" * 10, 500 * GRAIN + 3)  # live only
    contexts = {1: DIRTY_BITMAP_PREFIX + since, 2: DIRTY_BITMAP_PREFIX + since + "x"}
    catalog = DiskCatalog.of({"d0": disk})
    for name in ("d0", "d0@s1"):
        target = catalog.target(name)
        assert target is not None
        for request in (status(0, SIZE), status(GRAIN + 5, 9 * GRAIN), status(0, SIZE, one=True),
                        status(3 * GRAIN, SIZE - 3 * GRAIN, one=True), status(SIZE - 1, 1)):
            one = {1: contexts[1]}
            now = target.block_status_now(request, one)
            assert now is not None
            assert now == target.block_status(request, one)
        with pytest.raises(RequestFailed) as at_once:  # the second context is no change ID
            target.block_status_now(status(0, SIZE), contexts)
        with pytest.raises(RequestFailed) as on_worker:
            target.block_status(status(0, SIZE), contexts)
        assert (at_once.value.errno, at_once.value.message) == \
            (on_worker.value.errno, on_worker.value.message)
        with pytest.raises(RequestFailed):  # past the end: the same refusal
            target.block_status_now(status(SIZE - 1, 2), {1: contexts[1]})


def test_large_or_allocation_questions_go_to_a_worker(disk: Disk,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    since = disk.create_snapshot("s0").change_id
    for block in range(0, 40, 2):
        disk.pwrite(b"x" * GRAIN, block * GRAIN)
    disk.create_snapshot("s1")
    target = DiskCatalog.of({"d0": disk}).target("d0@s1")
    assert target is not None
    dirty = {1: DIRTY_BITMAP_PREFIX + since}
    monkeypatch.setattr(exports, "NOW_BLOCK_STATUS_GRANULES", 19)
    assert target.block_status_now(status(0, SIZE), dirty) is None  # 20 granules: a worker's
    # the bound counts the granules inside the window asked for, not the whole disk's
    window = target.block_status_now(status(0, GRAIN), dirty)
    assert window is not None
    monkeypatch.setattr(exports, "NOW_BLOCK_STATUS_GRANULES", 0)
    assert target.block_status_now(status(SIZE - GRAIN, GRAIN), dirty) is not None  # none
    assert target.block_status_now(status(0, GRAIN), dirty) is None
    assert target.block_status_now(status(0, SIZE), {1: BASE_ALLOCATION}) is None
    assert target.block_status_now(status(0, SIZE), {1: BASE_ALLOCATION, 2: dirty[1]}) is None
    monkeypatch.setattr(exports, "NOW_BLOCK_STATUS_GRANULES", 20)
    whole = target.block_status_now(status(0, SIZE), dirty)  # 20 granules: at once, and kept
    assert whole is not None
    monkeypatch.setattr(exports, "NOW_BLOCK_STATUS_GRANULES", 0)
    # a snapshot's answer, kept, costs no join any more: at once, whatever the window
    assert target.block_status_now(status(0, SIZE), dirty) == whole
    assert target.block_status_now(status(0, GRAIN), dirty) == window
    assert target.block_status(status(0, SIZE), dirty) == whole

def test_a_question_that_would_wait_goes_to_a_worker(disk: Disk) -> None:
    since = disk.create_snapshot("s0").change_id
    disk.pwrite(b"x" * GRAIN, 0)
    assert disk.try_query_changed_areas(since, max_granules=10) is not None
    assert disk.try_query_changed_areas("*", max_granules=10) is None  # allocation: never
    s1 = disk.create_snapshot("s1")
    disk.query_changed_areas(since, 0, s1)  # kept whole
    assert disk.try_first_changed_area(since, 0, s1) == (0, GRAIN)
    assert disk.try_first_changed_area("*", 0, s1) is None  # allocation: never
    held, release = threading.Event(), threading.Event()

    def change_structure() -> None:  # as a snapshot being taken holds the disk
        with disk._lock:
            held.set()
            release.wait(10)

    thread = threading.Thread(target=change_structure)
    thread.start()
    try:
        assert held.wait(10)
        assert disk.try_query_changed_areas(since, max_granules=10) is None
        assert disk.try_first_changed_area(since, 0, s1) is None
    finally:
        release.set()
        thread.join()
    assert disk.try_query_changed_areas(since, max_granules=0) is None  # too large


def test_an_answer_of_more_areas_than_a_reply_carries_stops_where_the_reply_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past `MAX_DESCRIPTORS` the areas further on are not even looked up: the reply covers
    a prefix of the request (the client asks again from its end), exactly."""
    monkeypatch.setattr(exports, "MAX_DESCRIPTORS", 64)
    blocks = list(range(0, 1000, 3))  # 334 areas apart from each other
    with Disk.create(str(tmp_path / "d1"), SIZE) as disk:
        since = disk.create_snapshot("s0").change_id
        for block in blocks:
            disk.pwrite(b"z", block * GRAIN)
        queries: list[int] = []
        query = disk.query_changed_areas

        def counted(*args: object, **kwargs: int) -> object:  # a disk answering 50 at most
            queries.append(kwargs["max_extents"])
            kwargs["max_extents"] = min(kwargs["max_extents"], 50)
            return query(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(disk, "query_changed_areas", counted)
        target = DiskCatalog.of({"d1": disk}).target("d1")
        assert target is not None
        (_, payload), = target.block_status(status(0, SIZE), {1: DIRTY_BITMAP_PREFIX + since})
    pairs = [(int.from_bytes(payload[i:i + 4], "big"), int.from_bytes(payload[i + 4:i + 8], "big"))
             for i in range(0, len(payload), 8)]
    assert len(pairs) == 64 and queries == [64, 14]  # not all 7 windows of 50 areas
    pos = 0
    for length, flags in pairs:  # every descriptor says what the disk holds
        marked = {b for b in blocks if pos // GRAIN <= b < (pos + length) // GRAIN}
        assert (flags == STATE_DIRTY) == bool(marked) and length % GRAIN == 0
        if flags == STATE_DIRTY:
            assert marked == set(range(pos // GRAIN, (pos + length) // GRAIN))
        pos += length
    assert 0 < pos < SIZE


@pytest.mark.parametrize("kept", [True, False])
def test_one_extent_from_any_offset_is_the_first_of_the_whole_answer(
        disk: Disk, kept: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """REQ_ONE (QEMU asks so): the extent from an offset, whole, whether it ends inside the first
    window looked at or far past it, from a snapshot's answer kept whole (its first area alone,
    `Disk.try_first_changed_area`) or not (the growing windows), and from the live disk; also
    when the request ends before the disk does."""
    if not kept:  # every window joined afresh
        monkeypatch.setattr(ChangeTracker, "_closed_runs", lambda self, joined, up_to: None)
    since = disk.create_snapshot("s0").change_id
    runs = [(0, 1), (3, 40), (60, 61), (62, 63), (200, 330), (900, 1024)]  # granules
    for first, end in runs:
        disk.pwrite(b"d" * ((end - first) * GRAIN), first * GRAIN)
    disk.create_snapshot("s1")
    disk.pwrite(b"e" * GRAIN, 500 * GRAIN)
    dirty = {1: DIRTY_BITMAP_PREFIX + since}
    offsets = sorted({g * GRAIN + d for first, end in runs for g in (first, end - 1, end)
                      for d in (0, 1) if g * GRAIN + d < SIZE} | {100 * GRAIN + 7, 499 * GRAIN})
    for name in ("d0@s1", "d0"):
        target = DiskCatalog.of({"d0": disk}).target(name)
        assert target is not None
        for offset in offsets:
            for length in {SIZE - offset, *(min(n, SIZE - offset) for n in (1, GRAIN + 3))}:
                (_, one), = target.block_status(status(offset, length, one=True), dirty)
                (_, whole), = target.block_status(status(offset, length), dirty)
                assert one == whole[:8], (name, offset, length)
