"""The server side of NBD as a state machine that does no I/O.

    conn = ServerConnection(catalog)
    send(conn.data_to_send())                  # the greeting
    conn.receive_data(bytes_from_socket)       # b"" at EOF; or, without a copy:
    conn.buffer_updated(sock.recv_into(conn.get_buffer()))
    while (event := conn.next_event()) is not NEED_DATA: ...
    send(conn.data_to_send())

Negotiation (fixed newstyle) is answered here from the export catalog; the application sees
`ExportChosen`, then `Request`s, which it answers with `reply_simple` / `reply_chunk`. Anything the
client sends that the protocol does not allow raises `RemoteProtocolError` and ends the
connection; lengths are bounded before anything is buffered.

Three tables say what the core does (tests/unit/nbd/test_tables.py walks them):

- `TRANSITIONS`: (state, input) -> next state, for every change of state (`proto/machine.py`): a
  client's input not in it is a `RemoteProtocolError` that closes the connection, a call of the
  I/O layer not in it a `LocalProtocolError` that changes nothing;
- `PARSERS`: what `next_event` reads in each state;
- `OPTION_HANDLERS`: the handler of each option (NBD_REP_ERR_UNSUP for the others).

    CLIENT_FLAGS --FLAGS--> OPTIONS --EXPORT_CHOSEN (GO, EXPORT_NAME)--> TRANSMISSION
    OPTIONS --OPTION (INFO, LIST, STRUCTURED_REPLY, *_META_CONTEXT, refused ones)--> OPTIONS
    OPTIONS --STARTTLS--> TLS_HANDSHAKE --TLS_ESTABLISHED--> OPTIONS
    OPTIONS --ABORT--> CLOSED;  TRANSMISSION --REQUEST--> TRANSMISSION
    TRANSMISSION --DISC, HANGUP (EOF between requests)--> DISCONNECTED (replies still go out)
    any state --VIOLATION--> CLOSED

STARTTLS (``tls=TlsMode.ALLOW`` or ``REQUIRE``): the core ACKs NBD_OPT_STARTTLS and returns
`StartTls`. The I/O layer then sends `data_to_send()` (the ACK, in plaintext), runs the TLS
handshake on the socket, and calls `tls_established()`; from then on it feeds the *decrypted*
bytes to `receive_data` and encrypts what `data_to_send` returns. Nothing negotiated before
STARTTLS survives it, and plaintext sent after STARTTLS ends the connection (a man in the middle
may have injected it: nbdkit CVE-2021-3716). In REQUIRE mode every option before TLS other than
STARTTLS and ABORT gets NBD_REP_ERR_TLS_REQD, and EXPORT_NAME (which cannot carry an error) ends
the connection.
"""

from __future__ import annotations

import functools
import operator
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import auto
from types import MappingProxyType
from typing import Final, Protocol

from blocktrail.nbd.proto.constants import (
    ALLOWED_FLAGS,
    IHAVEOPT,
    MAX_NAME_LENGTH,
    MAX_OPTION_LENGTH,
    MAX_PAYLOAD,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REPLY_FLAG_DONE,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    Command,
    CommandFlag,
    Errno,
    HandshakeFlag,
    Info,
    Option,
    OptionReply,
    ReplyType,
    TransmissionFlag,
)
from blocktrail.nbd.proto.errors import LocalProtocolError, RemoteProtocolError
from blocktrail.nbd.proto.events import (
    NEED_DATA,
    Disconnect,
    ExportChosen,
    ExportInfo,
    InvalidRequest,
    NeedData,
    Request,
    ServerEvent,
    StartTls,
    TlsMode,
)
from blocktrail.nbd.proto.machine import MachineEnum, StateMachine

# Per request: dictionary lookups, not enum calls. Every allowed combination of flags, made once.
_COMMANDS = MappingProxyType({int(c): c for c in Command})
_REFUSED_FLAGS = MappingProxyType({int(c): 0xFFFF & ~int(f) for c, f in ALLOWED_FLAGS.items()})
_BOUNDED = frozenset({int(Command.READ), int(Command.CACHE)})
_DISC = int(Command.DISC)
_WRITE = int(Command.WRITE)
_ANY_FLAG = int(functools.reduce(operator.or_, ALLOWED_FLAGS.values()))
_FLAGS = MappingProxyType({v: CommandFlag(v) for v in range(_ANY_FLAG + 1)
                           if not v & ~_ANY_FLAG})
