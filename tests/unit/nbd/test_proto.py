"""The sans-IO server core: negotiation and transmission, fed whole, byte by byte and with
trailing bytes; bounded input; errors poison the connection."""

from __future__ import annotations

import struct

import pytest

from blocktrail.nbd.proto import (
    NEED_DATA,
    Command,
    CommandFlag,
    Disconnect,
    ExportChosen,
    ExportInfo,
    InvalidRequest,
    LocalProtocolError,
    RemoteProtocolError,
    Request,
    ServerConnection,
)
from blocktrail.nbd.proto.constants import (
    IHAVEOPT,
    MAX_PAYLOAD,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    Info,
    Option,
    OptionReply,
)
from blocktrail.nbd.proto.server import CACHED_EXPORTS, UNSEEN_PAYLOAD_BYTES

EXPORT = ExportInfo("disk0", 1 << 20, False, "test", ("base:allocation", "qemu:dirty-bitmap:"))


class Catalog:
    def lookup(self, name: str) -> ExportInfo | None:
        return EXPORT if name == "disk0" else None

    def names(self) -> list[str]:
        return ["disk0"]


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def go(name: bytes = b"disk0", infos: tuple[int, ...] = (Info.BLOCK_SIZE,)) -> bytes:
    return option(Option.GO, struct.pack(">I", len(name)) + name
                  + struct.pack(f">H{len(infos)}H", len(infos), *infos))


def meta(opt: int, *queries: bytes) -> bytes:
    body = struct.pack(">I", 5) + b"disk0" + struct.pack(">I", len(queries))
    body += b"".join(struct.pack(">I", len(q)) + q for q in queries)
    return option(opt, body)


def request(command: Command, offset: int = 0, length: int = 0, flags: int = 0,
            data: bytes = b"", cookie: int = 7) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, command, cookie, offset, length) + data


CLIENT = (struct.pack(">I", 3) + option(Option.STRUCTURED_REPLY)
          + meta(Option.SET_META_CONTEXT, b"base:allocation", b"qemu:dirty-bitmap:x/1")
          + go() + request(Command.WRITE, 4096, 3, data=b"abc")
          + request(Command.BLOCK_STATUS, 0, 65536, CommandFlag.REQ_ONE)
          + request(Command.DISC))


def drive(chunks: list[bytes]) -> tuple[list[object], bytes]:
    conn = ServerConnection(Catalog())
    out = conn.data_to_send()
    events: list[object] = []
    for chunk in [*chunks, b""]:
        conn.receive_data(chunk)
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
            if isinstance(event, Disconnect):
                return events, out + conn.data_to_send()
        out += conn.data_to_send()
    return events, out


def expected_events() -> list[object]:
    return [ExportChosen(EXPORT, True, {1: "base:allocation", 2: "qemu:dirty-bitmap:x/1"}),
            Request(7, Command.WRITE, CommandFlag(0), 4096, 3, b"abc"),
            Request(7, Command.BLOCK_STATUS, CommandFlag.REQ_ONE, 0, 65536), Disconnect()]


def test_whole_and_byte_by_byte_agree() -> None:
    whole, out_whole = drive([CLIENT])
    single, out_single = drive([CLIENT[i : i + 1] for i in range(len(CLIENT))])
    assert whole == single == expected_events()
    assert out_whole == out_single
    assert out_whole.startswith(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3))


def test_trailing_bytes_after_disconnect_are_not_read() -> None:
    events, _ = drive([CLIENT + b"garbage after DISC"])
    assert events == expected_events()


def test_go_replies_info_export_and_block_size() -> None:
    _, out = drive([struct.pack(">I", 1) + go()])
    replies = _option_replies(out[18:])
    kinds = [(k, d[:2]) for _, k, d in replies]
    assert kinds[0] == (OptionReply.INFO, struct.pack(">H", Info.EXPORT))
    assert (OptionReply.INFO, struct.pack(">H", Info.BLOCK_SIZE)) in kinds
    assert replies[-1][1] == OptionReply.ACK


