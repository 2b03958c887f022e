"""Garbage, truncated and well-framed but wrong server input to the NBD client core yields only
RemoteProtocolError; fed whole, byte by byte, or through get_buffer/buffer_updated, the same
input gives the same events, the same read buffers and the same error; a prefix of the input
gives a prefix of the events, and trailing bytes change nothing that came before them."""

from __future__ import annotations

import contextlib
import os
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blocktrail.nbd.proto import (
    NEED_DATA,
    ClientConnection,
    Command,
    Disconnect,
    Errno,
    RemoteProtocolError,
    ReplyType,
)
from nbdreplies import MODES, chunk, connect, data, error, feed, handshake, hole, simple, status

EXAMPLES = 10_000 if os.environ.get("HYPOTHESIS_PROFILE") == "ci" else 300
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
CONTEXTS = ("base:allocation", "qemu:dirty-bitmap:bm0")
# cookies of the requests `start` sends, in order, and one never sent
READ, LEGACY_READ, STATUS, FLUSH, WRITE, STRANGER = 1, 2, 3, 4, 5, 999


def start(structured: bool = True) -> tuple[ClientConnection, bytearray]:
    """A negotiated client with five requests in flight: a READ of 4096 bytes at 0 into a
    buffer, a READ of 2048 bytes at 4096 without one, BLOCK_STATUS of 65536 bytes at 0, FLUSH,
    and a WRITE of 3 bytes."""
    if structured:
        conn, _ = connect(CONTEXTS)
    else:
        conn = ClientConnection("d")
        conn.receive_data(handshake(structured=False, contexts=()))
        conn.next_event()
    buffer = bytearray(b"\xaa" * 4096)
    assert conn.send_read(0, buffer) == READ
    assert conn.send_request(Command.READ, 4096, 2048) == LEGACY_READ
    if structured:
        assert conn.send_request(Command.BLOCK_STATUS, 0, 65536) == STATUS
    else:
        conn.send_request(Command.CACHE, 0, 512)
    assert conn.send_request(Command.FLUSH) == FLUSH
    assert conn.send_request(Command.WRITE, 0, 3, data=b"abc") == WRITE
    return conn, buffer


cookies = st.sampled_from([READ, LEGACY_READ, STATUS, FLUSH, WRITE, STRANGER])
offsets = st.sampled_from([0, 1, 512, 2048, 4000, 4095, 4096, 5000, 6143, 6144, 1 << 63])
lengths = st.sampled_from([0, 1, 96, 512, 2048, 4096, 65536])
done = st.booleans()
pieces = st.sampled_from([0, 512, 1024, 2048, 3072])
sizes = st.sampled_from([512, 1024, 2048])
# replies that fit their request (so that the stream gets past the first chunk) ...
plausible = st.one_of(
    st.builds(lambda o, n, d: data(READ, o, bytes([o % 251 + 1]) * n, done=d), pieces, sizes,
              done),
    st.builds(lambda o, n, d: hole(READ, o, n, done=d), pieces, sizes, done),
    st.builds(lambda o, n, d: data(LEGACY_READ, 4096 + o, b"l" * n, done=d),
              st.sampled_from([0, 1024]), sizes, done),
    st.builds(lambda c, ds, d: status(STATUS, c, ds, done=d), st.sampled_from([1, 2]),
              st.lists(st.tuples(st.sampled_from([4096, 8192, 65536]), st.integers(0, 3)),
                       min_size=1, max_size=3), done),
    st.builds(lambda c, plain: simple(c) if plain else chunk(c, ReplyType.NONE, done=True),
              st.sampled_from([FLUSH, WRITE]), st.booleans()),
    st.builds(lambda c, e, m, d: error(c, e, m, done=d), cookies,
              st.sampled_from([Errno.EIO, Errno.ESHUTDOWN]), st.text(max_size=8), done),
)
# ... and replies that mostly do not
wild = st.one_of(
    st.builds(lambda c, o, n, d: data(c, o, bytes([o % 251]) * n, done=d),
              cookies, offsets, st.sampled_from([0, 1, 96, 512, 2048]), done),
    st.builds(hole, cookies, offsets, lengths, done=done),
    st.builds(status, cookies, st.integers(0, 3),
              st.lists(st.tuples(lengths, st.integers(0, 3)), max_size=4), done=done),
    st.builds(error, cookies, st.sampled_from([0, Errno.EIO, Errno.ESHUTDOWN]),
              st.text(max_size=8), done=done, offset=st.none() | offsets,
              kind=st.none() | st.sampled_from([ReplyType.ERROR, 0x8005])),
    st.builds(chunk, cookies, st.sampled_from([ReplyType.NONE, 3, 0x7FFF]),
              st.binary(max_size=8), done=done),
    st.builds(simple, cookies, st.sampled_from([0, Errno.EIO]),
              st.sampled_from([b"", b"s" * 2048, b"t" * 4096])),
    st.binary(min_size=1, max_size=12),
)
replies = st.one_of(plausible, plausible, plausible, wild)