_OPTION = struct.Struct(">QII")
_DONE_CHUNK = struct.Struct(">IHHQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
# export names whose catalog answer one negotiation keeps (a client names one or two exports;
# one asking after thousands of names must not make the server keep them all)
CACHED_EXPORTS = 16
_OPTION_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
RECEIVE_BYTES = 256 * 1024  # what get_buffer lends for headers and small payloads
DIRECT_PAYLOAD = 64 * 1024  # a WRITE payload from this size on is received in place
# Its buffer is made when its header comes if it is at most this big; a bigger one once a
# quarter of it has come (before, it collects as small ones do): a header alone never makes the
# server hold more than this, whatever length it announces.
UNSEEN_PAYLOAD_BYTES = 1 << 20
# After such a payload get_buffer lends this much: the next requests' headers (of reads, say)
# come in one receive, and of a large payload that follows them little is copied.
HEADER_RECEIVE_BYTES = 4096
_GREETING: Final = struct.pack(">QQH", NBDMAGIC, IHAVEOPT,
                               HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)


class ExportCatalog(Protocol):
    """Where the server core finds exports: by name, and all of them for NBD_OPT_LIST."""

    def lookup(self, name: str) -> ExportInfo | None: ...

    def names(self) -> list[str]: ...


class State(MachineEnum):
    CLIENT_FLAGS = auto()
    OPTIONS = auto()
    TLS_HANDSHAKE = auto()  # STARTTLS acknowledged; waiting for tls_established()
    TRANSMISSION = auto()
    DISCONNECTED = auto()  # the client is done: nothing more is read, replies in flight go out
    CLOSED = auto()  # ABORT, or a protocol error: nothing more is read or sent


class Input(MachineEnum):
    # from the client (refused: RemoteProtocolError, and the connection is closed)
    FLAGS = auto()  # the client's flags
    OPTION = auto()  # an option, answered (refusals included): negotiation goes on
    STARTTLS = auto()  # NBD_OPT_STARTTLS, acknowledged
    EXPORT_CHOSEN = auto()  # NBD_OPT_GO acknowledged, or NBD_OPT_EXPORT_NAME answered
    ABORT = auto()  # NBD_OPT_ABORT
    REQUEST = auto()  # a request (or one refused with an error reply)
    DISC = auto()  # NBD_CMD_DISC
    HANGUP = auto()  # the client closed the connection between two messages
    VIOLATION = auto()  # anything else the protocol does not allow
    # from the I/O layer (refused: LocalProtocolError, and nothing changes)
    RECEIVE = auto()  # receive_data(bytes)
    EOF = auto()  # receive_data(b"")
    TLS_ESTABLISHED = auto()  # tls_established()
    REPLY = auto()  # reply_*()


LOCAL_INPUTS: Final = frozenset({Input.RECEIVE, Input.EOF, Input.TLS_ESTABLISHED, Input.REPLY})

_S, _I = State, Input
TRANSITIONS: Final[Mapping[State, Mapping[Input, State]]] = {
    _S.CLIENT_FLAGS: {_I.FLAGS: _S.OPTIONS, _I.RECEIVE: _S.CLIENT_FLAGS,
                      _I.EOF: _S.CLIENT_FLAGS, _I.VIOLATION: _S.CLOSED},
    _S.OPTIONS: {_I.OPTION: _S.OPTIONS, _I.STARTTLS: _S.TLS_HANDSHAKE,
                 _I.EXPORT_CHOSEN: _S.TRANSMISSION, _I.ABORT: _S.CLOSED,
                 _I.RECEIVE: _S.OPTIONS, _I.EOF: _S.OPTIONS, _I.VIOLATION: _S.CLOSED},
    _S.TLS_HANDSHAKE: {_I.TLS_ESTABLISHED: _S.OPTIONS, _I.EOF: _S.TLS_HANDSHAKE,
                       _I.VIOLATION: _S.CLOSED},
    _S.TRANSMISSION: {_I.REQUEST: _S.TRANSMISSION, _I.DISC: _S.DISCONNECTED,
                      _I.HANGUP: _S.DISCONNECTED, _I.RECEIVE: _S.TRANSMISSION,
                      _I.EOF: _S.TRANSMISSION, _I.REPLY: _S.TRANSMISSION,
                      _I.VIOLATION: _S.CLOSED},
    _S.DISCONNECTED: {_I.REPLY: _S.DISCONNECTED, _I.VIOLATION: _S.CLOSED},
    _S.CLOSED: {_I.VIOLATION: _S.CLOSED},
}

REFUSALS: Final[Mapping[Input | tuple[State, Input], str]] = {
    (_S.TLS_HANDSHAKE, _I.RECEIVE): "the TLS handshake is under way: its bytes go to the TLS "
                                    "session; call tls_established() when it is done",
    _I.RECEIVE: "receive_data: the connection is closed (state {state})",
    _I.EOF: "receive_data: the connection is closed (state {state})",
    _I.TLS_ESTABLISHED: "no TLS handshake is pending (state {state})",
    _I.REPLY: "cannot reply in state {state}",
    _I.HANGUP: "the client closed the connection during the negotiation (state {state})",
}


@dataclass
class _Negotiated:
    structured: bool = False
    contexts: dict[int, str] = field(default_factory=dict)
    no_zeroes: bool = False
    # the catalog's answers, by raw name: a client names its export in several options (SET_
    # META_CONTEXT, then GO), and one negotiation asks the catalog once per name
    exports: dict[bytes, ExportInfo | None] = field(default_factory=dict)


class ServerConnection:
    def __init__(self, catalog: ExportCatalog, tls: TlsMode = TlsMode.OFF) -> None:
        self._catalog = catalog
        self._tls = tls
        self.tls_active = False  # the TLS handshake is done: receive_data gets decrypted bytes
        self._machine = StateMachine(TRANSITIONS, State.CLIENT_FLAGS, local=LOCAL_INPUTS,
                                     violation=Input.VIOLATION, refusals=REFUSALS)
        self._in = bytearray()
        self._pos = 0  # read position in _in during transmission
        # what get_buffer lends, at rest: small, and large once a receive filled it (a short
        # connection does not pay for a large one)
        self._scratch = memoryview(bytearray(HEADER_RECEIVE_BYTES))
        self._lent = 0  # bytes of the scratch lent by get_buffer (0: the payload, or none)
        self._payload: bytearray | None = None  # a large WRITE's payload, received in place
        self._payload_filled = 0
        self._spare: bytearray | None = None  # a payload handed back with reuse, for the next
        self._payload_header = (0, 0, 0, 0)  # its flags, cookie, offset, length
        self._header_next = False  # a payload was received in place: next, a header alone
        self._out = bytearray(_GREETING)
        self._eof = False
        self._neg = _Negotiated()
        self.export: ExportInfo | None = None

    @property
    def state(self) -> State:
        return self._machine.state

    # ------------------------------------------------------------------ I/O boundary

    def receive_data(self, data: bytes) -> None:
        self._lent = 0
        if data:
            self._machine.fire(Input.RECEIVE)
            payload = self._payload
            if payload is not None:  # the rest of a payload goes where get_buffer would lend
                take = min(len(data), len(payload) - self._payload_filled)
                payload[self._payload_filled : self._payload_filled + take] = data[:take]
                self._payload_filled += take
                data = data[take:]
            self._in += data
        else:
            self._machine.fire(Input.EOF)
            self._eof = True

    def get_buffer(self) -> memoryview:
        """Where the next bytes from the client may be received (``socket.recv_into``), then
        reported with `buffer_updated`: the rest of a large WRITE's payload, which then reaches
        `Request.data` without a copy, or a scratch buffer (a small one after such a payload, so
        that little of the next one is copied). The same as `receive_data` with what was
        received, one copy fewer."""
        payload = self._payload
        if payload is not None:
            self._lent = 0
            return memoryview(payload)[self._payload_filled :]
        self._lent = HEADER_RECEIVE_BYTES if self._header_next else len(self._scratch)
        return self._scratch[: self._lent]

    def buffer_updated(self, count: int) -> None:
        """``count`` bytes (> 0) were received into what `get_buffer` returned."""
        if count <= 0:
            raise LocalProtocolError("buffer_updated takes the bytes received (EOF: "
                                     "receive_data(b''))")
        self._machine.fire(Input.RECEIVE)
        if self._lent:
            if count > self._lent:
                raise LocalProtocolError(f"{count} bytes do not fit the {self._lent} lent")
            self._in += self._scratch[:count]
            if count == len(self._scratch) < RECEIVE_BYTES:
                self._scratch = memoryview(bytearray(RECEIVE_BYTES))
        elif self._payload is not None and count <= len(self._payload) - self._payload_filled:
            self._payload_filled += count
        else:
            raise LocalProtocolError("buffer_updated without a buffer from get_buffer")
        self._lent = 0

    def data_to_send(self) -> bytes:
        out, self._out = bytes(self._out), bytearray()
        return out

    def next_event(self) -> ServerEvent | NeedData:
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

    def _need(self) -> NeedData | Disconnect:
        if self._pos:  # transmission parses at a read position: compact once per batch
            del self._in[: self._pos]
            self._pos = 0
        if not self._eof:
            return NEED_DATA
        if self._in or self._payload is not None:
            raise RemoteProtocolError("the client closed the connection mid-message")
        self._machine.fire(Input.HANGUP)
        return Disconnect()

    def reuse(self, data: bytes | bytearray) -> None:
        """A WRITE's data that nothing refers to any more (the write is done): a payload
        received in place may take its buffer, which saves allocating and zeroing one. Only for
        data no other thread or object still reads."""
        if type(data) is bytearray:
            self._spare = data

    def tls_established(self) -> None:
        """The TLS handshake that followed `StartTls` succeeded; negotiation starts afresh."""
        self._machine.fire(Input.TLS_ESTABLISHED)
        self.tls_active = True

    # ------------------------------------------------------------------ what next_event reads

    def _read_client_flags(self) -> NeedData | None:
        if len(self._in) < 4:
            return NEED_DATA
        (flags,) = struct.unpack_from(">I", self._in)
        del self._in[:4]
        if not flags & ClientFlag.FIXED_NEWSTYLE or flags & ~0x3:
            raise RemoteProtocolError(f"unsupported client flags {flags:#x}")
        self._neg.no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
        self._machine.fire(Input.FLAGS)
        return None

    def _read_option(self) -> ServerEvent | NeedData | None:
        if len(self._in) < _OPTION.size:
            return NEED_DATA
        magic, option, length = _OPTION.unpack_from(self._in)
        if magic != IHAVEOPT:
            raise RemoteProtocolError("bad option magic")
        if length > MAX_OPTION_LENGTH:
            raise RemoteProtocolError(f"option length {length} is too large")
        if len(self._in) < _OPTION.size + length:
            return NEED_DATA
        data = bytes(self._in[_OPTION.size : _OPTION.size + length])
        del self._in[: _OPTION.size + length]
        handler = OPTION_HANDLERS.get(option, ServerConnection._unsupported)
        if (self._tls is TlsMode.REQUIRE and not self.tls_active
                and option not in OPTIONS_BEFORE_TLS):
            handler = ServerConnection._tls_required
        event = handler(self, option, data)
        if event is None:
            self._machine.fire(Input.OPTION)
        return event

    def _handshake_pending(self) -> None:
        raise LocalProtocolError("run the TLS handshake and call tls_established() first")

    def _read_request(self) -> ServerEvent | NeedData:
        # Requests are parsed at a read position, and the buffer is compacted once per batch
        # (not once per request: a batch of many small requests would move the buffer often).
        pending = self._payload
        if pending is not None:
            if self._payload_filled < len(pending):
                return NEED_DATA
            self._payload = None
            self._header_next = True
            flags, cookie, offset, length = self._payload_header
            return self._request(flags, _WRITE, cookie, offset, length, pending)
        pos = self._pos
        if len(self._in) - pos < _REQUEST.size:
            return NEED_DATA
        magic, flags, kind, cookie, offset, length = _REQUEST.unpack_from(self._in, pos)
        if magic != REQUEST_MAGIC:
            raise RemoteProtocolError("bad request magic")
        if kind == Command.WRITE and length > MAX_PAYLOAD:
            raise RemoteProtocolError(f"write of {length} bytes exceeds {MAX_PAYLOAD}")
        payload = length if kind == Command.WRITE else 0
        start = pos + _REQUEST.size
        end = start + payload
        data: bytes | bytearray = b""
        if len(self._in) < end:
            if payload < DIRECT_PAYLOAD:
                return NEED_DATA
            if payload > UNSEEN_PAYLOAD_BYTES and 4 * (len(self._in) - start) < payload:
                self._header_next = False  # its first quarter comes in large receives
                return NEED_DATA
            # A large payload: what came with the header is copied, the rest is received in
            # place (get_buffer), and then it is the request's data as it is.
            spare, self._spare = self._spare, None
            self._payload = spare if spare is not None and len(spare) == payload \
                else bytearray(payload)
            self._payload_filled = len(self._in) - start
            with memoryview(self._in) as view:
                self._payload[: self._payload_filled] = view[start:]
            self._payload_header = (flags, cookie, offset, length)
            self._pos = len(self._in)
            return NEED_DATA
        if payload:  # a small write: many in one receive again
            self._header_next = False
            with memoryview(self._in) as view:
                data = bytes(view[start:end])
        self._pos = end
        return self._request(flags, kind, cookie, offset, length, data)

    def _request(self, flags: int, kind: int, cookie: int, offset: int, length: int,
                 data: bytes | bytearray) -> ServerEvent:
        if kind == _DISC:  # whatever its flags: it has no reply, the connection ends
            self._machine.fire(Input.DISC)
            return Disconnect()
        self._machine.fire(Input.REQUEST)
        command = _COMMANDS.get(kind)
        if command is None:
            return InvalidRequest(cookie, kind, Errno.EINVAL, f"unknown command {kind}")
        if flags & _REFUSED_FLAGS[kind]:
            return InvalidRequest(cookie, kind, Errno.EINVAL,
                                  f"flags {flags:#x} are not allowed on {command.name}")
        if kind in _BOUNDED and length > MAX_PAYLOAD:
            return InvalidRequest(cookie, kind, Errno.EINVAL,
                                  f"{command.name} of {length} bytes exceeds {MAX_PAYLOAD}")
        return Request(cookie, command, _FLAGS[flags], offset, length, data)

    def _disconnected(self) -> Disconnect:
        return Disconnect()

    # ------------------------------------------------------------------ the options

    def _reply(self, option: int, kind: OptionReply, data: bytes = b"") -> None:
        self._out += _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, kind, len(data)) + data

    def _error(self, option: int, kind: OptionReply, message: str) -> None:
        self._reply(option, kind, message.encode())

    def _unsupported(self, option: int, data: bytes) -> None:
        self._error(option, OptionReply.ERR_UNSUP, f"option {option} is not supported")

    def _tls_required(self, option: int, data: bytes) -> None:
        if option == Option.EXPORT_NAME:  # it cannot carry an error: the end
            raise RemoteProtocolError("EXPORT_NAME before STARTTLS, and this server requires "
                                      "TLS")
        self._error(option, OptionReply.ERR_TLS_REQD,
                    "TLS is required: send NBD_OPT_STARTTLS first")

    def _starttls(self, option: int, data: bytes) -> StartTls | None:
        if data:
            self._error(option, OptionReply.ERR_INVALID, "STARTTLS takes no data")
            return None
        if self._tls is TlsMode.OFF:
            self._error(option, OptionReply.ERR_UNSUP, "TLS is not configured")
            return None
        if self.tls_active:
            self._error(option, OptionReply.ERR_INVALID, "TLS is already active")
            return None
        if self._in:
            # A client waits for the ACK before its ClientHello: these bytes came from someone
            # else, and must never be taken as if they had arrived over TLS.
            raise RemoteProtocolError(f"{len(self._in)} bytes of plaintext followed STARTTLS "
                                      f"before the TLS handshake; connection closed")
        self._reply(option, OptionReply.ACK)
        self._neg = _Negotiated(no_zeroes=self._neg.no_zeroes)  # nothing survives STARTTLS
        self._machine.fire(Input.STARTTLS)
        return StartTls()

    def _abort(self, option: int, data: bytes) -> Disconnect:
        self._reply(option, OptionReply.ACK)
        self._machine.fire(Input.ABORT)
        return Disconnect()

    def _list(self, option: int, data: bytes) -> None:
        if data:
            self._error(option, OptionReply.ERR_INVALID, "LIST takes no data")
            return None
        for name in self._catalog.names():
            raw = name.encode()
            self._reply(option, OptionReply.SERVER, struct.pack(">I", len(raw)) + raw)
        self._reply(option, OptionReply.ACK)
        return None

    def _structured_reply(self, option: int, data: bytes) -> None:
        if data:
            self._error(option, OptionReply.ERR_INVALID, "takes no data")
            return None
        self._neg.structured = True
        self._reply(option, OptionReply.ACK)
        return None

    def _export_name(self, option: int, data: bytes) -> ExportChosen:
        export = self._lookup(data)
        if export is None:
            raise RemoteProtocolError("unknown export requested with EXPORT_NAME")
        self._out += struct.pack(">QH", export.size_bytes,
                                 _transmission_flags(export, self._neg.structured))
        if not self._neg.no_zeroes:
            self._out += bytes(124)
        return self._choose(export)

    def _info(self, option: int, data: bytes) -> None:
        self._info_or_go(option, data)
        return None

    def _go(self, option: int, data: bytes) -> ExportChosen | None:
        export = self._info_or_go(option, data)
        return None if export is None else self._choose(export)

    def _info_or_go(self, option: int, data: bytes) -> ExportInfo | None:
        """Answer INFO or GO; -> the export when it was acknowledged."""
        if len(data) < 6:
            self._error(option, OptionReply.ERR_INVALID, "truncated INFO/GO request")
            return None
        (name_length,) = struct.unpack_from(">I", data)
        if len(data) < 4 + name_length + 2 or name_length > MAX_NAME_LENGTH:
            self._error(option, OptionReply.ERR_INVALID, "bad export name length")
            return None
        name = data[4 : 4 + name_length]
        (count,) = struct.unpack_from(">H", data, 4 + name_length)
        if len(data) != 4 + name_length + 2 + 2 * count:
            self._error(option, OptionReply.ERR_INVALID, "bad information request list")
            return None
        requests = set(struct.unpack_from(f">{count}H", data, 6 + name_length))
        export = self._lookup(name)
        if export is None:
            self._error(option, OptionReply.ERR_UNKNOWN, "no such export")
            return None
        self._reply(option, OptionReply.INFO, struct.pack(
            ">HQH", Info.EXPORT, export.size_bytes,
            _transmission_flags(export, self._neg.structured)))
        if Info.NAME in requests:
            self._reply(option, OptionReply.INFO, struct.pack(">H", Info.NAME)
                        + export.name.encode())
        if Info.DESCRIPTION in requests and export.description:
            self._reply(option, OptionReply.INFO, struct.pack(">H", Info.DESCRIPTION)
                        + export.description.encode())
        if Info.BLOCK_SIZE in requests:
            self._reply(option, OptionReply.INFO, struct.pack(
                ">HIII", Info.BLOCK_SIZE, export.min_block, export.preferred_block,
                export.max_block))
        self._reply(option, OptionReply.ACK)
        return export

    def _list_meta_context(self, option: int, data: bytes) -> None:
        self._meta_context(option, data, setting=False)

    def _set_meta_context(self, option: int, data: bytes) -> None:
        self._meta_context(option, data, setting=True)

    def _meta_context(self, option: int, data: bytes, *, setting: bool) -> None:
        if setting:  # "replaces all previously-set metadata contexts (including when this
            self._neg.contexts = {}  # command fails)"
        try:
            name, queries = _parse_meta_request(data)
        except ValueError as exc:
            self._error(option, OptionReply.ERR_INVALID, str(exc))
            return None
        export = self._lookup(name)
        if export is None:
            self._error(option, OptionReply.ERR_UNKNOWN, "no such export")
            return None
        if setting and not self._neg.structured:
            self._error(option, OptionReply.ERR_INVALID, "negotiate structured replies first")
            return None
        chosen = _match_contexts(export.contexts, queries, listing=not setting)
        for index, context in enumerate(chosen, 1):
            if setting:
                self._neg.contexts[index] = context
            context_id = index if setting else 0
            self._reply(option, OptionReply.META_CONTEXT,
                        struct.pack(">I", context_id) + context.encode())
        self._reply(option, OptionReply.ACK)
        return None

    def _lookup(self, raw: bytes) -> ExportInfo | None:
        if len(raw) > MAX_NAME_LENGTH:
            raise RemoteProtocolError("export name too long")
        known = self._neg.exports
        if raw in known:
            return known[raw]
        try:
            export = self._catalog.lookup(raw.decode())
        except UnicodeDecodeError:
            export = None
        if len(known) < CACHED_EXPORTS:  # a client asking after many names costs no memory
            known[raw] = export
        return export

    def _choose(self, export: ExportInfo) -> ExportChosen:
        self.export = export
        self._machine.fire(Input.EXPORT_CHOSEN)
        return ExportChosen(export, self._neg.structured, dict(self._neg.contexts))

    # ------------------------------------------------------------------ replies

    def reply_simple(self, cookie: int, error: int = 0, data: bytes = b"") -> None:
        self._machine.fire(Input.REPLY)
        self._out += struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, cookie) + data

    def reply_chunk(self, cookie: int, kind: ReplyType, payload: bytes, *, done: bool) -> None:
        self._machine.fire(Input.REPLY)
        if not self._neg.structured:
            raise LocalProtocolError("structured replies were not negotiated")
        flags = REPLY_FLAG_DONE if done else 0
        self._out += struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, flags, kind, cookie,
                                 len(payload)) + payload

    def done_reply(self, cookie: int) -> bytes:
        """The reply that ends a request with no data, as bytes for the I/O layer to send with
        others (a structured NONE chunk, or a simple reply): not queued in `data_to_send`."""
        self._machine.fire(Input.REPLY)
        if self._neg.structured:
            return _DONE_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.NONE,
                                    cookie, 0)
        return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)

    def reply_read_header(self, cookie: int, offset: int, length: int, *, done: bool) -> None:
        """The header of a read's data: an OFFSET_DATA chunk (a simple reply without structured
        replies, where ``done`` must be True). The I/O layer sends exactly ``length`` bytes of
        data right after what `data_to_send` then returns, so they need not pass through here."""
        self._machine.fire(Input.REPLY)
        if self._neg.structured:
            flags = REPLY_FLAG_DONE if done else 0
            self._out += struct.pack(">IHHQIQ", STRUCTURED_REPLY_MAGIC, flags,
                                     ReplyType.OFFSET_DATA, cookie, 8 + length, offset)
        elif not done:
            raise LocalProtocolError("a simple reply carries a read's data in one piece")
        else:
            self._out += struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, cookie)

    def reply_hole(self, cookie: int, offset: int, length: int, *, done: bool) -> None:
        """Part of a read that reads as zeros (structured replies only)."""
        self.reply_chunk(cookie, ReplyType.OFFSET_HOLE, struct.pack(">QI", offset, length),
                         done=done)

    def reply_error(self, cookie: int, error: int, message: str = "") -> None:
        """An error reply, structured when negotiated (with a message), simple otherwise."""
        if self._neg.structured:
            raw = message.encode()[:4096]
            self.reply_chunk(cookie, ReplyType.ERROR,
                             struct.pack(">IH", error, len(raw)) + raw, done=True)
        else:
            self.reply_simple(cookie, error)

    @property
    def structured_replies(self) -> bool:
        return self._neg.structured

    @property
    def can_reply(self) -> bool:
        """Replies may still be sent (in transmission, and after the client disconnected while
        requests were in flight; not after a protocol error)."""
        return self._machine.allows(Input.REPLY)


