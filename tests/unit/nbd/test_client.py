"""The sans-IO client core: against the sans-IO server, and against replies written byte by byte
(every rule the protocol gives a server, each violation a RemoteProtocolError), each stream fed
whole, byte by byte, and through get_buffer / buffer_updated."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from blocktrail.nbd.proto import (
    NEED_DATA,
    BlockSize,
    BlockStatus,
    ClientConnection,
    Command,
    CommandFlag,
    Disconnect,
    Errno,
    ExportInfo,
    LocalProtocolError,
    NegotiationRefused,
    ReadChunk,
    Ready,
    RemoteProtocolError,
    ReplyChunk,
    ReplyDone,
    ReplyType,
    Request,
    ServerConnection,
)
from blocktrail.nbd.proto.constants import OPTION_REPLY_MAGIC, Option, OptionReply
from nbdreplies import (
    MODES,
    chunk,
    connect,
    data,
    error,
    feed,
    handshake,
    hole,
    none,
    simple,
    status,
)

EXPORT = ExportInfo("d", 1 << 20, False, contexts=("base:allocation", "qemu:dirty-bitmap:"))
CONTEXTS = ("base:allocation", "qemu:dirty-bitmap:bm0")


class Catalog:
    def lookup(self, name: str) -> ExportInfo | None:
        return EXPORT if name == "d" else None

    def names(self) -> list[str]:
        return ["d"]


def pump(client: ClientConnection, server: ServerConnection, step: int) -> list[object]:
    """Move bytes both ways until neither side has anything to do; answer requests."""
    events: list[object] = []
    for _ in range(100_000):
        moved = False
        for data_, target in ((server.data_to_send(), client), (client.data_to_send(), server)):
            for i in range(0, len(data_), step):
                target.receive_data(data_[i : i + step])
                moved = True
                drain(client, server, events)
        drain(client, server, events)
        if not moved:
            return events
    raise AssertionError("no progress")


def drain(client: ClientConnection, server: ServerConnection, events: list[object]) -> None:
    while (event := server.next_event()) is not NEED_DATA:
        if isinstance(event, Request):
            if event.command is Command.READ:
                server.reply_chunk(event.cookie, ReplyType.OFFSET_DATA,
                                   struct.pack(">Q", event.offset) + b"x" * event.length,
                                   done=True)
            else:
                server.reply_error(event.cookie, Errno.EPERM, "read-only test")
        elif not hasattr(event, "export"):
            break
    while (event := client.next_event()) is not NEED_DATA:
        events.append(event)


@pytest.mark.parametrize("step", [1, 7, 1 << 20])
def test_negotiate_read_and_error_with_the_server_core(step: int) -> None:
    client = ClientConnection("d", ["base:allocation", "qemu:dirty-bitmap:x/1"])
    server = ServerConnection(Catalog())
    [ready] = pump(client, server, step)
    assert isinstance(ready, Ready)
    assert ready.contexts == {1: "base:allocation", 2: "qemu:dirty-bitmap:x/1"}
    assert ready.structured_replies and ready.size_bytes == 1 << 20
    assert ready.block_size == BlockSize(1, 4096, 32 << 20)
    read = client.send_request(Command.READ, 4096, 10)
    write = client.send_request(Command.WRITE, 0, 3, data=b"abc")
    buffer = bytearray(100)
    into = client.send_read(8192, buffer)
    events = pump(client, server, step)
    assert events == [ReplyChunk(read, ReplyType.OFFSET_DATA, struct.pack(">Q", 4096) + b"x" * 10),
                      ReplyDone(read, 0),
                      ReplyDone(write, Errno.EPERM, "read-only test"),
                      ReadChunk(into, 8192, 100), ReplyDone(into, 0)]
    assert buffer == b"x" * 100


def test_unknown_export_is_refused_with_the_servers_reason() -> None:
    client = ClientConnection("nope")
    server = ServerConnection(Catalog())
    with pytest.raises(NegotiationRefused, match=r"refused export 'nope'.*ERR_UNKNOWN"):
        pump(client, server, 1 << 20)


def test_block_size_and_refused_structured_replies_are_reported() -> None:
    conn = ClientConnection("d", ["base:allocation"])
    conn.receive_data(handshake(structured=False, block_size=(512, 4096, 1 << 20)))
    ready = conn.next_event()
    assert isinstance(ready, Ready)
    assert not ready.structured_replies and ready.contexts == {}
    assert ready.block_size == BlockSize(512, 4096, 1 << 20)
    with pytest.raises(LocalProtocolError, match="BLOCK_STATUS needs"):
        conn.send_request(Command.BLOCK_STATUS, 0, 512)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("last", "agreed"), [
    (OptionReply.ERR_INVALID, {}),  # contexts named, then refused: none is set
    (OptionReply.ACK, {7: "base:allocation"}),
])
def test_meta_contexts_hold_only_once_set_meta_context_is_acknowledged(
        mode: str, last: int, agreed: dict[int, str]) -> None:
    def reply(kind: int, data: bytes = b"") -> bytes:
        return struct.pack(">QIII", OPTION_REPLY_MAGIC, Option.SET_META_CONTEXT, kind,
                           len(data)) + data

    plain = handshake(contexts=())
    at = 18 + 20  # the greeting, STRUCTURED_REPLY's ACK; then SET_META_CONTEXT's replies
    stream = plain[:at] + reply(OptionReply.META_CONTEXT, struct.pack(">I", 7)
                                + b"base:allocation") + reply(last, b"") + plain[at:]
    conn = ClientConnection("d", ["base:allocation"])
    [ready] = feed(conn, stream, mode)
    assert isinstance(ready, Ready) and ready.contexts == agreed
    if not agreed:
        with pytest.raises(LocalProtocolError, match="needs structured replies and a meta"):
            conn.send_request(Command.BLOCK_STATUS, 0, 512)


@pytest.mark.parametrize("sizes", [(3, 4096, 1 << 20), (512, 256, 1 << 20), (512, 4096, 1000),
                                   (1 << 17, 1 << 17, 1 << 20)])
def test_invalid_block_size_constraints_are_a_protocol_error(sizes: tuple[int, int, int]
                                                            ) -> None:
    conn = ClientConnection("d")
    conn.receive_data(handshake(contexts=(), block_size=sizes))
    with pytest.raises(RemoteProtocolError, match="block size"):
        conn.next_event()


@pytest.mark.parametrize("mode", MODES)
def test_read_in_many_chunks_out_of_order_with_holes_lands_in_the_buffer(mode: str) -> None:
    conn, _ = connect()
    buffer = bytearray(b"\xee" * 20000)  # not zeroed: holes must be written
    cookie = conn.send_read(1 << 16, buffer)
    base = 1 << 16
    stream = (data(cookie, base + 10000, b"b" * 6000) + hole(cookie, base + 4000, 6000)
              + data(cookie, base, b"a" * 4000) + data(cookie, base + 16000, b"c" * 4000)
              + none(cookie))
    events = feed(conn, stream, mode)
    assert events == [ReadChunk(cookie, base + 10000, 6000),
                      ReadChunk(cookie, base + 4000, 6000, hole=True),
                      ReadChunk(cookie, base, 4000), ReadChunk(cookie, base + 16000, 4000),
                      ReplyDone(cookie, 0)]
    assert buffer == b"a" * 4000 + bytes(6000) + b"b" * 6000 + b"c" * 4000


@pytest.mark.parametrize("mode", MODES)
def test_many_requests_in_flight_answered_in_any_order(mode: str) -> None:
    conn, _ = connect(CONTEXTS)
    buffers = [bytearray(512) for _ in range(50)]
    reads = [conn.send_read(i * 512, b) for i, b in enumerate(buffers)]
    bs = conn.send_request(Command.BLOCK_STATUS, 0, 1 << 20)
    flush = conn.send_request(Command.FLUSH)
    stream = status(bs, 2, [(4096, 1), (8192, 0)]) + simple(flush)
    for cookie, i in sorted(zip(reads, range(50), strict=True), key=lambda p: -p[0]):
        stream += data(cookie, i * 512, bytes([i]) * 512, done=True)
    stream += status(bs, 1, [(1 << 20, 0)], done=True)
    events = feed(conn, stream, mode)
    assert [b[0] for b in buffers] == list(range(50))
    assert events[:2] == [BlockStatus(bs, 2, "qemu:dirty-bitmap:bm0", ((4096, 1), (8192, 0))),
                          ReplyDone(flush, 0)]
    assert events[-2:] == [BlockStatus(bs, 1, "base:allocation", ((1 << 20, 0),)),
                           ReplyDone(bs, 0)]
    assert sum(isinstance(e, ReplyDone) for e in events) == 52


@pytest.mark.parametrize("mode", MODES)
def test_simple_replies_when_structured_replies_were_refused(mode: str) -> None:
    conn = ClientConnection("d")
    conn.receive_data(handshake(structured=False, contexts=()))
    assert isinstance(conn.next_event(), Ready)
    buffer = bytearray(4096)
    read = conn.send_read(0, buffer)
    failed = conn.send_read(4096, bytearray(4096))
    write = conn.send_request(Command.WRITE, 0, 2, data=b"hi")
    stream = simple(read, 0, b"z" * 4096) + simple(failed, Errno.EIO) + simple(write)
    assert feed(conn, stream, mode) == [ReadChunk(read, 0, 4096), ReplyDone(read, 0),
                                       ReplyDone(failed, Errno.EIO), ReplyDone(write, 0)]
    assert buffer == b"z" * 4096


@pytest.mark.parametrize("mode", MODES)
def test_error_replies_end_one_request_and_the_connection_goes_on(mode: str) -> None:
    conn, _ = connect()
    a = conn.send_read(0, bytearray(8192))
    b = conn.send_request(Command.TRIM, 0, 4096)
    c = conn.send_request(Command.FLUSH)
    d = conn.send_read(0, bytearray(16))
    stream = (data(a, 0, b"x" * 4096) + error(a, Errno.EIO, "bad sector", done=False, offset=4096)
              + none(a) + error(b, Errno.ENOSPC, "full", kind=0x8003)
              + error(c, Errno.EPERM) + data(d, 0, b"y" * 16, done=True))
    events = feed(conn, stream, mode)
    assert [e for e in events if isinstance(e, ReplyDone)] == [
        ReplyDone(a, Errno.EIO, "bad sector"), ReplyDone(b, Errno.ENOSPC, "full"),
        ReplyDone(c, Errno.EPERM, ""), ReplyDone(d, 0)]


def _read(conn: ClientConnection, length: int = 4096, offset: int = 0, flags: int = 0) -> int:
    return conn.send_read(offset, bytearray(length), flags)


# what the server does wrong -> its bytes, given the cookies of a READ of 4096 bytes at 0, a
# BLOCK_STATUS of 65536 bytes at 0 (two contexts), a FLUSH, and a READ of 16 bytes sent with DF
VIOLATIONS: dict[str, Callable[[int, int, int, int], bytes]] = {
    "bad magic": lambda r, s, f, df: b"\x00" * 20,
    "cookie not in flight": lambda r, s, f, df: simple(999),
    "chunk outside the read": lambda r, s, f, df: data(r, 4000, b"x" * 200),
    "chunk before the read": lambda r, s, f, df: hole(r, 2**64 - 8, 16),
    "overlapping chunks": lambda r, s, f, df: data(r, 0, b"x" * 100) + hole(r, 50, 100),
    "success without all the data": lambda r, s, f, df: data(r, 0, b"x" * 4095, done=True),
    "data for a flush": lambda r, s, f, df: data(f, 0, b"x"),
    "data chunk without data": lambda r, s, f, df: data(r, 0, b""),
    "hole of 0 bytes": lambda r, s, f, df: hole(r, 0, 0),
    "hole chunk of the wrong size": lambda r, s, f, df: chunk(r, ReplyType.OFFSET_HOLE, b"\0" * 8),
    "NONE without DONE": lambda r, s, f, df: chunk(f, ReplyType.NONE),
    "NONE with a payload": lambda r, s, f, df: chunk(f, ReplyType.NONE, b"x", done=True),
    "unknown chunk type": lambda r, s, f, df: chunk(f, 77, b""),
    "error 0": lambda r, s, f, df: error(f, 0, "oops"),
    "error message overruns": lambda r, s, f, df: chunk(
        f, ReplyType.ERROR, struct.pack(">IH", 5, 100) + b"short", done=True),
    "error offset outside": lambda r, s, f, df: error(r, 5, "x", offset=8192),
    "status for a read": lambda r, s, f, df: status(r, 1, [(4096, 0)]),
    "status for an unknown context": lambda r, s, f, df: status(s, 7, [(4096, 0)]),
    "status twice for one context": lambda r, s, f, df: status(s, 1, [(4096, 0)]) + status(
        s, 1, [(4096, 0)]),
    "status missing a context": lambda r, s, f, df: status(s, 1, [(4096, 0)], done=True),
    "descriptor of length 0": lambda r, s, f, df: status(s, 1, [(0, 0), (4096, 0)]),
    "descriptors past the range": lambda r, s, f, df: status(s, 1, [(65536, 0), (4096, 1)]),
    "empty status chunk": lambda r, s, f, df: status(s, 1, []),
    "simple reply to READ after structured": lambda r, s, f, df: simple(r, 0, b"x" * 4096),
    "simple success for BLOCK_STATUS": lambda r, s, f, df: simple(s),
    "two chunks for a DF read": lambda r, s, f, df: data(df, 0, b"x") + data(df, 1, b"y"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("violation", sorted(VIOLATIONS))
def test_every_violation_is_a_remote_protocol_error(violation: str, mode: str) -> None:
    conn, _ = connect(CONTEXTS)
    r = _read(conn)
    s = conn.send_request(Command.BLOCK_STATUS, 0, 65536)
    f = conn.send_request(Command.FLUSH)
    df = _read(conn, 16, 0, CommandFlag.DF)
    stream = VIOLATIONS[violation](r, s, f, df)
    with pytest.raises(RemoteProtocolError):
        feed(conn, stream, mode)
    assert conn.next_event() == Disconnect()  # the connection is over


def test_structured_chunk_without_structured_replies_is_a_protocol_error() -> None:
    conn = ClientConnection("d")
    conn.receive_data(handshake(structured=False, contexts=()))
    assert isinstance(conn.next_event(), Ready)
    flush = conn.send_request(Command.FLUSH)
    conn.receive_data(none(flush))
    with pytest.raises(RemoteProtocolError, match="not negotiated"):
        conn.next_event()


@pytest.mark.parametrize("mode", MODES)
def test_eof_mid_reply_or_with_requests_unanswered_is_a_protocol_error(mode: str) -> None:
    conn, _ = connect()
    cookie = _read(conn)
    with pytest.raises(RemoteProtocolError, match="middle of a reply"):
        feed(conn, data(cookie, 0, b"x" * 4096)[:100], mode, eof=True)
    conn, _ = connect()
    _read(conn)
    with pytest.raises(RemoteProtocolError, match="unanswered"):
        feed(conn, b"", mode, eof=True)


def test_disconnect_waits_for_replies_in_flight_then_ends_at_eof() -> None:
    conn, _ = connect()
    buffer = bytearray(16)
    cookie = conn.send_read(0, buffer)
    conn.send_request(Command.DISC)
    with pytest.raises(LocalProtocolError, match="closed"):
        conn.send_request(Command.FLUSH)
    sent = conn.data_to_send()
    assert len(sent) == 56 and struct.unpack_from(">H", sent, 34)[0] == Command.DISC
    events = feed(conn, data(cookie, 0, b"q" * 16, done=True), "whole", eof=True)
    assert events == [ReadChunk(cookie, 0, 16), ReplyDone(cookie, 0), Disconnect()]


def test_a_large_write_payload_is_passed_on_without_a_copy() -> None:
    conn, _ = connect()
    payload = bytearray(1 << 20)
    small = conn.send_request(Command.WRITE, 0, 10, data=b"0123456789")
    big = conn.send_request(Command.WRITE, 4096, len(payload), data=payload)
    buffers = conn.buffers_to_send()
    assert len(buffers) == 2 and isinstance(buffers[1], memoryview)
    assert buffers[1].obj is payload  # the caller's buffer itself
    header = buffers[0]
    assert len(header) == 28 + 10 + 28 and struct.unpack_from(">Q", header, 38 + 8)[0] == big
    assert small == big - 1


def test_requests_are_checked_before_they_are_sent() -> None:
    conn, _ = connect()
    with pytest.raises(LocalProtocolError, match="not allowed"):
        conn.send_request(Command.READ, 0, 10, flags=CommandFlag.REQ_ONE)
    with pytest.raises(LocalProtocolError, match="wire format"):
        conn.send_request(Command.TRIM, 0, 1 << 32)
    with pytest.raises(LocalProtocolError, match="writable"):
        conn.send_read(0, memoryview(b"read-only"))
    with pytest.raises(LocalProtocolError, match="length must equal"):
        conn.send_request(Command.WRITE, 0, 5, data=b"abc")
    assert conn.data_to_send() == b""
    fresh = ClientConnection("d")
    with pytest.raises(LocalProtocolError, match="not in transmission"):
        fresh.send_request(Command.FLUSH)
