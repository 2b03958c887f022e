"""The asyncio NBD server over a real unix socket, driven by a raw client: the conformance table
(errors keep the stream in sync), reads through snapshot chains with holes, requests in flight,
backpressure, and the limits (connections, negotiation time, connect/disconnect cycles)."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from blocktrail.disk import Disk
from blocktrail.host.daemon import Endpoint, bind
from blocktrail.host.exports import DiskCatalog
from blocktrail.nbd import server as server_module
from blocktrail.nbd.limits import ServerLimits
from blocktrail.nbd.server import NbdServer
from nbdraw import (
    BLOCK_STATUS,
    CACHE,
    CHUNK_DATA,
    CHUNK_HOLE,
    DISC,
    FLAG_DF,
    FLAG_REQ_ONE,
    FLUSH,
    IHAVEOPT,
    OPT_REPLY_MAGIC,
    READ,
    TRIM,
    WRITE,
    WRITE_ZEROES,
    RawClient,
)

OPT_LIST, REP_SERVER = 3, 2
MiB = 1 << 20
EINVAL, EPERM, ENOSPC, ENOTSUP = 22, 1, 28, 95


class Served:
    def __init__(self, path: str, disk: Disk, server: NbdServer,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.path, self.disk, self.server, self.loop = path, disk, server, loop

    def client(self, export: str = "d0", **kwargs: object) -> RawClient:
        return RawClient(self.path, export, **kwargs)  # type: ignore[arg-type]

    def on_loop(self, fn: object) -> object:
        done: Future[object] = Future()
        self.loop.call_soon_threadsafe(lambda: done.set_result(fn()))  # type: ignore[operator]
        return done.result(10)


@contextmanager
def serve(tmp_path: Path, limits: ServerLimits | None = None,
          size: int = 8 * MiB,
          listener: Callable[[socket.socket], socket.socket] = lambda sock: sock
          ) -> Iterator[Served]:
    disk = Disk.create(tmp_path / "d0", size)
    path = str(tmp_path / "nbd.sock")
    loop = asyncio.new_event_loop()
    ready: Future[NbdServer] = Future()
    stop = asyncio.Event()

    async def main() -> None:
        server = NbdServer(DiskCatalog.of({"d0": disk}), limits or ServerLimits())
        server.listen(listener(bind(Endpoint(unix_path=path))))
        ready.set_result(server)
        await stop.wait()
        await server.close()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    try:
        yield Served(path, disk, ready.result(10), loop)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        assert not thread.is_alive(), "the server did not stop"
        loop.close()
        disk.close()


def test_conformance_errors_keep_the_stream_in_sync(tmp_path: Path) -> None:
    with serve(tmp_path) as s:
        s.disk.create_snapshot("s1")
        c = s.client()
        size = c.size
        cases = [  # (request, expected errno)
            (dict(command=READ, offset=size - 4096, length=8192), EINVAL),  # read past EOF
            (dict(command=WRITE, offset=size - 2, length=4, data=b"abcd"), ENOSPC),
            (dict(command=WRITE_ZEROES, offset=size, length=4096), ENOSPC),
            (dict(command=TRIM, offset=2**64 - 4096, length=8192), EINVAL),  # overflow
            (dict(command=READ, offset=0, length=(32 << 20) + 1), EINVAL),  # too long
            (dict(command=READ, offset=0, length=0), EINVAL),
            (dict(command=BLOCK_STATUS, offset=0, length=4096), EINVAL),  # no context
            (dict(command=42, offset=0, length=0), EINVAL),  # unknown command
            (dict(command=FLUSH, offset=0, length=0, flags=FLAG_DF), EINVAL),  # DF on FLUSH
            (dict(command=WRITE, offset=0, length=3, flags=FLAG_REQ_ONE, data=b"xyz"), EINVAL),
            (dict(command=WRITE_ZEROES, offset=0, length=4096, flags=2 | 16), ENOTSUP),
        ]
        for cookie, (request, errno) in enumerate(cases, 1):
            c.send(cookie=cookie, **request)  # type: ignore[arg-type]
            reply = c.reply()
            assert (reply.cookie, reply.error) == (cookie, errno), (request, reply)
            assert reply.message
            c.send(READ, 0, 4096, cookie=1000 + cookie)  # still in sync
            assert c.reply().cookie == 1000 + cookie
        assert s.disk.pread(4, 0) == bytes(4)  # the refused write changed nothing
        c.close()
        snap = s.client("d0@s1")
        snap.send(WRITE, 0, 3, data=b"abc")
        assert snap.reply().error == EPERM
        snap.send(TRIM, 0, 4096, cookie=2)
        assert snap.reply().error == EPERM
        snap.close()


def test_fua_is_accepted_on_every_command_and_disc_with_it_disconnects(tmp_path: Path) -> None:
    """The spec: FUA is "valid for all commands, provided NBD_FLAG_SEND_FUA has been
    negotiated, in which case the server MUST accept all commands with this bit set (even by
    ignoring the bit)"; clients are known to set it on reads. NBD_CMD_DISC has no reply,
    whatever its flags."""
    fua = 1
    with serve(tmp_path) as s:
        s.disk.pwrite(b"\x5a" * 4096, 8192)
        c = s.client(contexts=("base:allocation",))
        c.send(READ, 8192, 4096, flags=fua, cookie=1)
        assert (reply := c.reply()).error == 0 and reply.data == b"\x5a" * 4096
        c.send(READ, 8192, 4096, flags=fua | FLAG_DF, cookie=2)
        assert c.reply().error == 0
        for cookie, (command, offset, length) in ((3, (FLUSH, 0, 0)), (4, (CACHE, 8192, 4096))):
            c.send(command, offset, length, flags=fua, cookie=cookie)
            reply = c.reply()
            assert (reply.cookie, reply.error) == (cookie, 0), reply
        c.send(BLOCK_STATUS, 0, 65536, flags=fua, cookie=5)
        reply = c.reply()
        assert reply.error == 0 and reply.block_status, reply
        c.send(DISC, flags=fua, cookie=6)
        c.sock.settimeout(5)
        assert c.sock.recv(1) == b""  # closed, no reply
        c.close()


def test_a_reply_that_cannot_be_finished_ends_the_connection(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk's file fails to read after the reply's first bytes went out: the server cannot
    finish the reply it began, so it disconnects (the spec: it "MUST immediately initiate a
    hard disconnect"), instead of leaving the client waiting for the rest."""
    import blocktrail.nbd.wire as wire

    real = os.sendfile
    calls: list[int] = []

    def failing(out: int, fd: int, offset: int, count: int) -> int:
        calls.append(count)
        if len(calls) == 1:
            return real(out, fd, offset, min(count, 4096))
        raise OSError(5, "Input/output error (injected)")

    with serve(tmp_path) as s:
        s.disk.pwrite(b"q" * MiB, 0)
        c = s.client(timeout=10)
        monkeypatch.setattr(wire.os, "sendfile", failing)
        c.send(READ, 0, MiB, cookie=1)
        with pytest.raises(ConnectionError):
            c.reply()
        monkeypatch.undo()
        assert calls
        deadline = time.monotonic() + 10
        while s.server.connections:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        c.close()
        fresh = s.client()  # the server goes on serving
        fresh.send(READ, 0, 4096, cookie=2)
        assert fresh.reply().data == b"q" * 4096
        fresh.close()