Parser = Callable[[ServerConnection], ServerEvent | NeedData | None]
OptionHandler = Callable[[ServerConnection, int, bytes], ServerEvent | None]

# what next_event reads in each state
PARSERS: Final[Mapping[State, Parser]] = {
    State.CLIENT_FLAGS: ServerConnection._read_client_flags,
    State.OPTIONS: ServerConnection._read_option,
    State.TLS_HANDSHAKE: ServerConnection._handshake_pending,
    State.TRANSMISSION: ServerConnection._read_request,
    State.DISCONNECTED: ServerConnection._disconnected,
    State.CLOSED: ServerConnection._disconnected,
}

# the handler of each option; any other gets NBD_REP_ERR_UNSUP
OPTION_HANDLERS: Final[Mapping[int, OptionHandler]] = {
    Option.EXPORT_NAME: ServerConnection._export_name,
    Option.ABORT: ServerConnection._abort,
    Option.LIST: ServerConnection._list,
    Option.STARTTLS: ServerConnection._starttls,
    Option.INFO: ServerConnection._info,
    Option.GO: ServerConnection._go,
    Option.STRUCTURED_REPLY: ServerConnection._structured_reply,
    Option.LIST_META_CONTEXT: ServerConnection._list_meta_context,
    Option.SET_META_CONTEXT: ServerConnection._set_meta_context,
}