def run(stream: bytes, mode: str, *, structured: bool = True, eof: bool = False
        ) -> tuple[list[object], str | None, bytes]:
    """Feed ``stream`` (``mode``: whole, bytes, buffers); -> (the events, including those
    before an error; the protocol error's message or None; the read buffer)."""
    conn, buffer = start(structured)
    seen: list[object] = []

    def collect() -> None:
        while (event := conn.next_event()) is not NEED_DATA:
            seen.append(event)
            if isinstance(event, Disconnect):
                return

    rng = random.Random(len(stream))
    try:
        at = 0
        while at < len(stream):
            if mode == "buffers":
                target = conn.get_buffer(-1)
                n = min(len(target), len(stream) - at, rng.choice((1, 2, 5, 17, 64, 4096)))
                target[:n] = stream[at : at + n]
                conn.buffer_updated(n)
            else:
                n = len(stream) if mode == "whole" else 1
                conn.receive_data(stream[at : at + n])
            at += n
            collect()
        if eof:
            conn.receive_data(b"")
            collect()
    except RemoteProtocolError as exc:
        return seen, exc.message, bytes(buffer)
    return seen, None, bytes(buffer)


@FUZZ
@given(st.binary(max_size=512), st.sampled_from(MODES), st.booleans(), st.booleans())
def test_garbage_yields_only_protocol_errors(garbage: bytes, mode: str, negotiated: bool,
                                             eof: bool) -> None:
    if negotiated:
        conn, _ = start()
    else:
        conn = ClientConnection("d", list(CONTEXTS))
    with contextlib.suppress(RemoteProtocolError):
        feed(conn, garbage, mode, eof=eof)


@FUZZ
@given(st.lists(replies, max_size=6), st.booleans(), st.booleans())
def test_replies_fed_whole_bytewise_or_into_buffers_agree(parts: list[bytes], structured: bool,
                                                         eof: bool) -> None:
    stream = b"".join(parts)
    whole = run(stream, "whole", structured=structured, eof=eof)
    assert run(stream, "bytes", structured=structured, eof=eof) == whole
    assert run(stream, "buffers", structured=structured, eof=eof) == whole


@FUZZ
@given(st.lists(replies, min_size=1, max_size=5), st.data())
def test_a_prefix_gives_a_prefix_and_trailing_bytes_change_nothing_before(
        parts: list[bytes], draw: st.DataObject) -> None:
    stream = b"".join(parts)
    events, failure, _ = run(stream, "whole")
    cut = draw.draw(st.integers(0, len(stream)))
    prefix_events, prefix_failure, _ = run(stream[:cut], "bytes")
    assert prefix_events == events[: len(prefix_events)]
    if prefix_failure is not None:
        assert prefix_failure == failure
    trailing = draw.draw(st.binary(min_size=1, max_size=32))
    more_events, more_failure, _ = run(stream + trailing, "bytes")
    if failure is not None:
        assert (more_events, more_failure) == (events, failure)
    else:
        assert more_events[: len(events)] == events
