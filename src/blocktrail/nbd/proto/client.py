"""The client side of NBD as a state machine that does no I/O.

    conn = ClientConnection("disk0", contexts=["base:allocation"])
    conn.receive_data(greeting)                    # from the socket (b"" at EOF)
    send(conn.data_to_send())                      # client flags and options
    ... until isinstance(conn.next_event(), Ready)
    cookie = conn.send_read(offset, buffer)        # the data lands in buffer
    send(conn.data_to_send())
    ... conn.next_event() -> ReadChunk / BlockStatus / ReplyDone(cookie, error, message)

It negotiates fixed newstyle with structured replies, the requested meta contexts, the block
size constraints (NBD_INFO_BLOCK_SIZE), and GO. The transmission phase is `Transmission`'s
(proto/transmission.py), which receives read payloads straight into their buffers when the I/O
layer uses `get_buffer` / `buffer_updated`. Anything the server sends that the protocol does not
allow raises `RemoteProtocolError`; a refused export raises `NegotiationRefused`.

With ``tls=TlsMode.ALLOW`` or ``REQUIRE`` it sends NBD_OPT_STARTTLS first, and nothing else
before TLS. On the server's ACK it returns `StartTls`: the I/O layer runs the TLS handshake on the
socket and calls `tls_established()`, then feeds decrypted bytes to `receive_data` and encrypts
what `data_to_send` returns. If the server refuses STARTTLS, REQUIRE (nbds:// URIs) raises
`TlsNotOffered`, never falling back to plaintext; ALLOW goes on in plaintext. A server that
requires TLS from a client without it raises `TlsRequiredByServer`.
"""

from __future__ import annotations

import struct
from enum import Enum, auto

from blocktrail.nbd.proto.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    ClientFlag,
    Command,
    HandshakeFlag,
    Info,
    Option,
    OptionReply,
)
from blocktrail.nbd.proto.errors import (
    LocalProtocolError,
    NegotiationRefused,
    RemoteProtocolError,
    TlsNotOffered,
    TlsRequiredByServer,
)
from blocktrail.nbd.proto.events import (
    NEED_DATA,
    BlockSize,
    ClientEvent,
    Disconnect,
    NeedData,
    Ready,
    StartTls,
    TlsMode,
    block_size_problem,
)
from blocktrail.nbd.proto.transmission import RECEIVE_SIZE, Transmission

_OPTION_REPLY = struct.Struct(">QIII")
_BLOCK_SIZE = struct.Struct(">III")
MAX_OPTION_REPLY = 64 * 1024


class _State(Enum):
    GREETING = auto()
    OPTIONS = auto()
    TLS_HANDSHAKE = auto()  # STARTTLS acknowledged; waiting for tls_established()
    TRANSMISSION = auto()
    CLOSED = auto()


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
        self._structured = False
        self._block_size = BlockSize()
        self._tx: Transmission | None = None  # from GO on
        self._scratch = memoryview(bytearray(RECEIVE_SIZE))

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._tx is not None:
            self._tx.receive_data(data)
            return
        if self._state is _State.TLS_HANDSHAKE and data:
            raise LocalProtocolError("the TLS handshake is under way: its bytes go to the TLS "
                                     "session; call tls_established() when it is done")
        if data:
            self._in += data
        else:
            self._eof = True

    def data_to_send(self) -> bytes:
        out, self._out = bytes(self._out), bytearray()
        if self._tx is not None:
            out += self._tx.data_to_send()
        return out

    def buffers_to_send(self) -> list[bytes | memoryview]:
        """What `data_to_send` returns, as a list of buffers: a large write's payload is passed
        on without a copy (keep it unchanged until its reply arrives)."""
        out, self._out = bytes(self._out), bytearray()
        return ([out] if out else []) + (self._tx.buffers_to_send() if self._tx else [])

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where to receive the next bytes (asyncio's BufferedProtocol, ``recv_into``); then
        call `buffer_updated`. In transmission, a read's payload goes straight to its buffer."""
        if self._tx is not None:
            return self._tx.get_buffer(sizehint)
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        if self._tx is not None:
            self._tx.buffer_updated(nbytes)
        else:
            self.receive_data(self._scratch[:nbytes])

    def next_event(self) -> ClientEvent | NeedData:
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
                elif self._tx is not None:
                    return self._tx.next_event()
        except (RemoteProtocolError, NegotiationRefused, TlsNotOffered, TlsRequiredByServer):
            self._state = _State.CLOSED
            raise

    def tls_established(self) -> None:
        """The TLS handshake that followed `StartTls` succeeded: negotiate over TLS."""
        if self._state is not _State.TLS_HANDSHAKE:
            raise LocalProtocolError(f"no TLS handshake is pending (state {self._state.name})")
        self.tls_active = True
        self._state = _State.OPTIONS
        self._negotiate()

    def _need(self) -> NeedData:
        if self._eof:  # transmission's EOF is Transmission's
            self._state = _State.CLOSED
            raise RemoteProtocolError("the server closed the connection mid-exchange")
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
            what = (f"export {self._export.decode(errors='replace')!r}" if option == Option.GO
                    else f"option {option}")
            raise NegotiationRefused(f"the NBD server refused {what} ({_reply_name(kind)}: "
                                     f"{message})")
        if kind == OptionReply.META_CONTEXT and len(data) >= 4:
            (context_id,) = struct.unpack_from(">I", data)
            self._agreed[context_id] = data[4:].decode(errors="replace")
        elif kind == OptionReply.INFO and len(data) >= 12:
            (info,) = struct.unpack_from(">H", data)
            if info == Info.EXPORT:
                self._size, self._flags = struct.unpack_from(">QH", data, 2)
            elif info == Info.BLOCK_SIZE:
                self._block_size = _block_size(data)
        elif kind == OptionReply.ACK:
            self._pending_options.pop(0)
            if option == Option.STRUCTURED_REPLY:
                self._structured = True
            if option == Option.GO:
                if self._size is None:
                    raise RemoteProtocolError("GO acknowledged without NBD_INFO_EXPORT")
                self._state = _State.TRANSMISSION
                contexts = dict(self._agreed) if self._structured else {}
                self._tx = Transmission(structured=self._structured, contexts=contexts,
                                        initial=bytes(self._in))
                self._in.clear()
                return Ready(self._size, self._flags, contexts, self._structured,
                             self._block_size)
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
                     flags: int = 0, data: bytes | bytearray | memoryview = b"") -> int:
        """Queue a request; -> its cookie (see `Transmission.send_request`)."""
        return self._transmission().send_request(command, offset, length, flags, data)

    def send_read(self, offset: int, into: bytearray | memoryview, flags: int = 0) -> int:
        """Queue a READ whose reply lands in ``into`` (see `Transmission.send_read`)."""
        return self._transmission().send_read(offset, into, flags)

    def _transmission(self) -> Transmission:
        if self._tx is None or self._state is not _State.TRANSMISSION:
            raise LocalProtocolError("not in transmission")
        return self._tx


def _block_size(data: bytes) -> BlockSize:
    if len(data) != 2 + _BLOCK_SIZE.size:
        raise RemoteProtocolError(f"NBD_INFO_BLOCK_SIZE of {len(data)} bytes")
    minimum, preferred, maximum = _BLOCK_SIZE.unpack_from(data, 2)
    problem = block_size_problem(minimum, preferred, maximum)
    if problem is not None:
        raise RemoteProtocolError(problem)
    return BlockSize(minimum, preferred, maximum)


def _reply_name(kind: int) -> str:
    try:
        return f"NBD_REP_{OptionReply(kind).name}"
    except ValueError:
        return f"error {kind:#x}"