def test_unknown_export_and_option_get_error_replies() -> None:
    conn = ServerConnection(Catalog())
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", 1) + go(b"nope") + option(99) + option(Option.LIST))
    assert conn.next_event() is NEED_DATA
    kinds = [k for _, k, _ in _option_replies(conn.data_to_send())]
    assert kinds == [OptionReply.ERR_UNKNOWN, OptionReply.ERR_UNSUP, OptionReply.SERVER,
                     OptionReply.ACK]


def test_a_failed_set_meta_context_leaves_no_context_set() -> None:
    """SET_META_CONTEXT "replaces all previously-set metadata contexts (including when this
    command fails)"."""
    bad = struct.pack(">I", 4) + b"nope" + struct.pack(">I", 1) + struct.pack(">I", 15) \
        + b"base:allocation"
    events, _ = drive([struct.pack(">I", 3) + option(Option.STRUCTURED_REPLY)
                       + meta(Option.SET_META_CONTEXT, b"base:allocation")
                       + option(Option.SET_META_CONTEXT, bad) + go() + request(Command.DISC)])
    assert events[0] == ExportChosen(EXPORT, True, {})


def test_list_meta_context_namespaces() -> None:
    conn = ServerConnection(Catalog())
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", 1) + meta(Option.LIST_META_CONTEXT, b"base:"))
    assert conn.next_event() is NEED_DATA
    replies = _option_replies(conn.data_to_send())
    assert [d[4:] for _, k, d in replies if k == OptionReply.META_CONTEXT] == [b"base:allocation"]


@pytest.mark.parametrize("payload", [
    option(Option.EXPORT_NAME, b"x" * 5000),  # oversized export name
    struct.pack(">QII", IHAVEOPT, Option.GO, 2**32 - 1),  # huge option length, not buffered
    struct.pack(">QII", 0x1234, 1, 0),  # bad option magic
    option(Option.EXPORT_NAME, b"nope"),  # unknown export with EXPORT_NAME: no way to refuse
])
def test_cve_classes_are_protocol_errors(payload: bytes) -> None:
    conn = ServerConnection(Catalog())
    conn.receive_data(struct.pack(">I", 1) + payload)
    with pytest.raises(RemoteProtocolError):
        while conn.next_event() is not NEED_DATA:
            pass
    assert conn.next_event() == Disconnect()  # poisoned: nothing more is read


def test_oversized_write_is_a_protocol_error() -> None:
    conn = ServerConnection(Catalog())
    conn.receive_data(struct.pack(">I", 1) + go() + request(Command.WRITE, 0, 64 << 20))
    assert isinstance(conn.next_event(), ExportChosen)
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


@pytest.mark.parametrize(("bad", "why"), [
    (request(Command.READ, flags=CommandFlag.NO_HOLE, cookie=1), "not allowed on READ"),
    (request(Command.WRITE, 0, 3, CommandFlag.REQ_ONE, b"abc", cookie=1), "not allowed on WRITE"),
    (struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 42, 1, 0, 0), "unknown command 42"),
    (request(Command.READ, 0, (32 << 20) + 1, cookie=1), "exceeds"),
])
def test_bad_requests_get_einval_and_the_stream_stays_in_sync(bad: bytes, why: str) -> None:
    conn = ServerConnection(Catalog())
    conn.receive_data(struct.pack(">I", 1) + go() + bad + request(Command.FLUSH, cookie=2))
    assert isinstance(conn.next_event(), ExportChosen)
    refused = conn.next_event()
    assert isinstance(refused, InvalidRequest)
    assert (refused.cookie, refused.errno) == (1, 22) and why in refused.message
    assert conn.next_event() == Request(2, Command.FLUSH, CommandFlag(0), 0, 0)


def test_eof_mid_message_is_a_protocol_error() -> None:
    conn = ServerConnection(Catalog())
    conn.receive_data(struct.pack(">I", 1) + go()[:10])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def _option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        magic, opt, kind, length = struct.unpack_from(">QIII", data, pos)
        assert magic == OPTION_REPLY_MAGIC
        out.append((opt, kind, data[pos + 20 : pos + 20 + length]))
        pos += 20 + length
    return out