def test_df_is_offered_only_with_structured_replies(tmp_path: Path) -> None:
    """NBD_FLAG_SEND_DF: "MUST leave this flag clear if structured replies have not been
    negotiated"."""
    send_df = 1 << 7
    with serve(tmp_path) as s:
        plain, structured = s.client(structured=False), s.client()
        assert not plain.transmission_flags & send_df
        assert structured.transmission_flags & send_df
        plain.close()
        structured.close()


def _fill(disk: Disk, rng: random.Random) -> None:
    for _ in range(40):
        length = rng.choice((512, 4096, 65536, 200_000))
        disk.pwrite(rng.randbytes(length), rng.randrange(0, disk.size_bytes - length))


@pytest.mark.parametrize("structured", [True, False])
def test_reads_through_a_snapshot_chain_equal_the_disk(tmp_path: Path, structured: bool) -> None:
    rng = random.Random(5)
    with serve(tmp_path) as s:
        disk = s.disk
        _fill(disk, rng)
        disk.create_snapshot("a")
        _fill(disk, rng)
        disk.zero(3 * 65536, MiB)  # ZERO clusters in a delta
        disk.trim(10_000, 5 * MiB + 77)
        disk.create_snapshot("b")
        _fill(disk, rng)
        for export, snap in (("d0@a", "a"), ("d0@b", "b"), ("d0", None)):
            c = s.client(export, structured=structured)
            view = disk if snap is None else disk.open_snapshot(snap)
            for cookie in range(1, 40):
                length = rng.choice((1, 512, 65536, 300_001, 2 * MiB))
                offset = rng.randrange(0, c.size - length)
                flags = FLAG_DF if cookie % 5 == 0 else 0
                c.send(READ, offset, length, flags=flags, cookie=cookie)
                reply = c.reply()
                assert reply.error == 0 and bytes(reply.data) == view.pread(length, offset)
                if structured and flags & FLAG_DF:
                    assert [k for k, _ in reply.chunks] == [CHUNK_DATA]
            c.close()


