"""The client side of NBD as a state machine that does no I/O.

    conn = ClientConnection("disk0", contexts=["base:allocation"])
    conn.receive_data(greeting)                    # from the socket
    send(conn.data_to_send())                      # client flags and options
    ... until isinstance(conn.next_event(), Ready)
    cookie = conn.send_request(Command.READ, offset, length)
    send(conn.data_to_send())
    ... conn.next_event() -> ReplyChunk(...) / ReplyDone(cookie, error)

It negotiates fixed newstyle with structured replies, the requested meta contexts, and GO.
Anything the server sends that the protocol does not allow raises `RemoteProtocolError`.

With ``tls=TlsMode.ALLOW`` or ``REQUIRE`` it sends NBD_OPT_STARTTLS first, and nothing else
before TLS. On the server's ACK it returns `StartTls`: the I/O layer runs the TLS handshake on the
socket and calls `tls_established()`, then feeds decrypted bytes to `receive_data` and encrypts
what `data_to_send` returns. If the server refuses STARTTLS, REQUIRE (nbds:// URIs) raises
`TlsNotOffered`, never falling back to plaintext; ALLOW goes on in plaintext. A server that
requires TLS from a client without it raises `TlsRequiredByServer`.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass
from enum import Enum, auto

from blocktrail.nbd.proto.constants import (
    IHAVEOPT,
    MAX_PAYLOAD,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REPLY_FLAG_DONE,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    Command,
    HandshakeFlag,
    Info,
    Option,
    OptionReply,
    ReplyType,
)
from blocktrail.nbd.proto.errors import (
    LocalProtocolError,
    RemoteProtocolError,
    TlsNotOffered,
    TlsRequiredByServer,
)
from blocktrail.nbd.proto.server import NEED_DATA, Disconnect, StartTls, TlsMode

_OPTION_REPLY = struct.Struct(">QIII")
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
MAX_OPTION_REPLY = 64 * 1024


@dataclass(frozen=True, slots=True)
class Ready:
    size_bytes: int
    transmission_flags: int
    contexts: dict[int, str]  # context id -> name the server agreed to


@dataclass(frozen=True, slots=True)
class ReplyChunk:
    """Part of the answer to ``cookie``: data at an offset, a hole, or block status."""

    cookie: int
    kind: ReplyType
    payload: bytes


@dataclass(frozen=True, slots=True)
class ReplyDone:
    cookie: int
    error: int  # 0: success; otherwise an NBD errno
    message: str = ""


class _State(Enum):
    GREETING = auto()
    OPTIONS = auto()
    TLS_HANDSHAKE = auto()  # STARTTLS acknowledged; waiting for tls_established()
    TRANSMISSION = auto()
    CLOSED = auto()


ClientEvent = Ready | ReplyChunk | ReplyDone | Disconnect | StartTls


class ClientConnection:
    def __init__(self, export: str, contexts: list[str] | None = None,
                 tls: TlsMode = TlsMode.OFF) -> None:
        self._export = export.encode()
        self._tls = tls
        self.tls_active = False  # the TLS handshake is done: receive_data gets decrypted bytes
        self._contexts = [c.encode() for c in contexts or []]
        self._in = bytearray()
        self._out = bytearray()
        self._eof = False
        self._state = _State.GREETING
        self._pending_options: list[int] = []
        self._agreed: dict[int, str] = {}
        self._size: int | None = None
        self._flags = 0
        self._next_cookie = 1
        self._reads: dict[int, int] = {}  # cookie -> length, for simple READ replies
        self._open: set[int] = set()
        self._events: deque[ClientEvent] = deque()

    def receive_data(self, data: bytes) -> None:
        if self._state is _State.TLS_HANDSHAKE and data:
            raise LocalProtocolError("the TLS handshake is under way: its bytes go to the TLS "
                                     "session; call tls_established() when it is done")
        if data:
            self._in += data
        else:
            self._eof = True

    def data_to_send(self) -> bytes:
        out, self._out = bytes(self._out), bytearray()
        return out

    def next_event(self) -> ClientEvent | object:
        try:
            while True:
                if self._state is _State.CLOSED:
                    return Disconnect()
                if self._state is _State.TLS_HANDSHAKE:
                    raise LocalProtocolError("run the TLS handshake and call tls_established() "
                                             "first")
                if self._state is _State.GREETING:
                    if not self._greeting():
                        return self._need()
                elif self._state is _State.OPTIONS:
                    event = self._option_reply()
                    if event is None:
                        return self._need()
                    if isinstance(event, Ready | StartTls):
                        return event
                else:
                    if self._events:
                        return self._events.popleft()
                    replies = self._reply()
                    if replies is None:
                        return self._need()
                    self._events.extend(replies)
        except (RemoteProtocolError, TlsNotOffered, TlsRequiredByServer):
            self._state = _State.CLOSED
            raise

    def tls_established(self) -> None:
        """The TLS handshake that followed `StartTls` succeeded: negotiate over TLS."""
        if self._state is not _State.TLS_HANDSHAKE:
            raise LocalProtocolError(f"no TLS handshake is pending (state {self._state.name})")
        self.tls_active = True
        self._state = _State.OPTIONS
        self._negotiate()

    def _need(self) -> object:
        if self._eof:
            self._state = _State.CLOSED
            if self._in or self._open or self._state is not _State.TRANSMISSION:
                raise RemoteProtocolError("the server closed the connection mid-exchange")
            return Disconnect()
        return NEED_DATA

    # ------------------------------------------------------------------ negotiation

    def _greeting(self) -> bool:
        if len(self._in) < 18:
            return False
        magic, opt_magic, flags = struct.unpack_from(">QQH", self._in)
        del self._in[:18]
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise RemoteProtocolError("not an NBD server (or an old-style one)")
        if not flags & HandshakeFlag.FIXED_NEWSTYLE:
            raise RemoteProtocolError("the server does not speak fixed newstyle")
        client = ClientFlag.FIXED_NEWSTYLE
        if flags & HandshakeFlag.NO_ZEROES:
            client |= ClientFlag.NO_ZEROES
        self._out += struct.pack(">I", client)
        self._state = _State.OPTIONS
        if self._tls is TlsMode.OFF:
            self._negotiate()
        else:
            self._send_option(Option.STARTTLS, b"")  # alone: nothing else goes in plaintext
        return True

    def _negotiate(self) -> None:
        self._send_option(Option.STRUCTURED_REPLY, b"")
        if self._contexts:
            body = struct.pack(">I", len(self._export)) + self._export
            body += struct.pack(">I", len(self._contexts))
            body += b"".join(struct.pack(">I", len(c)) + c for c in self._contexts)
            self._send_option(Option.SET_META_CONTEXT, body)
        self._send_option(Option.GO, struct.pack(">I", len(self._export)) + self._export
                          + struct.pack(">HH", 1, Info.BLOCK_SIZE))

    def _send_option(self, option: int, data: bytes) -> None:
        self._out += struct.pack(">QII", IHAVEOPT, option, len(data)) + data
        self._pending_options.append(option)

    def _option_reply(self) -> Ready | StartTls | bool | None:
        if len(self._in) < _OPTION_REPLY.size:
            return None
        magic, option, kind, length = _OPTION_REPLY.unpack_from(self._in)
        if magic != OPTION_REPLY_MAGIC:
            raise RemoteProtocolError("bad option reply magic")
        if length > MAX_OPTION_REPLY:
            raise RemoteProtocolError(f"option reply of {length} bytes")
        if not self._pending_options or option != self._pending_options[0]:
            raise RemoteProtocolError(f"reply to option {option}, which was not asked")
        if len(self._in) < _OPTION_REPLY.size + length:
            return None
        data = bytes(self._in[_OPTION_REPLY.size : _OPTION_REPLY.size + length])
        del self._in[: _OPTION_REPLY.size + length]
        if option == Option.STARTTLS:
            return self._starttls_reply(kind, data)
        if kind == OptionReply.ERR_TLS_REQD:
            raise TlsRequiredByServer("the server requires TLS: connect with TLS credentials "
                                      "(an nbds:// URI)")
        if kind >= OptionReply.ERR_UNSUP:
            message = data.decode(errors="replace")
            if option == Option.SET_META_CONTEXT or option == Option.STRUCTURED_REPLY:
                self._pending_options.pop(0)  # optional: go on without it
                return True
            raise RemoteProtocolError(f"the server refused option {option} ({kind:#x}): "
                                      f"{message}")
        if kind == OptionReply.META_CONTEXT and len(data) >= 4:
            (context_id,) = struct.unpack_from(">I", data)
            self._agreed[context_id] = data[4:].decode(errors="replace")
        elif kind == OptionReply.INFO and len(data) >= 12:
            (info,) = struct.unpack_from(">H", data)
            if info == Info.EXPORT:
                self._size, self._flags = struct.unpack_from(">QH", data, 2)
        elif kind == OptionReply.ACK:
            self._pending_options.pop(0)
            if option == Option.GO:
                if self._size is None:
                    raise RemoteProtocolError("GO acknowledged without NBD_INFO_EXPORT")
                self._state = _State.TRANSMISSION
                return Ready(self._size, self._flags, dict(self._agreed))
        return True

    def _starttls_reply(self, kind: int, data: bytes) -> StartTls | bool:
        self._pending_options.pop(0)
        if kind == OptionReply.ACK:
            if self._in:
                # The server sends nothing after the ACK before our ClientHello: these bytes
                # were injected, and must never be taken as if they had come over TLS.
                raise RemoteProtocolError(f"{len(self._in)} bytes of plaintext followed the "
                                          f"STARTTLS acknowledgement; connection closed")
            self._state = _State.TLS_HANDSHAKE
            return StartTls()
        if kind < OptionReply.ERR_UNSUP:
            raise RemoteProtocolError(f"unexpected reply {kind:#x} to STARTTLS")
        message = data.decode(errors="replace")
        if self._tls is TlsMode.REQUIRE:
            self._send_option(Option.ABORT, b"")
            raise TlsNotOffered(f"the server refused STARTTLS ({_reply_name(kind)}: {message}); "
                                f"TLS is required, so the connection is closed")
        self._negotiate()  # ALLOW: go on in plaintext
        return True

    # ------------------------------------------------------------------ transmission

    def send_request(self, command: Command, offset: int = 0, length: int = 0,
                     flags: int = 0, data: bytes = b"") -> int:
        if self._state is not _State.TRANSMISSION:
            raise LocalProtocolError("not in transmission")
        if command is Command.WRITE and len(data) != length:
            raise LocalProtocolError("WRITE length must equal the data's")
        cookie = self._next_cookie
        self._next_cookie += 1
        self._out += struct.pack(">IHHQQI", REQUEST_MAGIC, flags, command, cookie, offset,
                                 length) + data
        if command is Command.DISC:
            self._state = _State.CLOSED
            return cookie
        if command is Command.READ:
            self._reads[cookie] = length
        self._open.add(cookie)
        return cookie

    def _reply(self) -> list[ClientEvent] | None:
        """The events of the next whole reply (or chunk) in the input, or None."""
        if len(self._in) < 4:
            return None
        (magic,) = struct.unpack_from(">I", self._in)
        if magic == SIMPLE_REPLY_MAGIC:
            if len(self._in) < _SIMPLE.size:
                return None
            _, error, cookie = _SIMPLE.unpack_from(self._in)
            self._check_cookie(cookie)
            data_length = self._reads.get(cookie, 0) if error == 0 else 0
            if len(self._in) < _SIMPLE.size + data_length:
                return None
            data = bytes(self._in[_SIMPLE.size : _SIMPLE.size + data_length])
            del self._in[: _SIMPLE.size + data_length]
            events: list[ClientEvent] = []
            if data_length:
                events.append(ReplyChunk(cookie, ReplyType.OFFSET_DATA, data))
            return [*events, self._done(cookie, error)]
        if magic != STRUCTURED_REPLY_MAGIC:
            raise RemoteProtocolError(f"bad reply magic {magic:#x}")
        if len(self._in) < _CHUNK.size:
            return None
        _, flags, kind, cookie, length = _CHUNK.unpack_from(self._in)
        self._check_cookie(cookie)
        if length > MAX_PAYLOAD + 8:
            raise RemoteProtocolError(f"reply chunk of {length} bytes")
        if len(self._in) < _CHUNK.size + length:
            return None
        payload = bytes(self._in[_CHUNK.size : _CHUNK.size + length])
        del self._in[: _CHUNK.size + length]
        if kind in (ReplyType.ERROR, ReplyType.ERROR_OFFSET):
            if len(payload) < 6:
                raise RemoteProtocolError("truncated error chunk")
            error, size = struct.unpack_from(">IH", payload)
            message = payload[6 : 6 + size].decode(errors="replace")
            self._open.discard(cookie)
            self._reads.pop(cookie, None)
            return [ReplyDone(cookie, error or 5, message)]
        try:
            reply_type = ReplyType(kind)
        except ValueError:
            raise RemoteProtocolError(f"unknown reply chunk type {kind}") from None
        events = [] if reply_type is ReplyType.NONE else [ReplyChunk(cookie, reply_type, payload)]
        if flags & REPLY_FLAG_DONE:
            events.append(self._done(cookie, 0))
        return events

    def _check_cookie(self, cookie: int) -> None:
        if cookie not in self._open:
            raise RemoteProtocolError(f"reply for cookie {cookie}, which is not in flight")

    def _done(self, cookie: int, error: int) -> ReplyDone:
        self._open.discard(cookie)
        self._reads.pop(cookie, None)
        return ReplyDone(cookie, error)


def _reply_name(kind: int) -> str:
    try:
        return f"NBD_REP_{OptionReply(kind).name}"
    except ValueError:
        return f"error {kind:#x}"
