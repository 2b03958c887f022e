"""A snapshot export is bound to the snapshot its negotiation found, not to its name: once that
snapshot is removed, a connection still using it gets EIO, also after a new snapshot of the
same name was taken (never that snapshot's bytes); a read mapped before the removal sends the
removed snapshot's bytes."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blocktrail.disk import Disk
from blocktrail.disk.readmap import MappedRead
from blocktrail.host.exports import DiskCatalog, Target
from blocktrail.nbd.client import NbdClient
from blocktrail.nbd.proto import Command, CommandFlag, Errno, ExportInfo, Request
from blocktrail.nbd.proto.constants import BASE_ALLOCATION, DIRTY_BITMAP_PREFIX
from blocktrail.nbd.proto.errors import RequestFailed
from blocktrail.nbd.server import NbdServer

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
    catalog = DiskCatalog.of({"d0": disk})
    info = catalog.lookup(name)
    assert info is not None
    target = catalog.open(info)
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


class _Hooked:
    """A catalog that runs ``after_lookup`` after its first lookup, and ``after_map`` after the
    first read its exports map (before the server sends it)."""

    def __init__(self, inner: DiskCatalog, *, after_lookup: Callable[[], None] = lambda: None,
                 after_map: Callable[[], None] = lambda: None) -> None:
        self._inner = inner
        self._hooks = {"lookup": after_lookup, "map": after_map}

    def _run(self, hook: str) -> None:
        self._hooks.pop(hook, lambda: None)()

    def lookup(self, name: str) -> ExportInfo | None:
        info = self._inner.lookup(name)
        self._run("lookup")
        return info

    def names(self) -> list[str]:
        return self._inner.names()

    def open(self, export: Any) -> Any:
        target = self._inner.open(export)
        return None if target is None else _HookedTarget(target, self)


class _HookedTarget:
    def __init__(self, target: Target, catalog: _Hooked) -> None:
        self._target, self._catalog = target, catalog

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)

    def map_read(self, count: int, offset: int, *, wait: bool) -> MappedRead | None:
        mapped = self._target.map_read(count, offset, wait=wait)
        if mapped is not None:
            self._catalog._run("map")

        return mapped


def _serve(tmp_path: Path, catalog: _Hooked, export: str,
           talk: Callable[[NbdClient], Any]) -> None:
    async def main() -> None:
        path = str(tmp_path / "nbd.sock")
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(path)
        listener.listen(4)
        listener.setblocking(False)
        server = NbdServer(catalog)  # type: ignore[arg-type]
        server.listen(listener)
        try:
            async with asyncio.timeout(60):
                client = await NbdClient.connect(f"nbd+unix:///{export}?socket={path}")
                try:
                    await talk(client)
                finally:
                    await client.close()
        finally:
            await server.close()
            listener.close()

    asyncio.run(main())


def test_a_read_mapped_before_the_removal_sends_the_removed_snapshots_bytes(
        tmp_path: Path, disk: Disk, monkeypatch: pytest.MonkeyPatch) -> None:
    disk.pwrite(b"A" * 4096, 0)
    disk.create_snapshot("s1")
    disk.pwrite(b"B" * 4096, 0)
    disk.create_snapshot("s2")  # removing s1 merges s2's layer into s1's, in place
    merging = threading.Event()  # the removal runs, or waits for the read to be sent
    wait = getattr(disk._stack, "wait_unpinned", None)

    def waits(*args: Any) -> Any:
        merging.set()
        assert wait is not None
        return wait(*args)

    monkeypatch.setattr(disk._stack, "wait_unpinned", waits, raising=False)

    def remove() -> None:
        disk.remove_snapshot("s1")
        merging.set()

    remover = threading.Thread(target=remove)

    def removed_after_the_map() -> None:  # the read is mapped, not sent yet
        remover.start()
        assert merging.wait(10)

    async def talk(client: NbdClient) -> None:
        assert await client.pread(4096, 0) == b"A" * 4096  # s1's, never s2's
        with pytest.raises(RequestFailed) as gone:
            await client.pread(4096, 0)
        assert gone.value.errno == Errno.EIO

    _serve(tmp_path, _Hooked(DiskCatalog.of({"d0": disk}), after_map=removed_after_the_map),
           "d0@s1", talk)
    remover.join(10)
    assert not remover.is_alive()
    assert [s.name for s in disk.snapshots] == ["s2"] and len(disk._layers) == 2


def test_a_connection_uses_the_snapshot_its_negotiation_described(tmp_path: Path,
                                                                  disk: Disk) -> None:
    disk.pwrite(b"A" * 4096, 0)
    disk.create_snapshot("s")

    def replaced() -> None:  # between the lookup and the open: another "s", of another size
        disk.remove_snapshot("s")
        disk.resize(2 * SIZE)
        disk.pwrite(b"C" * 4096, 0)
        disk.create_snapshot("s")

    async def talk(client: NbdClient) -> None:
        assert client.size_bytes == SIZE  # what the lookup found
        with pytest.raises(RequestFailed) as gone:
            await client.pread(4096, 0)  # not the other "s"'s bytes
        assert gone.value.errno == Errno.EIO

    _serve(tmp_path, _Hooked(DiskCatalog.of({"d0": disk}), after_lookup=replaced), "d0@s",
           talk)