# what TlsMode.REQUIRE answers before TLS (every other option: NBD_REP_ERR_TLS_REQD)
OPTIONS_BEFORE_TLS: Final = frozenset({Option.STARTTLS, Option.ABORT})


def _flags(read_only: bool, multi_conn: bool, structured: bool) -> int:
    flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
    if structured:  # "MUST leave this flag clear if structured replies have not been negotiated"
        flags |= TransmissionFlag.SEND_DF
    if multi_conn:
        flags |= TransmissionFlag.CAN_MULTI_CONN
    if read_only:
        flags |= TransmissionFlag.READ_ONLY
    else:
        flags |= (TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES
                  | TransmissionFlag.SEND_FAST_ZERO)
    return int(flags)


# (read-only, multi-conn, structured replies) -> transmission flags, worked out once (IntFlag
# arithmetic is slow)
_TRANSMISSION_FLAGS: Final = {(r, m, s): _flags(r, m, s) for r in (False, True)
                               for m in (False, True) for s in (False, True)}


def _transmission_flags(export: ExportInfo, structured: bool) -> int:
    return _TRANSMISSION_FLAGS[export.read_only, export.multi_conn, structured]


def _parse_meta_request(data: bytes) -> tuple[bytes, list[str]]:
    if len(data) < 8:
        raise ValueError("truncated meta context request")
    (name_length,) = struct.unpack_from(">I", data)
    if name_length > MAX_NAME_LENGTH or len(data) < 8 + name_length:
        raise ValueError("bad export name length")
    name = data[4 : 4 + name_length]
    pos = 4 + name_length
    (count,) = struct.unpack_from(">I", data, pos)
    pos += 4
    queries: list[str] = []
    for _ in range(count):
        if len(data) < pos + 4:
            raise ValueError("truncated query list")
        (length,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if length > MAX_NAME_LENGTH or len(data) < pos + length:
            raise ValueError("bad query length")
        try:
            queries.append(data[pos : pos + length].decode())
        except UnicodeDecodeError:
            raise ValueError("query is not UTF-8") from None
        pos += length
    if pos != len(data):
        raise ValueError("trailing bytes after the query list")
    return name, queries


def _match_contexts(available: tuple[str, ...], queries: list[str], *,
                    listing: bool) -> list[str]:
    """Contexts that answer the queries. ``available`` holds concrete names, and open namespaces
    ending in ":" (e.g. "qemu:dirty-bitmap:"), under which any name is accepted; whether it can
    be answered is decided when it is asked (and refused with an error, never a default). When
    listing, a namespace query ("qemu:") lists the concrete names under it; no query lists all."""
    concrete = [c for c in available if not c.endswith(":")]
    namespaces = [c for c in available if c.endswith(":")]
    if not queries:
        return concrete if listing else []
    out: list[str] = []
    for query in queries:
        if listing and query.endswith(":"):
            hits = [c for c in concrete if c.startswith(query)]
        elif query in concrete or any(query.startswith(n) and query != n for n in namespaces):
            hits = [query]
        else:
            hits = []
        out += [h for h in hits if h not in out]
    return out
