"""The server's export interface (nbd/export.py): an in-memory export that is no disk, served by
the asyncio server and read by the client; `RequestFailed` from an export reaches the client as
the same error type; NBD_FLAG_CAN_MULTI_CONN is advertised exactly when the export says so."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from blocktrail.disk import Disk
from blocktrail.host.exports import DiskCatalog
from blocktrail.nbd.blocking import BlockingNbdClient
from blocktrail.nbd.client import NbdClient
from blocktrail.nbd.export import Catalog
from blocktrail.nbd.proto import (
    NEED_DATA,
    Command,
    Errno,
    ExportChosen,
    ExportInfo,
    LocalProtocolError,
    Request,
    RequestFailed,
    ServerConnection,
)
from blocktrail.nbd.proto.constants import (
    IHAVEOPT,
    OPTION_REPLY_MAGIC,
    Info,
    Option,
    OptionReply,
    TransmissionFlag,
)
from blocktrail.nbd.server import NbdServer

SIZE = 1 << 20
BLOCK = 64 << 10


@dataclass(frozen=True, slots=True)
class Segment:
    offset: int
    length: int
    fd: int | None = None
    data: bytes | None = None


@dataclass
class Mapped:
    segments: list[Segment]
    closed: bool = False
    copy: bool = False

    def close(self) -> None:
        self.closed = True


@dataclass
class MemoryExport:
    """Bytes in memory; zero blocks are sent as zeros, a file-backed block from a descriptor."""

    content: bytearray
    read_only: bool
    fd: int
    flushes: int = 0
    at_once: int = 0  # writes offered to perform_now
    status_at_once: int = 0  # block status answered by block_status_now
    reads: list[Mapped] = field(default_factory=list)

    @property
    def size_bytes(self) -> int:
        return len(self.content)

    def map_read(self, count: int, offset: int, *, wait: bool) -> Mapped | None:
        if offset + count > self.size_bytes:
            raise RequestFailed(f"read {offset}+{count} past the end", errno=Errno.EINVAL)
        segments = []
        for at in range(offset, offset + count, BLOCK):
            n = min(BLOCK - at % BLOCK, offset + count - at)
            piece = bytes(self.content[at : at + n])
            if at < BLOCK:  # the first block lives in a file
                segments.append(Segment(at, n, fd=self.fd))
            elif piece.count(0) == n:
                segments.append(Segment(at, n))
            else:
                segments.append(Segment(at, n, data=piece))
        mapped = Mapped(segments)
        self.reads.append(mapped)
        return mapped

    def perform(self, request: Request) -> None:
        if request.command is Command.WRITE:
            self.content[request.offset : request.offset + request.length] = request.data
        elif request.command is Command.FLUSH:
            self.flushes += 1
        else:
            raise RequestFailed(f"{request.command.name} is not done in memory",
                                errno=Errno.ENOTSUP)

    def perform_now(self, request: Request) -> bool:
        self.at_once += 1
        if request.offset >= BLOCK:  # the rest is left to a worker thread
            return False
        self.perform(request)
        return True

    def block_status_now(self, request: Request,
                         contexts: dict[int, str]) -> list[tuple[int, bytes]] | None:
        if request.offset >= BLOCK:  # the rest is left to a worker thread
            return None
        self.status_at_once += 1
        return self.block_status(request, contexts)

    def block_status(self, request: Request, contexts: dict[int, str]) -> list[tuple[int, bytes]]:
        if request.length % 2:
            raise RequestFailed("block status of an odd length", errno=Errno.EINVAL)
        return [(i, struct.pack(">II", request.length, 0)) for i in contexts]


class MemoryCatalog:
    def __init__(self, export: MemoryExport, *, multi_conn: bool) -> None:
        self.export = export
        self.multi_conn = multi_conn

    def lookup(self, name: str) -> ExportInfo | None:
        if name != "m":
            return None
        return ExportInfo("m", self.export.size_bytes, self.export.read_only,
                          contexts=("base:allocation",), multi_conn=self.multi_conn)

    def names(self) -> list[str]:
        return ["m"]

    def open(self, export: ExportInfo) -> MemoryExport | None:
        return self.export if export.name == "m" else None


def run(coroutine: Awaitable[None]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(60):
            await coroutine

    asyncio.run(bounded())


def listener(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(path)
    sock.listen(16)
    sock.setblocking(False)
    return sock


@asynccontextmanager
async def serving(tmp_path: Path, catalog: Catalog) -> AsyncIterator[str]:
    path = str(tmp_path / "nbd.sock")
    server = NbdServer(catalog)
    server.listen(listener(path))
    try:
        yield f"nbd+unix:///m?socket={path}"
    finally:
        await server.close()


def memory_export(tmp_path: Path) -> MemoryExport:
    content = bytearray(SIZE)
    content[:BLOCK] = os.urandom(BLOCK)
    content[3 * BLOCK : 3 * BLOCK + 100] = b"x" * 100
    (tmp_path / "first-block").write_bytes(content[:BLOCK])
    fd = os.open(tmp_path / "first-block", os.O_RDONLY)
    return MemoryExport(content, read_only=False, fd=fd)


def test_a_memory_export_is_served_through_the_interface(tmp_path: Path) -> None:
    export = memory_export(tmp_path)

    async def main() -> None:
        async with serving(tmp_path, MemoryCatalog(export, multi_conn=False)) as uri:
            client = await NbdClient.connect(uri, contexts=["base:allocation"])
            assert await client.pread(SIZE, 0) == export.content  # file, zeros, bytes
            await client.pwrite(b"y" * 10, 5 * BLOCK)  # left to a worker by perform_now
            await client.pwrite(b"z" * 10, 7)  # done at once on the event loop
            await client.pwrite(b"f" * 10, 20, fua=True)  # never at once: it must flush
            await client.flush()
            assert export.content[5 * BLOCK : 5 * BLOCK + 10] == b"y" * 10
            assert export.content[7:17] == b"z" * 10 and export.content[20:30] == b"f" * 10
            assert export.at_once == 2
            assert export.flushes == 1
            assert await client.block_status(SIZE, 0, "base:allocation") == [(SIZE, 0)]
            assert export.status_at_once == 1  # answered on the event loop
            assert await client.block_status(BLOCK, BLOCK, "base:allocation") == [(BLOCK, 0)]
            assert export.status_at_once == 1  # by a worker thread
            with pytest.raises(RequestFailed) as refused:  # the error of one done at once
                await client.block_status(3, 0, "base:allocation")
            assert refused.value.errno == Errno.EINVAL
            assert refused.value.server_message == "block status of an odd length"
            with pytest.raises(RequestFailed) as failed:  # the export's error, as it was
                await client.trim(BLOCK, 0)
            assert failed.value.errno == Errno.ENOTSUP
            assert failed.value.server_message == "TRIM is not done in memory"
            assert failed.value.command == "TRIM"
            assert await client.pread(4, 3 * BLOCK) == b"xxxx"  # the connection goes on
            await client.close()

    try:
        run(main())
    finally:
        os.close(export.fd)
    assert export.reads and all(mapped.closed for mapped in export.reads)


@pytest.mark.parametrize("multi_conn", [True, False])
def test_multi_conn_is_advertised_exactly_when_the_export_says_so(tmp_path: Path,
                                                                  multi_conn: bool) -> None:
    export = memory_export(tmp_path)
    catalog = MemoryCatalog(export, multi_conn=multi_conn)

    async def main() -> None:
        async with serving(tmp_path, catalog) as uri:
            async with await NbdClient.connect(uri) as client:
                assert client.can_multi_conn() is multi_conn
            blocking = await asyncio.to_thread(BlockingNbdClient.connect, uri, connections=3)
            try:  # more than one connection only where the server allows it
                assert blocking.connections == (3 if multi_conn else 1)
            finally:
                await asyncio.to_thread(blocking.close)

    try:
        run(main())
    finally:
        os.close(export.fd)


def _option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def _transmission_flags(export: ExportInfo, option: Option) -> int:
    """The flags the server core sends for ``export``, after GO or EXPORT_NAME."""

    class One:
        def lookup(self, name: str) -> ExportInfo | None:
            return export

        def names(self) -> list[str]:
            return [export.name]

    conn = ServerConnection(One())
    conn.data_to_send()
    name = export.name.encode()
    body = name if option is Option.EXPORT_NAME else (
        struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    conn.receive_data(struct.pack(">I", 3) + _option(option, body))
    assert isinstance(conn.next_event(), ExportChosen)
    out = conn.data_to_send()
    if option is Option.EXPORT_NAME:
        return int(struct.unpack_from(">H", out, 8)[0])
    magic, _, kind, _, info, _, flags = struct.unpack_from(">QIIIHQH", out)
    assert (magic, kind, info) == (OPTION_REPLY_MAGIC, OptionReply.INFO, Info.EXPORT)
    return int(flags)


@pytest.mark.parametrize("option", [Option.GO, Option.EXPORT_NAME])
@pytest.mark.parametrize("read_only", [True, False])
@pytest.mark.parametrize("multi_conn", [True, False])
def test_the_core_sets_can_multi_conn_from_the_export(option: Option, read_only: bool,
                                                      multi_conn: bool) -> None:
    export = ExportInfo("e", SIZE, read_only, multi_conn=multi_conn)
    flags = _transmission_flags(export, option)
    assert bool(flags & TransmissionFlag.CAN_MULTI_CONN) is multi_conn
    assert bool(flags & TransmissionFlag.READ_ONLY) is read_only
    assert ExportInfo("e", SIZE, read_only).multi_conn is False  # the default


def test_disk_exports_say_multi_conn_live_and_snapshot(tmp_path: Path) -> None:
    with Disk.create(tmp_path / "d0", SIZE) as disk:
        disk.create_snapshot("s1")
        catalog = DiskCatalog.of({"d0": disk})
        for name in ("d0", "d0@s1"):
            info = catalog.lookup(name)
            assert info is not None and info.multi_conn
            assert catalog.open(info) is not None
        assert catalog.lookup("d0@nope") is None
        assert catalog.open(ExportInfo("nope", 0, read_only=True)) is None


@pytest.mark.parametrize("bad", [
    dict(size_bytes=-1), dict(size_bytes=1 << 64), dict(name="x" * 4097),
    dict(min_block=3), dict(min_block=1 << 17, preferred_block=1 << 17, max_block=1 << 20),
    dict(preferred_block=512, min_block=1024), dict(max_block=1000, min_block=512),
    dict(contexts=("",)), dict(description="d" * 5000),
])
def test_export_info_refuses_what_the_wire_cannot_carry(bad: dict[str, object]) -> None:
    fields: dict[str, object] = dict(name="e", size_bytes=SIZE, read_only=False)
    with pytest.raises(LocalProtocolError):
        ExportInfo(**(fields | bad))  # type: ignore[arg-type]


def test_need_data_is_an_enum_member() -> None:
    from blocktrail.nbd.proto.events import NeedData

    assert isinstance(NEED_DATA, NeedData) and list(NeedData) == [NEED_DATA]
