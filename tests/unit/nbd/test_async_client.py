"""The asyncio NBD client (and its blocking facade): against our server exporting a real disk, and
against the sans-IO server core and scripted servers that split, delay, refuse and misbehave."""

from __future__ import annotations

import asyncio
import os
import random
import struct
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    asynccontextmanager,
    contextmanager,
)
from pathlib import Path
from typing import TypeVar

import pytest

from blocktrail.disk import Disk
from blocktrail.errors import InvalidArgument, OutOfRange
from blocktrail.host.daemon import Endpoint, bind
from blocktrail.host.exports import DiskCatalog
from blocktrail.nbd.blocking import BlockingNbdClient
from blocktrail.nbd.client import NbdClient
from blocktrail.nbd.proto import (
    NEED_DATA,
    Command,
    Disconnect,
    ExportChosen,
    ExportInfo,
    RemoteProtocolError,
    ReplyType,
    Request,
    ServerConnection,
)
from blocktrail.nbd.proto.constants import TransmissionFlag
from blocktrail.nbd.proto.errors import (
    CommandNotSupported,
    ConnectionLost,
    ConnectionsDisagree,
    NegotiationRefused,
    RequestFailed,
    ServerUnreachable,
)
from blocktrail.nbd.server import NbdServer
from blocktrail.nbd.tls import TlsCredentialsError
from nbdreplies import FLAGS, data, handshake, simple

T = TypeVar("T")

MiB = 1 << 20
EIO, EINVAL = 5, 22