def test_one_negotiation_asks_the_catalog_once_per_name() -> None:
    asked: list[str] = []

    class Counting(Catalog):
        def lookup(self, name: str) -> ExportInfo | None:
            asked.append(name)
            return super().lookup(name)

    conn = ServerConnection(Counting())
    conn.receive_data(struct.pack(">I", 1) + option(Option.STRUCTURED_REPLY)
                      + meta(Option.LIST_META_CONTEXT) + meta(Option.SET_META_CONTEXT, b"base:")
                      + go(b"nope") + go(b"nope") + option(Option.INFO, go()[16:]) + go())
    assert isinstance(conn.next_event(), ExportChosen)
    assert asked == ["disk0", "nope"]


def test_a_negotiation_keeps_the_answers_of_a_bounded_number_of_names() -> None:
    """A client asking after thousands of names gets each answered, and the server keeps only
    a few of the catalog's answers."""
    conn = ServerConnection(Catalog())
    conn.data_to_send()  # the greeting
    names = [b"name-%05d" % i for i in range(2000)]
    conn.receive_data(struct.pack(">I", 1) + b"".join(option(Option.INFO, go(n)[16:])
                                                      for n in names))
    assert conn.next_event() is NEED_DATA
    replies = _option_replies(conn.data_to_send())
    assert [kind for _, kind, _ in replies] == [OptionReply.ERR_UNKNOWN] * len(names)
    assert len(conn._neg.exports) <= CACHED_EXPORTS


# ---------------------------------------------------------------------- receiving into buffers

BIG = bytes(range(256)) * 400  # 100 KiB: received in place
LARGE_CLIENT = (struct.pack(">I", 1) + go()
                + request(Command.WRITE, 0, len(BIG), data=BIG, cookie=1)
                + request(Command.WRITE, 4096, 3, data=b"abc", cookie=2)
                + request(Command.WRITE, 0, len(BIG), CommandFlag.REQ_ONE, BIG, cookie=3)
                + request(Command.WRITE, 8192, len(BIG), CommandFlag.FUA, BIG, cookie=4)
                + request(Command.FLUSH, cookie=5) + request(Command.DISC))


def drive_into(stream: bytes, sizes: list[int], catalog: Catalog | None = None) -> list[object]:
    """``stream`` as a socket's ``recv_into`` gives it: at most the next size of ``sizes``
    (cycled) into each buffer the core lends."""
    conn = ServerConnection(catalog or Catalog())
    conn.data_to_send()
    events: list[object] = []
    pos, turn = 0, 0
    while True:
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
            if isinstance(event, Disconnect):
                return events
        if pos == len(stream):
            conn.receive_data(b"")
            continue
        buffer = conn.get_buffer()
        count = min(len(buffer), sizes[turn % len(sizes)], len(stream) - pos)
        buffer[:count] = stream[pos : pos + count]
        conn.buffer_updated(count)
        pos, turn = pos + count, turn + 1


def large_events() -> list[object]:
    return [ExportChosen(EXPORT, False, {}),
            Request(1, Command.WRITE, CommandFlag(0), 0, len(BIG), BIG),
            Request(2, Command.WRITE, CommandFlag(0), 4096, 3, b"abc"),
            InvalidRequest(3, Command.WRITE, 22, "flags 0x8 are not allowed on WRITE"),
            Request(4, Command.WRITE, CommandFlag.FUA, 8192, len(BIG), BIG),
            Request(5, Command.FLUSH, CommandFlag(0), 0, 0), Disconnect()]


@pytest.mark.parametrize("sizes", [[1 << 30], [1], [7, 4096, 28, 100_000], [28, 1 << 20]])
def test_receiving_into_lent_buffers_gives_the_same_events(sizes: list[int]) -> None:
    assert drive_into(LARGE_CLIENT, sizes) == large_events()


def test_large_payloads_fed_whole_and_byte_by_byte_agree() -> None:
    whole, _ = drive([LARGE_CLIENT])
    single, _ = drive([LARGE_CLIENT[i : i + 1] for i in range(len(LARGE_CLIENT))])
    assert whole == single == large_events()


