"""What an NBD server sends, as bytes, to drive the sans-IO client core in tests: handshakes,
simple replies and structured reply chunks; and `feed`, which gives bytes to a client whole,
byte by byte, or through `get_buffer` / `buffer_updated` in random pieces."""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence

from blocktrail.nbd.proto import NEED_DATA, ClientConnection, Ready
from blocktrail.nbd.proto.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    HandshakeFlag,
    Info,
    Option,
    OptionReply,
    ReplyType,
    TransmissionFlag,
)

SIZE = 1 << 20
FLAGS = int(TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
            | TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES
            | TransmissionFlag.SEND_DF)
MODES = ("whole", "bytes", "buffers")


def _option(option: int, kind: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", OPTION_REPLY_MAGIC, option, kind, len(data)) + data


def handshake(*, structured: bool = True, contexts: Sequence[str] = ("base:allocation",),
              size: int = SIZE, flags: int = FLAGS,
              block_size: tuple[int, int, int] | None = (1, 4096, 32 << 20)) -> bytes:
    """Everything the server says up to GO's ACK, for a client asking for ``contexts`` (all
    agreed, ids from 1), given that it sends STRUCTURED_REPLY, SET_META_CONTEXT, GO."""
    out = struct.pack(">QQH", NBDMAGIC, IHAVEOPT,
                      HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)
    out += _option(Option.STRUCTURED_REPLY,
                   OptionReply.ACK if structured else OptionReply.ERR_UNSUP)
    if contexts:
        if structured:
            for index, name in enumerate(contexts, 1):
                out += _option(Option.SET_META_CONTEXT, OptionReply.META_CONTEXT,
                               struct.pack(">I", index) + name.encode())
            out += _option(Option.SET_META_CONTEXT, OptionReply.ACK)
        else:
            out += _option(Option.SET_META_CONTEXT, OptionReply.ERR_INVALID, b"no structured")
    out += _option(Option.GO, OptionReply.INFO, struct.pack(">HQH", Info.EXPORT, size, flags))
    if block_size is not None:
        out += _option(Option.GO, OptionReply.INFO, struct.pack(">HIII", Info.BLOCK_SIZE,
                                                                *block_size))
    return out + _option(Option.GO, OptionReply.ACK)


def connect(contexts: Sequence[str] = ("base:allocation",), **kwargs: object
            ) -> tuple[ClientConnection, Ready]:
    """A client that has negotiated (its option bytes sent and dropped)."""
    conn = ClientConnection("d", list(contexts))
    conn.receive_data(handshake(contexts=contexts, **kwargs))  # type: ignore[arg-type]
    while True:
        event = conn.next_event()
        if isinstance(event, Ready):
            conn.data_to_send()
            return conn, event
        assert event is not NEED_DATA, "the handshake did not reach Ready"


def chunk(cookie: int, kind: int, payload: bytes = b"", *, done: bool = False) -> bytes:
    return struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, int(done), kind, cookie,
                       len(payload)) + payload


def data(cookie: int, offset: int, payload: bytes, *, done: bool = False) -> bytes:
    return chunk(cookie, ReplyType.OFFSET_DATA, struct.pack(">Q", offset) + payload, done=done)


def hole(cookie: int, offset: int, length: int, *, done: bool = False) -> bytes:
    return chunk(cookie, ReplyType.OFFSET_HOLE, struct.pack(">QI", offset, length), done=done)


def status(cookie: int, context_id: int, descriptors: Sequence[tuple[int, int]], *,
           done: bool = False) -> bytes:
    payload = struct.pack(">I", context_id) + b"".join(struct.pack(">II", n, f)
                                                       for n, f in descriptors)
    return chunk(cookie, ReplyType.BLOCK_STATUS, payload, done=done)


def error(cookie: int, errno: int, message: str = "", *, done: bool = True,
          offset: int | None = None, kind: int | None = None) -> bytes:
    raw = message.encode()
    payload = struct.pack(">IH", errno, len(raw)) + raw
    if offset is not None:
        payload += struct.pack(">Q", offset)
    if kind is None:
        kind = ReplyType.ERROR if offset is None else ReplyType.ERROR_OFFSET
    return chunk(cookie, kind, payload, done=done)


def none(cookie: int) -> bytes:
    return chunk(cookie, ReplyType.NONE, done=True)


def simple(cookie: int, errno: int = 0, payload: bytes = b"") -> bytes:
    return struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, errno, cookie) + payload


def feed(conn: ClientConnection, stream: bytes, mode: str, *, eof: bool = False,
         seed: int = 0) -> list[object]:
    """Give ``stream`` to ``conn`` (``mode``: whole, bytes, buffers) and collect the events;
    whatever the core raises propagates."""
    events: list[object] = []

    def drain() -> None:
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
            if type(event).__name__ == "Disconnect":
                return

    if mode == "whole":
        if stream:
            conn.receive_data(stream)
        drain()
    elif mode == "bytes":
        for i in range(len(stream)):
            conn.receive_data(stream[i : i + 1])
            drain()
    else:
        rng = random.Random(seed)
        at = 0
        while at < len(stream):
            target = conn.get_buffer(-1)
            n = min(len(target), len(stream) - at, rng.choice((1, 3, 7, 20, 100, 4096, 1 << 20)))
            target[:n] = stream[at : at + n]
            conn.buffer_updated(n)
            at += n
            drain()
    if eof:
        conn.receive_data(b"")
        drain()
    return events