def run(coroutine: Awaitable[None]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(60):
            await coroutine

    asyncio.run(bounded())


# ---------------------------------------------------------------------- our server, a real disk

@asynccontextmanager
async def our_server(tmp_path: Path, size: int = 8 * MiB) -> AsyncIterator[tuple[str, Disk]]:
    disk = Disk.create(tmp_path / "d0", size)
    path = str(tmp_path / "nbd.sock")
    server = NbdServer(DiskCatalog.of({"d0": disk}))
    server.listen(bind(Endpoint(unix_path=path)))
    try:
        yield path, disk
    finally:
        await server.close()
        disk.close()


def uri(path: str, export: str = "d0") -> str:
    return f"nbd+unix:///{export}?socket={path}"


def test_verbs_against_our_server(tmp_path: Path) -> None:
    async def main() -> None:
        async with our_server(tmp_path) as (path, disk):
            client = await NbdClient.connect(uri(path), contexts=["base:allocation"])
            assert client.size_bytes == 8 * MiB and client.contexts == ("base:allocation",)
            assert not client.is_read_only() and client.can_trim() and client.can_zero()
            assert client.can_flush() and client.can_fua() and client.can_multi_conn()
            payload = os.urandom(3 * MiB)
            await client.pwrite(payload, MiB, fua=True)
            await client.zero(64 << 10, 2 * MiB)
            await client.trim(64 << 10, 3 * MiB)
            await client.flush()
            expected = bytearray(8 * MiB)
            expected[MiB : 4 * MiB] = payload
            expected[2 * MiB : 2 * MiB + (64 << 10)] = bytes(64 << 10)
            expected[3 * MiB : 3 * MiB + (64 << 10)] = bytes(64 << 10)
            assert await client.pread(8 * MiB, 0) == expected
            assert disk.pread(8 * MiB, 0) == expected
            extents = await client.extents("base:allocation")
            assert extents[0] == (0, MiB, 3) and sum(n for _, n, _ in extents) == 8 * MiB
            await client.close()
            with pytest.raises(ConnectionLost):
                await client.pread(512, 0)

    run(main())


def test_many_requests_in_flight_against_our_server(tmp_path: Path) -> None:
    async def main() -> None:
        async with our_server(tmp_path) as (path, disk):
            content = os.urandom(8 * MiB)
            disk.pwrite(content, 0)
            async with await NbdClient.connect(uri(path)) as client:
                rng = random.Random(5)
                ranges = [(rng.randrange(0, 8 * MiB - 65536), rng.randrange(1, 65536))
                          for _ in range(300)]
                results = await asyncio.gather(*(client.pread(n, o) for o, n in ranges))
                for (offset, length), data in zip(ranges, results, strict=True):
                    assert data == content[offset : offset + length]

    run(main())


def test_snapshot_exports_dirty_contexts_and_refused_change_ids(tmp_path: Path) -> None:
    async def main() -> None:
        async with our_server(tmp_path) as (path, disk):
            disk.pwrite(b"a" * 65536, 0)
            first = disk.create_snapshot("s1").change_id
            disk.pwrite(b"b" * 65536, 4 * MiB)
            disk.create_snapshot("s2")
            context = f"qemu:dirty-bitmap:{first}"
            async with await NbdClient.connect(uri(path, "d0@s2"),
                                               contexts=["base:allocation", context]) as client:
                assert client.is_read_only()
                with pytest.raises(CommandNotSupported, match="read-only"):
                    await client.pwrite(b"x", 0)
                dirty = [(o, n) for o, n, f in await client.extents(context) if f & 1]
                assert dirty == [(4 * MiB, 65536)]
                disk.reset_tracking()  # every earlier change ID is refused from now on
                with pytest.raises(RequestFailed) as refused:
                    await client.block_status(MiB, 0, context)
                assert refused.value.errno == EINVAL and "earlier" in refused.value.server_message
                assert await client.pread(4, 4 * MiB) == b"bbbb"  # the connection goes on
            with pytest.raises(NegotiationRefused, match="nope"):
                await NbdClient.connect(uri(path, "nope"))

    run(main())


def test_connect_errors_are_typed(tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(ServerUnreachable, match="cannot connect"):
            await NbdClient.connect(uri(str(tmp_path / "missing.sock")))
        with pytest.raises(TlsCredentialsError, match="/k"):
            await NbdClient.connect("nbds+unix:///d0?socket=/x&tls-psk-file=/k")
        with pytest.raises(InvalidArgument, match="TLS needs credentials"):
            await NbdClient.connect("nbds+unix:///d0?socket=/x")
        with pytest.raises(InvalidArgument, match="needs \\?socket"):
            await NbdClient.connect("nbd+unix:///d0")

    run(main())


# ---------------------------------------------------------------------- the sans-IO server core

class Catalog:
    def __init__(self, export: ExportInfo) -> None:
        self.export = export

    def lookup(self, name: str) -> ExportInfo | None:
        return self.export if name == self.export.name else None

    def names(self) -> list[str]:
        return [self.export.name]


class CoreServer:
    """The sans-IO server core answering from a bytearray. Replies wait until the client has
    sent nothing for a moment, then go out in reverse order; reads are answered in several
    chunks with a hole; `fail` offsets get EIO."""

    def __init__(self, export: ExportInfo) -> None:
        self.export = export
        self.data = bytearray(os.urandom(export.size_bytes))
        self.requests: list[Request] = []
        self.largest_batch = 0
        self.fail: set[int] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = ServerConnection(Catalog(self.export))
        writer.write(conn.data_to_send())
        queued: list[Request] = []
        while True:
            event = conn.next_event()
            writer.write(conn.data_to_send())
            if event is NEED_DATA:
                await writer.drain()
                try:
                    async with asyncio.timeout(0.02 if queued else None):
                        received = await reader.read(MiB)
                except TimeoutError:
                    for request in reversed(queued):
                        self._answer(conn, request)
                    queued.clear()
                    writer.write(conn.data_to_send())
                    continue
                if not received:
                    break
                conn.receive_data(received)
            elif isinstance(event, Disconnect):
                break
            elif isinstance(event, Request):
                self.requests.append(event)
                queued.append(event)
                self.largest_batch = max(self.largest_batch, len(queued))
            elif not isinstance(event, ExportChosen):
                break
        writer.close()

    def _answer(self, conn: ServerConnection, request: Request) -> None:
        start, end = request.offset, request.offset + request.length
        if request.offset in self.fail:
            conn.reply_error(request.cookie, EIO, f"injected failure at {request.offset}")
        elif request.command is Command.READ:  # data in two chunks (last first), then a hole
            hole = min(512, request.length // 2)
            self.data[start : start + hole] = bytes(hole)
            middle = start + hole + (request.length - hole) // 2
            for lo, hi in ((middle, end), (start + hole, middle)):
                if hi > lo:
                    conn.reply_chunk(request.cookie, ReplyType.OFFSET_DATA,
                                     struct.pack(">Q", lo) + self.data[lo:hi], done=False)
            if hole:
                conn.reply_chunk(request.cookie, ReplyType.OFFSET_HOLE,
                                 struct.pack(">QI", start, hole), done=False)
            conn.reply_chunk(request.cookie, ReplyType.NONE, b"", done=True)
        elif request.command is Command.WRITE:
            self.data[start:end] = request.data
            conn.reply_chunk(request.cookie, ReplyType.NONE, b"", done=True)
        elif request.command is Command.BLOCK_STATUS:
            conn.reply_chunk(request.cookie, ReplyType.BLOCK_STATUS,
                             struct.pack(">III", 1, request.length + 4096, 0), done=True)
        else:
            conn.reply_chunk(request.cookie, ReplyType.NONE, b"", done=True)


@asynccontextmanager
async def core_server(tmp_path: Path, **export: object) -> AsyncIterator[tuple[str, CoreServer]]:
    fields: dict[str, object] = {"name": "d", "size_bytes": 4 * MiB, "read_only": False,
                                 "contexts": ("base:allocation",)}
    server = CoreServer(ExportInfo(**{**fields, **export}))  # type: ignore[arg-type]
    path = str(tmp_path / "core.sock")
    listener = await asyncio.start_unix_server(server.serve, path)
    try:
        yield path, server
    finally:
        listener.close()


def test_requests_are_split_at_the_maximum_and_aligned_to_the_minimum(tmp_path: Path) -> None:
    async def main() -> None:
        async with core_server(tmp_path, min_block=512, max_block=64 << 10) as (path, server):
            client = await NbdClient.connect(uri(path, "d"), contexts=["base:allocation"])
            assert (client.block_size.minimum, client.block_size.maximum) == (512, 64 << 10)
            data = await client.pread(MiB, 512)
            reads = [r for r in server.requests if r.command is Command.READ]
            assert len(reads) == 16 and {r.length for r in reads} == {64 << 10}
            assert data == bytes(server.data[512 : 512 + MiB])
            await client.pwrite(b"w" * (200 << 10), 1024)
            writes = [r.length for r in server.requests if r.command is Command.WRITE]
            assert sorted(writes) == sorted([64 << 10] * 3 + [8 << 10])
            assert server.data[1024 : 1024 + (200 << 10)] == b"w" * (200 << 10)
            with pytest.raises(InvalidArgument, match="minimum block size"):
                await client.pread(100, 0)
            with pytest.raises(OutOfRange):
                await client.pread(1024, 4 * MiB - 512)
            extents = await client.block_status(8192, 0, "base:allocation")
            assert extents == [(8192, 0)]  # the server's longer answer, clipped
            await client.close()

    run(main())


def test_in_flight_requests_are_bounded(tmp_path: Path) -> None:
    async def main() -> None:
        async with core_server(tmp_path) as (path, server):
            async with await NbdClient.connect(uri(path, "d"), max_in_flight=4) as client:
                await asyncio.gather(*(client.pread(4096, i * 4096) for i in range(40)))
            assert server.largest_batch == 4 and len(server.requests) == 40
        async with core_server(tmp_path) as (path, server):
            async with await NbdClient.connect(uri(path, "d"),
                                               max_in_flight_bytes=64 << 10) as client:
                await asyncio.gather(*(client.pread(32 << 10, i << 15) for i in range(10)))
            assert server.largest_batch == 2

    run(main())


def test_a_server_error_fails_one_request_and_the_connection_goes_on(tmp_path: Path) -> None:
    async def main() -> None:
        async with core_server(tmp_path) as (path, server):
            server.fail.add(8192)
            async with await NbdClient.connect(uri(path, "d")) as client:
                results = await asyncio.gather(client.pread(4096, 0), client.pread(4096, 8192),
                                               client.pread(4096, 16384), return_exceptions=True)
                failure = results[1]
                assert isinstance(failure, RequestFailed) and failure.errno == EIO
                assert failure.server_message == "injected failure at 8192"
                assert "EIO" in failure.message and failure.command == "READ"
                assert results[0] == bytes(server.data[:4096])
                assert await client.pread(4, 100) == bytes(server.data[100:104])

    run(main())


# ---------------------------------------------------------------------- scripted servers

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def scripted(tmp_path: Path, script: Script) -> AsyncIterator[str]:
    path = str(tmp_path / "scripted.sock")
    listener = await asyncio.start_unix_server(script, path)
    try:
        yield path
    finally:
        listener.close()


async def requests(reader: asyncio.StreamReader) -> AsyncIterator[tuple[int, int, int, int]]:
    """(command, cookie, offset, length) of each request (write payloads skipped), after the
    client's flags and options (up to GO) are read and ignored."""
    await reader.readexactly(4)
    while True:
        _, option, length = struct.unpack(">QII", await reader.readexactly(16))
        await reader.readexactly(length)
        if option == 7:
            break
    while True:
        try:
            header = await reader.readexactly(28)
        except asyncio.IncompleteReadError:
            return
        _, _, command, cookie, offset, length = struct.unpack(">IHHQQI", header)
        if command == Command.WRITE:
            await reader.readexactly(length)
        yield command, cookie, offset, length


def test_simple_replies_when_the_server_refuses_structured_replies(tmp_path: Path) -> None:
    content = os.urandom(MiB)

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(handshake(structured=False, size=MiB, block_size=None))
        async for command, cookie, offset, length in requests(reader):
            if command == Command.READ:
                writer.write(simple(cookie, 0, content[offset : offset + length]))
            elif command == Command.DISC:
                break
            else:
                writer.write(simple(cookie))
        writer.close()

    async def main() -> None:
        async with scripted(tmp_path, script) as path:
            client = await NbdClient.connect(uri(path, "d"), contexts=["base:allocation"])
            assert not client.structured_replies and client.contexts == ()
            assert client.block_size.maximum == 32 * MiB  # the default without the info
            parts = await asyncio.gather(*(client.pread(65536, o) for o in range(0, MiB, 65536)))
            assert b"".join(parts) == content
            with pytest.raises(CommandNotSupported, match="base:allocation"):
                await client.block_status(4096, 0, "base:allocation")
            await client.close()

    run(main())


def test_a_protocol_violation_fails_every_request_in_flight(tmp_path: Path) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(handshake(contexts=(), size=MiB))
        seen = 0
        async for _, cookie, _, _ in requests(reader):
            seen += 1
            if seen == 5:  # five reads in flight: answer one with a chunk outside its range
                writer.write(struct.pack(">IHHQIQ", 0x668E33EF, 1, ReplyType.OFFSET_DATA,
                                         cookie, 9, 2 * MiB) + b"x")
        writer.close()

    async def main() -> None:
        async with scripted(tmp_path, script) as path:
            client = await NbdClient.connect(uri(path, "d"))
            results = await asyncio.gather(*(client.pread(4096, i * 4096) for i in range(5)),
                                           return_exceptions=True)
            assert all(isinstance(r, RemoteProtocolError) for r in results), results
            assert "outside the request" in str(results[0])
            with pytest.raises(RemoteProtocolError):
                await client.pread(4096, 0)
            await client.close()

    run(main())


def test_a_server_that_hangs_up_fails_the_requests_in_flight(tmp_path: Path) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(handshake(contexts=(), size=MiB))
        async for _ in requests(reader):
            writer.close()
            return

    async def main() -> None:
        async with scripted(tmp_path, script) as path:
            client = await NbdClient.connect(uri(path, "d"))
            with pytest.raises(ConnectionLost, match="requests in flight"):
                await client.pread(4096, 0)
            await client.close()

    run(main())


def test_a_request_the_server_never_finishes_times_out_and_ends_the_connection(
        tmp_path: Path) -> None:
    """All of a read's data, but never the chunk that ends its reply: after request_timeout the
    connection is closed and every request in flight fails with ConnectionLost."""
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(handshake(contexts=(), size=MiB))
        async for command, cookie, offset, length in requests(reader):
            if command == Command.READ:
                writer.write(data(cookie, offset, b"x" * length))  # no NBD_REPLY_FLAG_DONE
            elif command == Command.DISC:
                break
        writer.close()

    async def main() -> None:
        async with scripted(tmp_path, script) as path:
            client = await NbdClient.connect(uri(path, "d"), request_timeout=0.2)
            results = await asyncio.gather(client.pread(4096, 0), client.pread(4096, 8192),
                                           return_exceptions=True)
            assert all(isinstance(r, ConnectionLost) for r in results), results
            assert "did not finish NBD READ of 4096 bytes" in str(results[0])
            with pytest.raises(ConnectionLost):
                await client.pread(4096, 0)
            await client.close()

    run(main())


def test_a_write_the_server_never_takes_times_out(tmp_path: Path) -> None:
    """A server that stops reading: a write that cannot be sent whole fails with ConnectionLost
    after request_timeout, like a request that is never answered."""
    stop = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(handshake(contexts=(), size=64 * MiB))
        await stop.wait()  # reads nothing more
        writer.close()

    async def main() -> None:
        async with scripted(tmp_path, script) as path:
            client = await NbdClient.connect(uri(path, "d"), request_timeout=0.3)
            with pytest.raises(ConnectionLost, match="did not finish NBD WRITE"):
                await client.pwrite(b"w" * (32 * MiB), 0)
            stop.set()
            await client.close()

    run(main())


def test_the_request_timeout_must_be_positive(tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(InvalidArgument, match="request_timeout"):
            await NbdClient.connect(uri(str(tmp_path / "none.sock")), request_timeout=0)

    run(main())


# ---------------------------------------------------------------------- the blocking facade

@contextmanager
def on_own_loop(serving: Callable[[], AbstractAsyncContextManager[T]]) -> Iterator[T]:
    """A server (``serving()``: what it yields) on its own event loop in a thread, for the
    blocking facade."""
    loop = asyncio.new_event_loop()
    started: asyncio.Future[T] = loop.create_future()
    stop = asyncio.Event()

    async def main() -> None:
        async with serving() as served:
            started.set_result(served)
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    try:
        yield asyncio.run_coroutine_threadsafe(asyncio.wait_for(asyncio.shield(started), 10),
                                               loop).result()
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        loop.close()


def served_in_thread(tmp_path: Path) -> AbstractContextManager[tuple[str, Disk]]:
    return on_own_loop(lambda: our_server(tmp_path))


def test_blocking_calls_from_many_threads_share_the_connections(tmp_path: Path) -> None:
    with served_in_thread(tmp_path) as (path, disk):
        content = os.urandom(8 * MiB)
        disk.pwrite(content, 0)
        with BlockingNbdClient.connect(uri(path), contexts=["base:allocation"],
                                       connections=3) as nbd:
            assert nbd.connections == 3 and nbd.size_bytes == 8 * MiB
            errors: list[BaseException] = []

            def worker(seed: int) -> None:
                rng = random.Random(seed)
                try:
                    for _ in range(20):
                        offset, length = rng.randrange(0, 7 * MiB), rng.randrange(1, MiB)
                        assert nbd.pread(length, offset) == content[offset : offset + length]
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors, errors
            nbd.pwrite(b"z" * 4096, 0)
            nbd.flush()
            assert nbd.extents("base:allocation")[0][1:] == (8 * MiB, 0)
        assert not [t for t in threading.enumerate() if t.name == "nbd-client"]
        with pytest.raises(ServerUnreachable):
            BlockingNbdClient.connect(uri(str(tmp_path / "none.sock")))
        assert not [t for t in threading.enumerate() if t.name == "nbd-client"]


def scripted_in_thread(tmp_path: Path, script: Script) -> AbstractContextManager[str]:
    """A scripted server on its own event loop in a thread, for the blocking facade."""
    return on_own_loop(lambda: scripted(tmp_path, script))


def test_a_blocking_call_the_server_never_finishes_raises(tmp_path: Path) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(handshake(contexts=(), size=MiB))
        async for command, _, _, _ in requests(reader):
            if command == Command.DISC:
                break  # a read gets no reply at all
        writer.close()

    with scripted_in_thread(tmp_path, script) as path, \
            BlockingNbdClient.connect(uri(path, "d"), request_timeout=0.2) as nbd, \
            pytest.raises(ConnectionLost, match="did not finish NBD READ"):
        nbd.pread(4096, 0)


MULTI = FLAGS | TransmissionFlag.CAN_MULTI_CONN
BITMAP = "qemu:dirty-bitmap:bm0"


@pytest.mark.parametrize(("later", "what"), [
    ({"size": 2 * MiB}, "size"),
    ({"flags": FLAGS}, "transmission flags"),  # the later ones do not allow multi-conn
    ({"flags": MULTI | TransmissionFlag.READ_ONLY}, "transmission flags"),
    ({"contexts": ("base:allocation",)}, "meta contexts"),
    ({"block_size": (512, 4096, 32 << 20)}, "block size"),
])
def test_connections_that_disagree_about_the_export_are_refused(
        tmp_path: Path, later: dict[str, object], what: str) -> None:
    connected = 0
    closed: list[int] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connected
        number, connected = connected, connected + 1
        told: dict[str, object] = {"size": MiB, "flags": MULTI,
                                   "contexts": ("base:allocation", BITMAP)}
        if number > 0:
            told.update(later)
        writer.write(handshake(**told))  # type: ignore[arg-type]
        async for command, cookie, _, _ in requests(reader):
            if command == Command.DISC:
                break
            writer.write(simple(cookie))
        closed.append(number)
        writer.close()

    with scripted_in_thread(tmp_path, script) as path, \
            pytest.raises(ConnectionsDisagree, match=f"disagree about the export.*{what}"):
        BlockingNbdClient.connect(uri(path, "d"), contexts=["base:allocation", BITMAP],
                                  connections=3)
    assert sorted(closed) == [0, 1, 2]  # every connection was closed
    assert not [t for t in threading.enumerate() if t.name == "nbd-client"]


def test_connections_told_the_same_share_the_calls(tmp_path: Path) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(handshake(size=MiB, flags=MULTI, contexts=("base:allocation", BITMAP)))
        async for command, cookie, _, _ in requests(reader):
            if command == Command.DISC:
                break
            writer.write(simple(cookie))
        writer.close()

    with scripted_in_thread(tmp_path, script) as path, \
            BlockingNbdClient.connect(uri(path, "d"), contexts=[BITMAP, "base:allocation"],
                                      connections=3) as nbd:
        assert nbd.connections == 3 and nbd.size_bytes == MiB
        nbd.flush()
