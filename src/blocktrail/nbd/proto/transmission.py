"""The client's side of the NBD transmission phase as a state machine that does no I/O.

`ClientConnection` hands over to a `Transmission` once GO succeeds. Requests go out with
`send_request` (any command) or `send_read` (a READ whose reply lands in a buffer the caller
owns); replies come back as events: `ReadChunk` (part of a read is in its buffer), `BlockStatus`
(the descriptors of one meta context), `ReplyDone` (the request is answered: error 0 or an NBD
errno and the server's message).

Read payloads are never buffered here: once a data chunk's header is parsed, its payload goes
straight into the read's buffer. An I/O layer that can receive into a buffer (asyncio's
BufferedProtocol, ``socket.recv_into``) asks `get_buffer()` where the next bytes go and reports
them with `buffer_updated(n)`; `receive_data(bytes)` does the same with one copy.

Every rule the protocol gives the server is checked: a reply for a cookie not in flight, a chunk
type that does not fit the command, content outside the request or overlapping other content, a
read claimed successful that left bytes uncovered, block status for a context not negotiated
(or twice, or missing), descriptors of length 0 or past the request. Any violation raises
`RemoteProtocolError`; the connection is then over. A server's error reply is not a violation: it
ends that one request.
"""

from __future__ import annotations

import bisect
import struct
from collections import deque
from dataclasses import dataclass, field

from blocktrail.nbd.proto.constants import (
    ALLOWED_FLAGS,
    REPLY_FLAG_DONE,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Command,
    CommandFlag,
    ReplyType,
)
from blocktrail.nbd.proto.errors import LocalProtocolError, RemoteProtocolError
from blocktrail.nbd.proto.events import (
    NEED_DATA,
    BlockStatus,
    Disconnect,
    NeedData,
    ReadChunk,
    ReplyChunk,
    ReplyDone,
    TransmissionEvent,
)

_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_REQUEST = struct.Struct(">IHHQQI")
_U32 = struct.Struct(">I")
_OFFSET = struct.Struct(">Q")
_HOLE = struct.Struct(">QI")
_ERROR = struct.Struct(">IH")

RECEIVE_SIZE = 64 * 1024  # what one receive into the header buffer may take
MAX_DESCRIPTORS = 1 << 20  # per block status chunk (the spec's limit for servers)
MAX_ERROR_CHUNK = 64 * 1024  # error chunks carry a message of at most 4096 bytes
INLINE_WRITE = 64 * 1024  # smaller write payloads are copied next to their header
_ERROR_BIT = 0x8000
_ZEROS = bytes(1 << 20)
_DATA_OFFSET = _CHUNK.size + _OFFSET.size


@dataclass(slots=True)
class _InFlight:
    command: Command
    offset: int
    length: int
    flags: int
    buffer: memoryview | None = None  # READ sent with send_read: where the data goes
    starts: list[int] = field(default_factory=list)  # READ: content chunks, sorted, relative
    ends: list[int] = field(default_factory=list)
    covered: int = 0
    contexts: set[int] = field(default_factory=set)  # BLOCK_STATUS: context ids answered
    error: int = 0
    message: str = ""


@dataclass(slots=True)
class _Payload:
    """A data payload being received straight into a read's buffer."""

    request: _InFlight
    cookie: int
    offset: int
    sink: memoryview
    filled: int
    done: bool


