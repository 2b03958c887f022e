"""A snapshot export is bound to the snapshot it was opened on, not to its name: once that
snapshot is removed, a connection still using it gets EIO, also after a new snapshot of the
same name was taken (never that snapshot's bytes)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from blocktrail.disk import Disk
from blocktrail.disk.readmap import MappedRead
from blocktrail.host.exports import DiskCatalog, Target
from blocktrail.nbd.proto import Command, CommandFlag, Errno, Request
from blocktrail.nbd.proto.constants import BASE_ALLOCATION, DIRTY_BITMAP_PREFIX
from blocktrail.nbd.proto.errors import RequestFailed

SIZE = 1 << 20


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    with Disk.create(str(tmp_path / "d0"), SIZE, 4096) as disk:
        yield disk


def read(target: Target, count: int, *, wait: bool = True) -> bytes | None:
    mapped = target.map_read(count, 0, wait=wait)
    if mapped is None:
        return None
    try:
        return _bytes(mapped)
    finally:
        mapped.close()


def _bytes(mapped: MappedRead) -> bytes:
    out = b""
    for seg in mapped.segments:
        if seg.data is not None:
            out += seg.data
        elif seg.fd is not None:
            out += os.pread(seg.fd, seg.length, seg.offset)
        else:
            out += bytes(seg.length)
    return out


def opened(disk: Disk, name: str) -> Target:
    target = DiskCatalog.of({"d0": disk}).open(name)
    assert target is not None
    return target


def expect_gone(call: object) -> None:
    assert callable(call)
    with pytest.raises(RequestFailed) as failed:
        call()
    assert failed.value.errno == Errno.EIO
    assert "'s' (change ID" in failed.value.message and "was removed" in failed.value.message


def test_a_snapshot_taken_again_under_the_name_is_not_the_export(disk: Disk) -> None:
    disk.pwrite(b"A" * 4096, 0)
    since = disk.create_snapshot("s").change_id
    target = opened(disk, "d0@s")
    assert read(target, 8) == b"A" * 8
    disk.pwrite(b"B" * 4096, 0)
    disk.remove_snapshot("s")
    with pytest.raises(RequestFailed):
        read(target, 8)  # gone
    disk.create_snapshot("s")  # another snapshot, named as the old one
    disk.pwrite(b"C" * 4096, 0)
    assert read(opened(disk, "d0@s"), 8) == b"B" * 8  # a new connection reads the new one
    expect_gone(lambda: read(target, 8))
    expect_gone(lambda: read(target, 8, wait=False))
    request = Request(1, Command.BLOCK_STATUS, CommandFlag(0), 0, SIZE)
    expect_gone(lambda: target.block_status(request, {1: BASE_ALLOCATION}))
    expect_gone(lambda: target.block_status_now(request, {1: DIRTY_BITMAP_PREFIX + since}))
    expect_gone(lambda: target.perform(Request(2, Command.CACHE, CommandFlag(0), 0, 4096)))


def test_an_export_of_a_snapshot_still_there_reads_it(disk: Disk) -> None:
    disk.pwrite(b"A" * 4096, 0)
    disk.create_snapshot("s")
    target = opened(disk, "d0@s")
    disk.create_snapshot("t")
    disk.remove_snapshot("t")  # other snapshots come and go
    disk.pwrite(b"B" * 4096, 0)
    assert read(target, 8) == b"A" * 8
    assert target.size_bytes == SIZE and target.read_only