def test_a_large_payload_is_received_in_place() -> None:
    conn = ServerConnection(Catalog())
    header = struct.pack(">I", 1) + go() + request(Command.WRITE, 0, len(BIG), cookie=1)
    conn.receive_data(header + BIG[:10])
    assert isinstance(conn.next_event(), ExportChosen)
    assert conn.next_event() is NEED_DATA
    buffer = conn.get_buffer()
    assert len(buffer) == len(BIG) - 10  # exactly the rest of the payload
    buffer[:] = BIG[10:]
    conn.buffer_updated(len(buffer))
    event = conn.next_event()
    assert isinstance(event, Request) and event.data == BIG
    assert isinstance(event.data, bytearray) and buffer.obj is event.data
    assert len(conn.get_buffer()) < len(BIG)  # the next header: little to copy of a payload


def test_eof_inside_a_large_payload_is_a_protocol_error() -> None:
    conn = ServerConnection(Catalog())
    conn.receive_data(struct.pack(">I", 1) + go() + request(Command.WRITE, 0, len(BIG))
                      + BIG[:100])
    assert isinstance(conn.next_event(), ExportChosen)
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_buffer_updated_is_checked() -> None:
    conn = ServerConnection(Catalog())
    with pytest.raises(LocalProtocolError):
        conn.buffer_updated(0)
    with pytest.raises(LocalProtocolError):
        conn.buffer_updated(1)  # nothing was lent
    lent = conn.get_buffer()
    with pytest.raises(LocalProtocolError):
        conn.buffer_updated(len(lent) + 1)


def test_a_payload_handed_back_takes_the_next_one() -> None:
    conn = ServerConnection(Catalog())
    second = bytes(reversed(BIG))
    conn.receive_data(struct.pack(">I", 1) + go() + request(Command.WRITE, 0, len(BIG), cookie=1))
    assert isinstance(conn.next_event(), ExportChosen)
    assert conn.next_event() is NEED_DATA
    conn.receive_data(BIG)
    first = conn.next_event()
    assert isinstance(first, Request) and first.data == BIG
    conn.reuse(first.data)
    conn.receive_data(request(Command.WRITE, 0, len(BIG), cookie=2) + second[:5])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(second[5:])
    event = conn.next_event()
    assert isinstance(event, Request) and event.data == second and event.data is first.data


WIDE = ExportInfo("disk0", 64 << 20, False, "test", ("base:allocation",))


class WideCatalog(Catalog):
    def lookup(self, name: str) -> ExportInfo | None:
        return WIDE if name == "disk0" else None


def test_a_header_alone_does_not_make_the_server_hold_a_large_payload() -> None:
    """A WRITE header announcing 32 MiB, then a trickle: the server holds what came, not what
    was announced; from a quarter of it on, the rest is received in place."""
    huge = bytes(range(256)) * (MAX_PAYLOAD // 256)
    conn = ServerConnection(WideCatalog())
    conn.receive_data(struct.pack(">I", 1) + go()
                      + request(Command.WRITE, 0, len(huge), cookie=1) + huge[:100])
    assert isinstance(conn.next_event(), ExportChosen)
    assert conn.next_event() is NEED_DATA
    assert len(conn.get_buffer()) <= UNSEEN_PAYLOAD_BYTES  # a scratch buffer, not the payload
    conn.receive_data(huge[100 : len(huge) // 4])
    assert conn.next_event() is NEED_DATA
    rest = conn.get_buffer()
    assert len(rest) == len(huge) - len(huge) // 4  # now in place: the rest of the payload
    rest[:] = huge[len(huge) // 4 :]
    conn.buffer_updated(len(rest))
    event = conn.next_event()
    assert isinstance(event, Request) and event.data == huge and rest.obj is event.data


@pytest.mark.parametrize("sizes", [[1 << 30], [28, 65536], [4096, 300_000]])
def test_a_payload_larger_than_the_unseen_limit_gives_the_same_events(sizes: list[int]) -> None:
    payload = bytes(range(256)) * (3 * UNSEEN_PAYLOAD_BYTES // 256)
    stream = (struct.pack(">I", 1) + go()
              + request(Command.WRITE, 0, len(payload), data=payload, cookie=1)
              + request(Command.WRITE, 0, len(BIG), data=BIG, cookie=2)
              + request(Command.DISC))
    assert drive_into(stream, sizes, WideCatalog()) == [
        ExportChosen(WIDE, False, {}),
        Request(1, Command.WRITE, CommandFlag(0), 0, len(payload), payload),
        Request(2, Command.WRITE, CommandFlag(0), 0, len(BIG), BIG), Disconnect()]