class Transmission:
    """Requests out, replies in, for one connection in the transmission phase."""

    def __init__(self, *, structured: bool, contexts: dict[int, str],
                 initial: bytes = b"") -> None:
        self._structured = structured
        self._contexts = dict(contexts)
        self._in = bytearray(initial)
        self._eof = False
        self._closed = False  # after a protocol violation, or EOF
        self._disconnecting = False  # NBD_CMD_DISC sent: no more requests
        self._out = bytearray()
        self._queue: list[bytes | memoryview] = []
        self._inflight: dict[int, _InFlight] = {}
        self._next_cookie = 1
        self._events: deque[TransmissionEvent] = deque()
        self._payload: _Payload | None = None
        self._scratch = memoryview(bytearray(RECEIVE_SIZE))
        self._lent: memoryview | None = None

    # ------------------------------------------------------------------ I/O boundary

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the server (b"" at EOF)."""
        if not data:
            self._eof = True
            return
        if self._closed:
            raise LocalProtocolError("the connection is closed")
        view = memoryview(data)
        payload = self._payload
        if payload is not None and payload.filled < len(payload.sink):
            take = min(len(view), len(payload.sink) - payload.filled)
            payload.sink[payload.filled : payload.filled + take] = view[:take]
            payload.filled += take
            view = view[take:]
        if len(view):
            self._in += view

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next bytes from the server should be written (then call
        `buffer_updated`): the unfilled part of a read's buffer while a data payload is
        arriving, else an internal buffer for headers."""
        payload = self._payload
        if payload is not None and payload.filled < len(payload.sink):
            self._lent = payload.sink[payload.filled :]
        else:
            self._lent = self._scratch
        return self._lent

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of what `get_buffer` returned."""
        lent, self._lent = self._lent, None
        if lent is None or nbytes > len(lent):
            raise LocalProtocolError("buffer_updated without a matching get_buffer")
        if lent is self._scratch:
            self._in += lent[:nbytes]
        elif self._payload is not None:
            self._payload.filled += nbytes

    def buffers_to_send(self) -> list[bytes | memoryview]:
        """What to send, in order; a large write's payload is passed on without a copy (keep
        it unchanged until its reply arrives)."""
        if self._out:
            self._queue.append(bytes(self._out))
            self._out.clear()
        queue, self._queue = self._queue, []
        return queue

    def data_to_send(self) -> bytes:
        return b"".join(self.buffers_to_send())

    # ------------------------------------------------------------------ requests

    def send_request(self, command: Command, offset: int = 0, length: int = 0, flags: int = 0,
                     data: bytes | bytearray | memoryview = b"") -> int:
        """Queue a request; -> its cookie. A READ sent here reports its data as `ReplyChunk`
        events (copies: for small reads and tests; `send_read` is the fast way)."""
        payload = memoryview(data).cast("B") if command is Command.WRITE else None
        if payload is not None and len(payload) != length:
            raise LocalProtocolError("WRITE length must equal the data's")
        if command is not Command.WRITE and len(data):
            raise LocalProtocolError(f"{command.name} carries no data")
        return self._send(command, offset, length, flags, payload, None)

    def send_read(self, offset: int, into: bytearray | memoryview, flags: int = 0) -> int:
        """Queue a READ of ``len(into)`` bytes at ``offset``; the reply is written into
        ``into`` (holes as zeros); -> its cookie. ``into`` is complete when `ReplyDone` for
        the cookie reports no error."""
        view = memoryview(into).cast("B")
        if view.readonly:
            raise LocalProtocolError("a read needs a writable buffer")
        return self._send(Command.READ, offset, len(view), flags, None, view)

    def _send(self, command: Command, offset: int, length: int, flags: int,
              payload: memoryview | None, into: memoryview | None) -> int:
        if self._closed or self._disconnecting:
            raise LocalProtocolError("the connection is closed")
        if flags & ~ALLOWED_FLAGS[command]:
            raise LocalProtocolError(f"flags {flags:#x} are not allowed on {command.name}")
        if not 0 <= offset < 1 << 64 or not 0 <= length < 1 << 32:
            raise LocalProtocolError(f"request {offset}+{length} does not fit the wire format")
        if command is Command.BLOCK_STATUS and not (self._structured and self._contexts):
            raise LocalProtocolError("BLOCK_STATUS needs structured replies and a meta context")
        cookie = self._next_cookie
        self._next_cookie += 1
        self._out += _REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)
        if payload is not None and len(payload) > INLINE_WRITE:
            self._queue.append(bytes(self._out))
            self._out.clear()
            self._queue.append(payload)
        elif payload is not None:
            self._out += payload
        if command is Command.DISC:
            self._disconnecting = True
            return cookie
        self._inflight[cookie] = _InFlight(command, offset, length, flags, into)
        return cookie

    # ------------------------------------------------------------------ replies

    def next_event(self) -> TransmissionEvent | NeedData:
        try:
            while True:
                if self._events:
                    return self._events.popleft()
                if self._closed:
                    return Disconnect()
                payload = self._payload
                if payload is not None:
                    if payload.filled < len(payload.sink):
                        return self._need()
                    self._payload = None
                    self._events.append(ReadChunk(payload.cookie, payload.offset,
                                                  len(payload.sink)))
                    if payload.done:
                        self._finish(payload.cookie, payload.request, 0)
                elif not self._reply():
                    return self._need()
        except RemoteProtocolError:
            self._closed = True
            self._payload = None
            self._events.clear()
            raise

    def _need(self) -> NeedData | Disconnect:
        if not self._eof:
            return NEED_DATA
        if self._payload is not None or self._in:
            raise RemoteProtocolError("the server closed the connection in the middle of a reply")
        if self._inflight:
            raise RemoteProtocolError(f"the server closed the connection with "
                                      f"{len(self._inflight)} requests unanswered")
        self._closed = True
        return Disconnect()

    def _request(self, cookie: int) -> _InFlight:
        request = self._inflight.get(cookie)
        if request is None:
            raise RemoteProtocolError(f"reply for cookie {cookie}, which is not in flight")
        return request

    def _reply(self) -> bool:
        """Parse the next reply (or chunk) header in the input; False: more bytes needed."""
        if len(self._in) < 4:
            return False
        (magic,) = _U32.unpack_from(self._in)
        if magic == STRUCTURED_REPLY_MAGIC:
            return self._chunk()
        if magic == SIMPLE_REPLY_MAGIC:
            return self._simple()
        raise RemoteProtocolError(f"bad reply magic {magic:#010x}")

    def _simple(self) -> bool:
        if len(self._in) < _SIMPLE.size:
            return False
        _, error, cookie = _SIMPLE.unpack_from(self._in)
        request = self._request(cookie)
        if request.command is Command.READ and self._structured:
            raise RemoteProtocolError("a simple reply to READ, after structured replies were "
                                      "negotiated")
        if request.command is Command.BLOCK_STATUS and error == 0:
            raise RemoteProtocolError("a simple reply claiming success for BLOCK_STATUS")
        if request.command is Command.READ and error == 0 and request.length:
            if request.buffer is None:  # send_request: the whole payload, then one event
                if len(self._in) < _SIMPLE.size + request.length:
                    return False
                self._cover(request, request.offset, request.length)
                data = bytes(self._in[_SIMPLE.size : _SIMPLE.size + request.length])
                del self._in[: _SIMPLE.size + request.length]
                self._events.append(ReplyChunk(cookie, ReplyType.OFFSET_DATA,
                                               _OFFSET.pack(request.offset) + data))
                self._finish(cookie, request, 0)
                return True
            del self._in[: _SIMPLE.size]
            self._start_payload(request, request.buffer, cookie, request.offset,
                                request.length, done=True)
            return True
        del self._in[: _SIMPLE.size]
        self._finish(cookie, request, error)
        return True

    def _chunk(self) -> bool:
        if len(self._in) < _CHUNK.size:
            return False
        _, flags, kind, cookie, length = _CHUNK.unpack_from(self._in)
        if not self._structured:
            raise RemoteProtocolError("a structured reply chunk, but structured replies were not "
                                      "negotiated")
        request = self._request(cookie)
        done = bool(flags & REPLY_FLAG_DONE)
        buffer = request.buffer
        if kind == ReplyType.OFFSET_DATA and buffer is not None:
            self._expect_read(request, kind)
            if length < _OFFSET.size + 1:
                raise RemoteProtocolError(f"a data chunk of {length} bytes")
            if len(self._in) < _DATA_OFFSET:
                return False
            (offset,) = _OFFSET.unpack_from(self._in, _CHUNK.size)
            del self._in[:_DATA_OFFSET]
            self._start_payload(request, buffer, cookie, offset, length - _OFFSET.size,
                                done=done)
            return True
        if length > self._chunk_limit(kind, request):
            raise RemoteProtocolError(f"a {_kind_name(kind)} chunk of {length} bytes in the "
                                      f"reply to {request.command.name}")
        end = _CHUNK.size + length
        if len(self._in) < end:
            return False
        with memoryview(self._in) as view:
            payload = view[_CHUNK.size : end]
            try:
                self._content(request, cookie, kind, done, payload)
            finally:
                payload.release()
        del self._in[:end]
        if done:
            self._finish(cookie, request, 0)
        return True

    def _chunk_limit(self, kind: int, request: _InFlight) -> int:
        if kind == ReplyType.NONE:
            return 0
        if kind == ReplyType.OFFSET_HOLE:
            self._expect_read(request, kind)
            return _HOLE.size
        if kind == ReplyType.OFFSET_DATA:
            self._expect_read(request, kind)
            return _OFFSET.size + request.length
        if kind == ReplyType.BLOCK_STATUS:
            return 4 + 8 * MAX_DESCRIPTORS
        if kind & _ERROR_BIT:
            return MAX_ERROR_CHUNK
        raise RemoteProtocolError(f"unknown reply chunk type {kind}")

    def _content(self, request: _InFlight, cookie: int, kind: int, done: bool,
                 payload: memoryview) -> None:
        if kind == ReplyType.NONE:
            if not done:
                raise RemoteProtocolError("a NONE chunk without the DONE flag")
        elif kind == ReplyType.OFFSET_DATA:  # a READ sent without a buffer
            self._expect_read(request, kind)
            if len(payload) < _OFFSET.size + 1:
                raise RemoteProtocolError(f"a data chunk of {len(payload)} bytes")
            (offset,) = _OFFSET.unpack_from(payload)
            self._cover(request, offset, len(payload) - _OFFSET.size)
            self._events.append(ReplyChunk(cookie, ReplyType.OFFSET_DATA, bytes(payload)))
        elif kind == ReplyType.OFFSET_HOLE:
            self._hole(request, cookie, payload)
        elif kind == ReplyType.BLOCK_STATUS:
            self._block_status(request, cookie, payload)
        else:  # an error chunk (the limit check let no other type through)
            self._error(request, kind, payload)

    def _expect_read(self, request: _InFlight, kind: int) -> None:
        if request.command is not Command.READ:
            raise RemoteProtocolError(f"an {_kind_name(kind)} chunk in the reply to "
                                      f"{request.command.name}")

    def _cover(self, request: _InFlight, offset: int, length: int) -> int:
        """Record content ``[offset, offset + length)`` of a read; -> its start relative to
        the request. Content must lie inside the request and overlap no earlier content."""
        start = offset - request.offset
        end = start + length
        if start < 0 or end > request.length:
            raise RemoteProtocolError(f"content {offset}+{length} lies outside the request "
                                      f"{request.offset}+{request.length}")
        if request.flags & CommandFlag.DF and request.starts:
            raise RemoteProtocolError("a second content chunk for a read sent with DF")
        starts, ends = request.starts, request.ends
        at = bisect.bisect_right(starts, start)
        if (at and ends[at - 1] > start) or (at < len(starts) and starts[at] < end):
            raise RemoteProtocolError(f"content {offset}+{length} overlaps earlier content")
        starts.insert(at, start)
        ends.insert(at, end)
        request.covered += length
        return start

    def _start_payload(self, request: _InFlight, buffer: memoryview, cookie: int, offset: int,
                       length: int, *, done: bool) -> None:
        start = self._cover(request, offset, length)
        sink = buffer[start : start + length]
        take = min(len(self._in), length)
        if take:
            with memoryview(self._in) as view:
                sink[:take] = view[:take]
            del self._in[:take]
        self._payload = _Payload(request, cookie, offset, sink, take, done)

    def _hole(self, request: _InFlight, cookie: int, payload: memoryview) -> None:
        self._expect_read(request, ReplyType.OFFSET_HOLE)
        if len(payload) != _HOLE.size:
            raise RemoteProtocolError(f"a hole chunk of {len(payload)} bytes")
        offset, length = _HOLE.unpack_from(payload)
        if length == 0:
            raise RemoteProtocolError("a hole of 0 bytes")
        start = self._cover(request, offset, length)
        if request.buffer is None:
            self._events.append(ReplyChunk(cookie, ReplyType.OFFSET_HOLE, bytes(payload)))
            return
        for at in range(start, start + length, len(_ZEROS)):
            piece = min(len(_ZEROS), start + length - at)
            request.buffer[at : at + piece] = _ZEROS[:piece]
        self._events.append(ReadChunk(cookie, offset, length, hole=True))

    def _block_status(self, request: _InFlight, cookie: int, payload: memoryview) -> None:
        if request.command is not Command.BLOCK_STATUS:
            raise RemoteProtocolError(f"block status in the reply to {request.command.name}")
        if len(payload) < 12 or (len(payload) - 4) % 8:
            raise RemoteProtocolError(f"a block status chunk of {len(payload)} bytes")
        (context_id,) = _U32.unpack_from(payload)
        context = self._contexts.get(context_id)
        if context is None:
            raise RemoteProtocolError(f"block status for meta context {context_id}, which was "
                                      "not negotiated")
        if context_id in request.contexts:
            raise RemoteProtocolError(f"two block status chunks for {context}")
        request.contexts.add(context_id)
        count = (len(payload) - 4) // 8
        flat = struct.unpack_from(f">{2 * count}I", payload, 4)
        lengths, flags = flat[0::2], flat[1::2]
        if request.flags & CommandFlag.REQ_ONE and count != 1:
            raise RemoteProtocolError(f"{count} descriptors for a REQ_ONE block status")
        if 0 in lengths:
            raise RemoteProtocolError("a block status descriptor of length 0")
        if sum(lengths[:-1]) >= request.length:
            raise RemoteProtocolError("block status descriptors beyond the requested range")
        self._events.append(BlockStatus(cookie, context_id, context,
                                        tuple(zip(lengths, flags, strict=True))))

    def _error(self, request: _InFlight, kind: int, payload: memoryview) -> None:
        if len(payload) < _ERROR.size:
            raise RemoteProtocolError(f"an error chunk of {len(payload)} bytes")
        error, size = _ERROR.unpack_from(payload)
        if error == 0:
            raise RemoteProtocolError("an error chunk with error 0")
        if size > len(payload) - _ERROR.size:
            raise RemoteProtocolError("an error chunk whose message overruns it")
        if kind == ReplyType.ERROR_OFFSET:
            if len(payload) != _ERROR.size + size + _OFFSET.size:
                raise RemoteProtocolError(f"an error-offset chunk of {len(payload)} bytes")
            (offset,) = _OFFSET.unpack_from(payload, _ERROR.size + size)
            if request.length and not request.offset <= offset < request.offset + request.length:
                raise RemoteProtocolError(f"error offset {offset} lies outside the request")
        if not request.error:
            request.error = error
            request.message = bytes(payload[_ERROR.size : _ERROR.size + size]).decode(
                errors="replace")

    def _finish(self, cookie: int, request: _InFlight, error: int) -> None:
        del self._inflight[cookie]
        message = ""
        if request.error:
            error, message = request.error, request.message
        elif error == 0 and request.command is Command.READ and request.covered != request.length:
            raise RemoteProtocolError(f"the server reported success for a read of "
                                      f"{request.length} bytes at {request.offset} but sent "
                                      f"{request.covered}")
        elif error == 0 and request.command is Command.BLOCK_STATUS and (
                request.contexts != set(self._contexts)):
            missing = sorted(self._contexts[i] for i in set(self._contexts) - request.contexts)
            raise RemoteProtocolError(f"block status without an answer for {missing}")
        self._events.append(ReplyDone(cookie, error, message))


def _kind_name(kind: int) -> str:
    try:
        return ReplyType(kind).name
    except ValueError:
        return f"type {kind}"
