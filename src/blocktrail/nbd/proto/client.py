"""The client side of NBD as a state machine that does no I/O.

    conn = ClientConnection("disk0", contexts=["base:allocation"])
    conn.receive_data(greeting)                    # from the socket (b"" at EOF)
    send(conn.data_to_send())                      # client flags and options
    ... until isinstance(conn.next_event(), Ready)
    cookie = conn.send_read(offset, buffer)        # the data lands in buffer
    send(conn.data_to_send())
    ... conn.next_event() -> ReadChunk / BlockStatus / ReplyDone(cookie, error, message)

It negotiates fixed newstyle with structured replies, the requested meta contexts (those
SET_META_CONTEXT names hold once it is acknowledged; an error reply after them sets none), the
block size constraints (NBD_INFO_BLOCK_SIZE), and GO. The transmission phase is `Transmission`'s
(proto/transmission.py), which receives read payloads straight into their buffers when the I/O
layer uses `get_buffer` / `buffer_updated`. Anything the server sends that the protocol does not
allow raises `RemoteProtocolError`; a refused export raises `NegotiationRefused`.

Three tables say what the core does (tests/unit/nbd/test_tables.py walks them):

- `TRANSITIONS`: (state, input) -> next state, for every change of state (`proto/machine.py`): a
  server's input not in it is a `RemoteProtocolError` that closes the connection, a call of the
  I/O layer not in it a `LocalProtocolError` that changes nothing;
- `PARSERS`: what `next_event` reads in each state;
- `REPLY_HANDLERS`: the handler of each (option, kind of reply) pair; a pair not listed is
  ignored (an NBD_REP_INFO type or a reply this client has no use for).

    GREETING --GREETING--> OPTIONS --READY (GO acknowledged)--> TRANSMISSION --HANGUP--> CLOSED
    OPTIONS --OPTION_REPLY--> OPTIONS;  OPTIONS --REFUSED (export, TLS)--> CLOSED
    OPTIONS --STARTTLS_ACK--> TLS_HANDSHAKE --TLS_ESTABLISHED--> OPTIONS
    any state --VIOLATION--> CLOSED

With ``tls=TlsMode.ALLOW`` or ``REQUIRE`` it sends NBD_OPT_STARTTLS first, and nothing else
before TLS. On the server's ACK it returns `StartTls`: the I/O layer runs the TLS handshake on the
socket and calls `tls_established()`, then feeds decrypted bytes to `receive_data` and encrypts
what `data_to_send` returns. If the server refuses STARTTLS, REQUIRE (nbds:// URIs) raises
`TlsNotOffered`, never falling back to plaintext; ALLOW goes on in plaintext. A server that
requires TLS from a client without it raises `TlsRequiredByServer`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from enum import Enum, auto
from typing import Final

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
from blocktrail.nbd.proto.machine import MachineEnum, StateMachine
from blocktrail.nbd.proto.transmission import RECEIVE_SIZE, Transmission

_GREETING = struct.Struct(">QQH")
_OPTION = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_BLOCK_SIZE = struct.Struct(">III")
MAX_OPTION_REPLY = 64 * 1024


class State(MachineEnum):
    GREETING = auto()
    OPTIONS = auto()
    TLS_HANDSHAKE = auto()  # STARTTLS acknowledged; waiting for tls_established()
    TRANSMISSION = auto()
    CLOSED = auto()


class Input(MachineEnum):
    # from the server (refused: RemoteProtocolError, and the connection is closed)
    GREETING = auto()  # the server's greeting
    OPTION_REPLY = auto()  # an option reply; negotiation goes on
    STARTTLS_ACK = auto()  # STARTTLS acknowledged
    READY = auto()  # GO acknowledged
    REFUSED = auto()  # the export or TLS refused: NegotiationRefused, TlsNotOffered, ...
    HANGUP = auto()  # the server closed the connection between two messages
    VIOLATION = auto()  # anything else the protocol does not allow
    # from the I/O layer (refused: LocalProtocolError, and nothing changes)
    RECEIVE = auto()  # receive_data(bytes)
    EOF = auto()  # receive_data(b"")
    TLS_ESTABLISHED = auto()  # tls_established()
    SEND_REQUEST = auto()  # send_request(), send_read()


LOCAL_INPUTS: Final = frozenset({Input.RECEIVE, Input.EOF, Input.TLS_ESTABLISHED,
                                 Input.SEND_REQUEST})

_S, _I = State, Input
TRANSITIONS: Final[Mapping[State, Mapping[Input, State]]] = {
    _S.GREETING: {_I.GREETING: _S.OPTIONS, _I.RECEIVE: _S.GREETING, _I.EOF: _S.GREETING,
                  _I.VIOLATION: _S.CLOSED},
    _S.OPTIONS: {_I.OPTION_REPLY: _S.OPTIONS, _I.STARTTLS_ACK: _S.TLS_HANDSHAKE,
                 _I.READY: _S.TRANSMISSION, _I.REFUSED: _S.CLOSED, _I.RECEIVE: _S.OPTIONS,
                 _I.EOF: _S.OPTIONS, _I.VIOLATION: _S.CLOSED},
    _S.TLS_HANDSHAKE: {_I.TLS_ESTABLISHED: _S.OPTIONS, _I.EOF: _S.TLS_HANDSHAKE,
                       _I.VIOLATION: _S.CLOSED},
    _S.TRANSMISSION: {_I.SEND_REQUEST: _S.TRANSMISSION, _I.HANGUP: _S.CLOSED,
                      _I.RECEIVE: _S.TRANSMISSION, _I.EOF: _S.TRANSMISSION,
                      _I.VIOLATION: _S.CLOSED},
    _S.CLOSED: {_I.EOF: _S.CLOSED, _I.VIOLATION: _S.CLOSED},
}

REFUSALS: Final[Mapping[Input | tuple[State, Input], str]] = {
    (_S.TLS_HANDSHAKE, _I.RECEIVE): "the TLS handshake is under way: its bytes go to the TLS "
                                    "session; call tls_established() when it is done",
    _I.RECEIVE: "receive_data: the connection is closed (state {state})",
    _I.TLS_ESTABLISHED: "no TLS handshake is pending (state {state})",
    (_S.CLOSED, _I.SEND_REQUEST): "the connection is closed",
    _I.SEND_REQUEST: "not in transmission (state {state})",
    _I.HANGUP: "the server closed the connection during the negotiation (state {state})",
}


class ReplyKind(Enum):
    """An option reply as the dispatch table tells them apart."""

    ACK = auto()
    INFO = auto()
    META_CONTEXT = auto()
    TLS_REQUIRED = auto()  # NBD_REP_ERR_TLS_REQD
    ERROR = auto()  # any other error
    OTHER = auto()  # any other reply type (NBD_REP_SERVER, say)

    @classmethod
    def of(cls, kind: int) -> ReplyKind:
        if kind == OptionReply.ERR_TLS_REQD:
            return cls.TLS_REQUIRED
        if kind >= OptionReply.ERR_UNSUP:  # the error bit
            return cls.ERROR
        return _KINDS.get(kind, cls.OTHER)


_KINDS: Final[Mapping[int, ReplyKind]] = {
    OptionReply.ACK: ReplyKind.ACK, OptionReply.INFO: ReplyKind.INFO,
    OptionReply.META_CONTEXT: ReplyKind.META_CONTEXT}


class ClientConnection:
    def __init__(self, export: str, contexts: list[str] | None = None,
                 tls: TlsMode = TlsMode.OFF) -> None:
        self._export = export.encode()
        self._tls = tls
        self.tls_active = False  # the TLS handshake is done: receive_data gets decrypted bytes
        self._contexts = [c.encode() for c in contexts or []]
        self._machine = StateMachine(TRANSITIONS, State.GREETING, local=LOCAL_INPUTS,
                                     violation=Input.VIOLATION, refusals=REFUSALS)
        self._in = bytearray()
        self._out = bytearray()
        self._eof = False
        self._pending_options: list[int] = []
        self._offered: dict[int, str] = {}  # SET_META_CONTEXT's replies, until its ACK
        self._agreed: dict[int, str] = {}
        self._size: int | None = None
        self._flags = 0
        self._structured = False
        self._block_size = BlockSize()
        self._tx: Transmission | None = None  # from GO on
        self._scratch = memoryview(bytearray(RECEIVE_SIZE))

    @property
    def state(self) -> State:
        return self._machine.state

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._machine.fire(Input.RECEIVE if data else Input.EOF)
        if self._tx is not None:  # transmission: the bytes are Transmission's
            self._tx.receive_data(data)
        elif data:
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
                event = PARSERS[self._machine.state](self)
                if event is NEED_DATA:
                    return self._need()
                if event is not None:
                    return event
        except RemoteProtocolError:
            self._machine.poison()
            raise
        except (NegotiationRefused, TlsNotOffered, TlsRequiredByServer):
            self._machine.fire(Input.REFUSED)
            raise

    def tls_established(self) -> None:
        """The TLS handshake that followed `StartTls` succeeded: negotiate over TLS."""
        self._machine.fire(Input.TLS_ESTABLISHED)
        self.tls_active = True
        self._negotiate()

    def _need(self) -> NeedData:
        if self._eof:  # transmission's EOF is Transmission's
            self._machine.fire(Input.HANGUP)  # refused: the server is gone mid-negotiation
        return NEED_DATA

    # ------------------------------------------------------------------ what next_event reads

    def _read_greeting(self) -> NeedData | None:
        if len(self._in) < _GREETING.size:
            return NEED_DATA
        magic, opt_magic, flags = _GREETING.unpack_from(self._in)
        del self._in[: _GREETING.size]
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise RemoteProtocolError("not an NBD server (or an old-style one)")
        if not flags & HandshakeFlag.FIXED_NEWSTYLE:
            raise RemoteProtocolError("the server does not speak fixed newstyle")
        client = ClientFlag.FIXED_NEWSTYLE
        if flags & HandshakeFlag.NO_ZEROES:
            client |= ClientFlag.NO_ZEROES
        self._out += struct.pack(">I", client)
        self._machine.fire(Input.GREETING)
        if self._tls is TlsMode.OFF:
            self._negotiate()
        else:
            self._send_option(Option.STARTTLS, b"")  # alone: nothing else goes in plaintext
        return None

    def _read_option_reply(self) -> Ready | StartTls | NeedData | None:
        if len(self._in) < _OPTION_REPLY.size:
            return NEED_DATA
        magic, option, kind, length = _OPTION_REPLY.unpack_from(self._in)
        if magic != OPTION_REPLY_MAGIC:
            raise RemoteProtocolError("bad option reply magic")
        if length > MAX_OPTION_REPLY:
            raise RemoteProtocolError(f"option reply of {length} bytes")
        if not self._pending_options or option != self._pending_options[0]:
            raise RemoteProtocolError(f"reply to option {option}, which was not asked")
        if len(self._in) < _OPTION_REPLY.size + length:
            return NEED_DATA
        data = bytes(self._in[_OPTION_REPLY.size : _OPTION_REPLY.size + length])
        del self._in[: _OPTION_REPLY.size + length]
        handler = REPLY_HANDLERS.get((option, ReplyKind.of(kind)), ClientConnection._ignored)
        event = handler(self, option, kind, data)
        if event is None:
            self._machine.fire(Input.OPTION_REPLY)
        return event

    def _handshake_pending(self) -> None:
        raise LocalProtocolError("run the TLS handshake and call tls_established() first")

    def _read_transmission(self) -> ClientEvent | NeedData:
        assert self._tx is not None  # READY made it
        event = self._tx.next_event()
        if isinstance(event, Disconnect):
            self._machine.fire(Input.HANGUP)
        return event

    def _closed(self) -> Disconnect:
        return Disconnect()

    # ------------------------------------------------------------------ the options

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
        self._out += _OPTION.pack(IHAVEOPT, option, len(data)) + data
        self._pending_options.append(option)

    # ------------------------------------------------------------------ the option replies

    def _ignored(self, option: int, kind: int, data: bytes) -> None:
        return None

    def _structured_acked(self, option: int, kind: int, data: bytes) -> None:
        self._pending_options.pop(0)
        self._structured = True

    def _optional_refused(self, option: int, kind: int, data: bytes) -> None:
        self._pending_options.pop(0)  # STRUCTURED_REPLY, SET_META_CONTEXT: go on without it

    def _refused(self, option: int, kind: int, data: bytes) -> None:
        what = (f"export {self._export.decode(errors='replace')!r}" if option == Option.GO
                else f"option {option}")
        raise NegotiationRefused(f"the NBD server refused {what} ({_reply_name(kind)}: "
                                 f"{data.decode(errors='replace')})")

    def _tls_required(self, option: int, kind: int, data: bytes) -> None:
        raise TlsRequiredByServer("the server requires TLS: connect with TLS credentials "
                                  "(an nbds:// URI)")

    def _context_offered(self, option: int, kind: int, data: bytes) -> None:
        if len(data) >= 4:
            (context_id,) = struct.unpack_from(">I", data)
            self._offered[context_id] = data[4:].decode(errors="replace")

    def _contexts_agreed(self, option: int, kind: int, data: bytes) -> None:
        """SET_META_CONTEXT's ACK: the contexts it named are the ones in force."""
        self._pending_options.pop(0)
        self._agreed, self._offered = self._offered, {}

    def _contexts_refused(self, option: int, kind: int, data: bytes) -> None:
        """SET_META_CONTEXT failed after naming contexts: the spec sets none; go on without."""
        self._pending_options.pop(0)
        self._agreed, self._offered = {}, {}

    def _export_info(self, option: int, kind: int, data: bytes) -> None:
        if len(data) < 12:
            return  # too short for the types used here; others are ignored, as the spec says
        (info,) = struct.unpack_from(">H", data)
        if info == Info.EXPORT:
            self._size, self._flags = struct.unpack_from(">QH", data, 2)
        elif info == Info.BLOCK_SIZE:
            self._block_size = _block_size(data)

    def _go_acked(self, option: int, kind: int, data: bytes) -> Ready:
        self._pending_options.pop(0)
        if self._size is None:
            raise RemoteProtocolError("GO acknowledged without NBD_INFO_EXPORT")
        self._machine.fire(Input.READY)
        contexts = dict(self._agreed) if self._structured else {}
        self._tx = Transmission(structured=self._structured, contexts=contexts,
                                initial=bytes(self._in))
        self._in.clear()
        return Ready(self._size, self._flags, contexts, self._structured, self._block_size)

    def _starttls_acked(self, option: int, kind: int, data: bytes) -> StartTls:
        self._pending_options.pop(0)
        if self._in:
            # The server sends nothing after the ACK before our ClientHello: these bytes were
            # injected, and must never be taken as if they had come over TLS.
            raise RemoteProtocolError(f"{len(self._in)} bytes of plaintext followed the "
                                      f"STARTTLS acknowledgement; connection closed")
        self._machine.fire(Input.STARTTLS_ACK)
        return StartTls()

    def _starttls_refused(self, option: int, kind: int, data: bytes) -> None:
        self._pending_options.pop(0)
        if self._tls is TlsMode.REQUIRE:
            self._send_option(Option.ABORT, b"")
            raise TlsNotOffered(f"the server refused STARTTLS ({_reply_name(kind)}: "
                                f"{data.decode(errors='replace')}); TLS is required, so the "
                                f"connection is closed")
        self._negotiate()  # ALLOW: go on in plaintext

    def _starttls_odd_reply(self, option: int, kind: int, data: bytes) -> None:
        raise RemoteProtocolError(f"unexpected reply {kind:#x} to STARTTLS")

    # ------------------------------------------------------------------ transmission

    def send_request(self, command: Command, offset: int = 0, length: int = 0,
                     flags: int = 0, data: bytes | bytearray | memoryview = b"") -> int:
        """Queue a request; -> its cookie (see `Transmission.send_request`)."""
        return self._transmission().send_request(command, offset, length, flags, data)

    def send_read(self, offset: int, into: bytearray | memoryview, flags: int = 0) -> int:
        """Queue a READ whose reply lands in ``into`` (see `Transmission.send_read`)."""
        return self._transmission().send_read(offset, into, flags)

    def _transmission(self) -> Transmission:
        self._machine.fire(Input.SEND_REQUEST)
        assert self._tx is not None  # READY made it
        return self._tx