def test_holes_are_sent_as_hole_chunks(tmp_path: Path) -> None:
    with serve(tmp_path) as s:
        s.disk.pwrite(b"x" * 65536, 0)
        s.disk.create_snapshot("a")
        s.disk.pwrite(b"y" * 65536, 2 * 65536)
        s.disk.create_snapshot("b")
        c = s.client("d0@b")
        c.send(READ, 0, 4 * 65536)
        reply = c.reply()
        assert reply.data == b"x" * 65536 + bytes(65536) + b"y" * 65536 + bytes(65536)
        assert [k for k, _ in reply.chunks] == [CHUNK_DATA, CHUNK_HOLE, CHUNK_DATA, CHUNK_HOLE]
        c.close()


def test_many_requests_in_flight_and_writes_through_every_command(tmp_path: Path) -> None:
    rng = random.Random(9)
    with serve(tmp_path) as s:
        c = s.client()
        model = bytearray(c.size)
        batch = bytearray()
        expected: dict[int, bytes | None] = {}
        slots = rng.sample(range(c.size // 80_000), 100)  # requests in flight may run in any
        for cookie in range(1, 101):  # order: they must not overlap
            offset = slots[cookie - 1] * 80_000 + rng.randrange(0, 10_000)
            kind = rng.random()
            if kind < 0.4:
                data = rng.randbytes(rng.randrange(1, 70_000))
                batch += c.request_bytes(WRITE, offset, len(data), data=data, cookie=cookie)
                model[offset : offset + len(data)] = data
                expected[cookie] = None
            elif kind < 0.5:
                batch += c.request_bytes(WRITE_ZEROES, offset, 9000, cookie=cookie)
                model[offset : offset + 9000] = bytes(9000)
                expected[cookie] = None
            else:
                batch += c.request_bytes(CACHE if kind < 0.55 else FLUSH, offset, 4096,
                                         cookie=cookie)
                expected[cookie] = None
        c.sock.sendall(batch)  # all at once: many in flight
        for _ in expected:
            assert c.reply().error == 0
        for cookie in range(1, 50):  # then many reads at once
            c.send(READ, (cookie - 1) * 160_000, 160_000, cookie=5000 + cookie)
        got = {}
        for _ in range(49):
            reply = c.reply()
            got[reply.cookie] = bytes(reply.data)
        for cookie in range(1, 50):
            offset = (cookie - 1) * 160_000
            assert got[5000 + cookie] == bytes(model[offset : offset + 160_000])
        c.close()


def test_block_status_contexts(tmp_path: Path) -> None:
    with serve(tmp_path) as s:
        s.disk.pwrite(b"a" * 65536, 0)
        first = s.disk.create_snapshot("s1").change_id
        s.disk.pwrite(b"b" * 65536, 3 * 65536)
        s.disk.create_snapshot("s2")
        c = s.client("d0@s2", contexts=("base:allocation", f"qemu:dirty-bitmap:{first}"))
        ids = {name: i for i, name in c.contexts.items()}
        c.send(BLOCK_STATUS, 0, 8 * 65536)
        reply = c.reply()
        assert reply.block_status[ids["base:allocation"]] == [
            (65536, 0), (2 * 65536, 3), (65536, 0), (4 * 65536, 3)]
        assert reply.block_status[ids[f"qemu:dirty-bitmap:{first}"]] == [
            (3 * 65536, 0), (65536, 1), (4 * 65536, 0)]
        c.send(BLOCK_STATUS, 65536, 65536, flags=FLAG_REQ_ONE, cookie=2)
        assert c.reply().block_status[ids["base:allocation"]] == [(65536, 3)]
        c.close()
        s.disk.pwrite(b"c" * 65536, 6 * MiB)  # one extent, found in growing windows
        s.disk.create_snapshot("s3")
        c = s.client("d0@s3", contexts=("base:allocation",))
        c.send(BLOCK_STATUS, 4 * 65536, c.size - 4 * 65536, flags=FLAG_REQ_ONE)
        assert c.reply().block_status[1] == [(6 * MiB - 4 * 65536, 3)]
        c.close()
        s.disk.reset_tracking()  # the change ID is stale now: an error, never "clean"
        c = s.client("d0@s2", contexts=(f"qemu:dirty-bitmap:{first}",))
        c.send(BLOCK_STATUS, 0, 65536)
        reply = c.reply()
        assert reply.error == EINVAL and "epoch" in reply.message and not reply.block_status
        c.close()


@pytest.mark.parametrize("end", ["disc", "eof"])
def test_requests_in_flight_are_answered_before_the_connection_ends(tmp_path: Path,
                                                                    end: str) -> None:
    """NBD_CMD_DISC (or the client's EOF) right behind requests still running on the disk
    threads: every one is answered, then the server closes the connection."""
    with serve(tmp_path) as s:
        c = s.client()
        batch = c.request_bytes(WRITE, 0, 4096, data=b"w" * 4096, cookie=1)
        batch += c.request_bytes(FLUSH, cookie=2) + c.request_bytes(BLOCK_STATUS, 0, 4096,
                                                                    cookie=3)
        c.sock.sendall(batch + (c.request_bytes(DISC, cookie=4) if end == "disc" else b""))
        if end == "eof":
            c.sock.shutdown(socket.SHUT_WR)
        replies: dict[int, int] = {}
        for _ in range(3):
            reply = c.reply()
            replies[reply.cookie] = reply.error
        assert replies == {1: 0, 2: 0, 3: EINVAL}  # block status: no context negotiated
        assert c.sock.recv(1) == b""  # then the server closes
        c.close()
        deadline = time.monotonic() + 10
        while s.server.connections and time.monotonic() < deadline:
            time.sleep(0.02)
        assert s.server.connections == 0
        assert s.disk.pread(4, 0) == b"wwww"


def test_a_client_that_never_reads_replies_is_held_off(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server stops reading from it; meanwhile its socket is off the loop (it stays
    registered from one request to the next, and is taken off while the server reads nothing
    from it: else the loop, told again on each of its turns that requests are waiting, would
    spin while the client is held off); every request is answered once it takes the replies."""
    calls = [0]
    on_readable = server_module._Connection._on_readable

    def counted(self: object) -> None:
        calls[0] += 1
        on_readable(self)  # type: ignore[arg-type]

    monkeypatch.setattr(server_module._Connection, "_on_readable", counted)
    limits = ServerLimits(requests_in_flight=4, bytes_in_flight=4 * MiB)
    with serve(tmp_path, limits, size=64 * MiB) as s:
        s.disk.pwrite(b"x" * (2 * MiB), 0)  # data: replies of holes would be a few bytes each
        c = s.client()
        c.sock.setblocking(False)
        sent = 0
        request = c.request_bytes(READ, 0, 2 * MiB)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # the server stops reading: our sends block
            try:
                c.sock.send(request)
                sent += 1
            except BlockingIOError:
                break
        else:
            pytest.fail("the server kept reading requests nobody takes the replies of")
        assert sent < 10_000
        time.sleep(0.2)  # the replies wait in the socket; the server waits for room
        before = calls[0]
        time.sleep(0.5)
        assert calls[0] - before <= 2, f"the loop was woken {calls[0] - before} times"
        c.sock.settimeout(30)
        for _ in range(sent):  # nothing was lost: every request is answered
            reply = c.reply()
            assert reply.error == 0 and reply.data == b"x" * (2 * MiB)
            c._reads[1] = (0, 2 * MiB)
        c.close()


def test_replies_done_at_once_count_against_the_limits(tmp_path: Path) -> None:
    """Requests answered on the loop (here a small dirty map: a reply of kilobytes for a
    request of 28 bytes; a small write or trim goes the same way) are held off too when their
    replies are not taken: the server stops reading, so its memory stays bounded."""
    command = BLOCK_STATUS
    limits = ServerLimits(requests_in_flight=4, bytes_in_flight=1 * MiB)
    with serve(tmp_path, limits, size=64 * MiB) as s:
        since = s.disk.create_snapshot("s1").change_id
        for block in range(0, 1024, 2):  # 512 areas apart: each map is 8 KiB of descriptors
            s.disk.pwrite(b"x", block * (64 << 10))
        c = s.client(contexts=(f"qemu:dirty-bitmap:{since}",))
        c.sock.setblocking(False)
        request = c.request_bytes(command, 0, 64 * MiB)
        pending, sent_bytes, deadline = bytearray(), 0, time.monotonic() + 10
        while time.monotonic() < deadline:  # until the server stops reading for good
            if not pending:
                pending += request * 64
            try:
                count = c.sock.send(pending)
            except BlockingIOError:
                if not select.select([], [c.sock], [], 1.0)[1]:
                    break  # no room for a second: the server reads no more
                continue
            del pending[:count]
            sent_bytes += count
        else:
            pytest.fail("the server kept reading requests nobody takes the replies of")
        c.sock.settimeout(30)
        sent = -(-sent_bytes // len(request))
        replies: list[object] = []

        def take() -> None:  # nothing was lost: every request is answered
            for _ in range(sent):
                reply = c.reply()
                assert reply.error == 0
                assert len(next(iter(reply.block_status.values()))) == 1024
                replies.append(reply)

        taking = threading.Thread(target=take)
        taking.start()
        c.sock.sendall(pending[: -sent_bytes % len(request)])  # the last one whole
        taking.join(60)
        assert len(replies) == sent
        c.close()


def test_a_batch_of_replies_done_at_once_stops_at_the_bytes_limit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests that arrive together and are all answered on the loop do not build a batch of
    replies past the limit before it is checked: the server sends it and waits for room."""
    limits = ServerLimits(requests_in_flight=4, bytes_in_flight=256 << 10)
    batches: list[int] = []
    send_done = server_module._Connection._send_done

    def spy(self: object, done: bytearray) -> None:
        batches.append(len(done))
        send_done(self, done)  # type: ignore[arg-type]

    monkeypatch.setattr(server_module._Connection, "_send_done", spy)
    with serve(tmp_path, limits, size=64 * MiB) as s:
        since = s.disk.create_snapshot("s1").change_id
        for block in range(0, 1024, 2):  # 512 areas apart: each map is 8 KiB of descriptors
            s.disk.pwrite(b"x", block * (64 << 10))
        c = s.client(contexts=(f"qemu:dirty-bitmap:{since}",))
        count = 512  # 14 KiB of requests in one send, 4 MiB of replies
        c.sock.sendall(c.request_bytes(BLOCK_STATUS, 0, 64 * MiB) * count)
        for _ in range(count):  # nothing was lost: every request is answered
            reply = c.reply()
            assert reply.error == 0 and len(next(iter(reply.block_status.values()))) == 1024
        c.close()
    reply_bytes = 12 + 8 + 1024 * 8 + 16  # header, context id, descriptors; some slack
    assert batches and max(batches) < limits.bytes_in_flight + reply_bytes


class _CountingWire(server_module.Wire):
    """A wire that keeps the most bytes the server ever had queued on it, unsent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.count_lock = threading.Lock()
        self.queued = self.most_queued = 0

    def send(self, items: list[Any], on_sent: Callable[[], None] | None = None, *,
             raw: bool = False) -> None:
        size = sum(len(i) for i in items)
        with self.count_lock:
            self.queued += size
            self.most_queued = max(self.most_queued, self.queued)

        def sent() -> None:
            with self.count_lock:
                self.queued -= size
            if on_sent is not None:
                on_sent()

        super().send(items, sent, raw=raw)


def test_a_client_that_never_reads_option_replies_is_held_off(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NBD_OPT_LIST over and over, no reply read: the server stops reading options once 1 MiB
    of replies wait for the client (it never holds more than that and the replies to the options
    of one read), and answers every option once the client reads again."""
    wires: list[_CountingWire] = []
    held_off = threading.Event()  # the server found no room for more option replies
    option_room = getattr(server_module._Connection, "_option_room", None)

    def room_spy(self: object) -> bool:
        room = option_room is not None and option_room(self)
        if not room:
            held_off.set()
        return room

    def counting_wire(*args: Any, **kwargs: Any) -> _CountingWire:
        wires.append(_CountingWire(*args, **kwargs))
        return wires[-1]

    monkeypatch.setattr(server_module, "Wire", counting_wire)
    monkeypatch.setattr(server_module._Connection, "_option_room", room_spy, raising=False)
    monkeypatch.setattr(server_module, "SEND_BUFFER_BYTES", 64 << 10)  # less to fill first
    count = (2 * MiB) // 16  # 5.75 MiB of replies: far more than the sockets buffer
    # the core answers every option a read brought before the server looks at the queue again
    bound = MiB + server_module.RECEIVE_BYTES // 16 * (20 + 6 + 20)
    with serve(tmp_path, ServerLimits(handshake_seconds=60)) as s:
        sock = socket.socket(socket.AF_UNIX)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(s.path)
        try:
            assert len(sock.recv(18)) == 18
            sock.sendall(struct.pack(">I", 3))
            sent_all = threading.Event()

            def send_options() -> None:
                sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_LIST, 0) * count)
                sent_all.set()
                held_off.set()

            sending = threading.Thread(target=send_options, daemon=True)
            sending.start()
            # Either the server holds off (it reads no more until replies go out) or it read
            # every option, queueing the replies of all that the sockets do not buffer.
            assert held_off.wait(60), "the server neither held off nor read every option"
            assert wires[0].most_queued <= bound, "the server held replies past the bound"
            assert not sent_all.is_set(), "the server read options nobody takes the replies of"
            received = recv_exactly(sock, count * (20 + 6 + 20))
            sending.join(60)
            assert sent_all.is_set()
        finally:
            sock.close()
    reply = struct.pack(">QII", OPT_REPLY_MAGIC, OPT_LIST, REP_SERVER)
    assert received[:16] == reply and received.count(reply) == count  # the server, an ACK
    assert wires[0].most_queued <= bound  # the reading let it read on, within the bound


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    out = bytearray()
    while len(out) < count:
        chunk = sock.recv(min(count - len(out), 1 << 20))
        if not chunk:
            raise ConnectionError("the server closed the connection")
        out += chunk
    return bytes(out)


class _OutOfDescriptors(socket.socket):
    """A listener whose first ``failing`` accepts fail as a process out of file descriptors
    sees them (EMFILE); the connection stays in the backlog."""

    failing = 2
    calls = 0

    def accept(self) -> tuple[socket.socket, Any]:
        type(self).calls += 1
        if type(self).calls <= self.failing:
            raise OSError(errno.EMFILE, "Too many open files")
        return super().accept()


def test_a_server_out_of_descriptors_pauses_accepting_and_serves_the_client_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """No busy loop on a connection it cannot take yet (the listener stays readable): it stops
    listening for a while, says why, and takes the connection once it can."""
    monkeypatch.setattr(server_module, "ACCEPT_RETRY_S", 0.3)
    monkeypatch.setattr(_OutOfDescriptors, "calls", 0)

    def failing(sock: socket.socket) -> socket.socket:
        wrapped = _OutOfDescriptors(sock.family, sock.type, fileno=sock.detach())
        wrapped.setblocking(False)
        return wrapped

    with serve(tmp_path, listener=failing) as s:
        started = time.monotonic()
        c = s.client()  # waits in the backlog through two failed accepts
        assert time.monotonic() - started >= 0.5
        c.send(READ, 0, 512)
        assert c.reply().error == 0
    assert _OutOfDescriptors.calls <= 4  # 2 failures, the client, the empty backlog
    assert "cannot accept a connection" in caplog.text and "Too many open files" in caplog.text


def test_connection_flood_is_capped_and_silent_clients_time_out(tmp_path: Path) -> None:
    limits = ServerLimits(max_connections=3, handshake_seconds=0.5)
    with serve(tmp_path, limits) as s:
        idle = []
        for _ in range(3):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(s.path)
            idle.append(sock)
        time.sleep(0.1)
        extra = socket.socket(socket.AF_UNIX)
        extra.settimeout(5)
        extra.connect(s.path)
        assert extra.recv(100) == b""  # closed at once: over the limit
        assert s.server.refused_connections >= 1
        for sock in idle:  # the silent ones are closed after the negotiation deadline
            sock.settimeout(5)
            data = sock.recv(100)
            assert len(data) == 18 and sock.recv(100) == b""
            sock.close()
        c = s.client()  # a real client gets in again
        c.send(READ, 0, 512)
        assert c.reply().error == 0
        c.close()
        extra.close()


def test_connect_disconnect_cycles_leave_no_descriptors(tmp_path: Path) -> None:
    with serve(tmp_path) as s:
        c = s.client()
        c.close()
        before = len(os.listdir("/proc/self/fd"))
        for i in range(300):
            c = s.client()
            if i % 3 == 0:
                c.send(READ, 0, 65536)
            elif i % 3 == 1:  # gone in the middle of a WRITE's payload
                c.sock.sendall(c.request_bytes(WRITE, 0, 65536, data=b"z" * 65536)[:1000])
            c.close()
        deadline = time.monotonic() + 10
        while s.server.connections and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.server.connections == 0
        assert len(os.listdir("/proc/self/fd")) <= before + 2
        assert s.disk.pread(65536, 0) == bytes(65536)  # no partial write was applied


def test_stopping_the_server_with_clients_attached(tmp_path: Path) -> None:
    started = time.monotonic()
    with serve(tmp_path) as s:
        clients = [s.client() for _ in range(5)]
        clients[0].send(READ, 0, 4096)
    assert time.monotonic() - started < 20
    for c in clients:
        c.close()
