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
from blocktrail.nbd.proto.constants import BASE_ALLOCATION, DIRTY_BITMAP_PREFIX
from blocktrail.nbd.proto.errors import RequestFailed

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
    monkeypatch.setattr(exports, "NOW_BLOCK_STATUS_GRANULES", 20)
    assert target.block_status_now(status(0, SIZE), dirty) is not None  # 20 granules: at once
    monkeypatch.setattr(exports, "NOW_BLOCK_STATUS_GRANULES", 19)
    assert target.block_status_now(status(0, SIZE), dirty) is None
    assert target.block_status_now(status(0, SIZE), {1: BASE_ALLOCATION}) is None
    assert target.block_status_now(status(0, SIZE), {1: BASE_ALLOCATION, 2: dirty[1]}) is None


def test_a_question_that_would_wait_goes_to_a_worker(disk: Disk) -> None:
    since = disk.create_snapshot("s0").change_id
    disk.pwrite(b"x" * GRAIN, 0)
    assert disk.try_query_changed_areas(since, max_granules=10) is not None
    assert disk.try_query_changed_areas("*", max_granules=10) is None  # allocation: never
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
    finally:
        release.set()
        thread.join()
    assert disk.try_query_changed_areas(since, max_granules=0) is None  # too large