Parser = Callable[[ClientConnection], ClientEvent | NeedData | None]
ReplyHandler = Callable[[ClientConnection, int, int, bytes], Ready | StartTls | None]

# what next_event reads in each state
PARSERS: Final[Mapping[State, Parser]] = {
    State.GREETING: ClientConnection._read_greeting,
    State.OPTIONS: ClientConnection._read_option_reply,
    State.TLS_HANDSHAKE: ClientConnection._handshake_pending,
    State.TRANSMISSION: ClientConnection._read_transmission,
    State.CLOSED: ClientConnection._closed,
}

# (the option a reply answers, what the reply is) -> its handler; the options are the ones this
# client sends; a pair not listed is ignored
_C, _K = ClientConnection, ReplyKind
REPLY_HANDLERS: Final[Mapping[tuple[int, ReplyKind], ReplyHandler]] = {
    (Option.STARTTLS, _K.ACK): _C._starttls_acked,
    (Option.STARTTLS, _K.TLS_REQUIRED): _C._starttls_refused,
    (Option.STARTTLS, _K.ERROR): _C._starttls_refused,
    (Option.STARTTLS, _K.INFO): _C._starttls_odd_reply,
    (Option.STARTTLS, _K.META_CONTEXT): _C._starttls_odd_reply,
    (Option.STARTTLS, _K.OTHER): _C._starttls_odd_reply,
    (Option.STRUCTURED_REPLY, _K.ACK): _C._structured_acked,
    (Option.STRUCTURED_REPLY, _K.TLS_REQUIRED): _C._tls_required,
    (Option.STRUCTURED_REPLY, _K.ERROR): _C._optional_refused,
    (Option.SET_META_CONTEXT, _K.META_CONTEXT): _C._context_offered,
    (Option.SET_META_CONTEXT, _K.ACK): _C._contexts_agreed,
    (Option.SET_META_CONTEXT, _K.TLS_REQUIRED): _C._tls_required,
    (Option.SET_META_CONTEXT, _K.ERROR): _C._contexts_refused,
    (Option.GO, _K.INFO): _C._export_info,
    (Option.GO, _K.ACK): _C._go_acked,
    (Option.GO, _K.TLS_REQUIRED): _C._tls_required,
    (Option.GO, _K.ERROR): _C._refused,
}


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
