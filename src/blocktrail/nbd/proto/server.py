"""The server side of NBD as a state machine that does no I/O.

    conn = ServerConnection(catalog)
    send(conn.data_to_send())                  # the greeting
    conn.receive_data(bytes_from_socket)       # b"" at EOF
    while (event := conn.next_event()) is not NEED_DATA: ...
    send(conn.data_to_send())

Negotiation (fixed newstyle) is answered here from the export catalog; the application sees
`ExportChosen`, then `Request`s, which it answers with `reply_simple` / `reply_chunk`. Anything the
client sends that the protocol does not allow raises `RemoteProtocolError` and ends the
connection; lengths are bounded before anything is buffered.

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

import struct
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Protocol

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

_OPTION = struct.Struct(">QII")
_REQUEST = struct.Struct(">IHHQQI")


class ExportCatalog(Protocol):
    """Where the server core finds exports: by name, and all of them for NBD_OPT_LIST."""

    def lookup(self, name: str) -> ExportInfo | None: ...

    def names(self) -> list[str]: ...


class State(Enum):
    CLIENT_FLAGS = auto()
    OPTIONS = auto()
    TLS_HANDSHAKE = auto()  # STARTTLS acknowledged; waiting for tls_established()
    TRANSMISSION = auto()
    CLOSED = auto()


@dataclass
class _Negotiated:
    structured: bool = False
    contexts: dict[int, str] = field(default_factory=dict)
    no_zeroes: bool = False


class ServerConnection:
    def __init__(self, catalog: ExportCatalog, tls: TlsMode = TlsMode.OFF) -> None:
        self._catalog = catalog
        self._tls = tls
        self.tls_active = False  # the TLS handshake is done: receive_data gets decrypted bytes
        self._in = bytearray()
        self._pos = 0  # read position in _in during transmission
        self._out = bytearray()
        self._eof = False
        self.state = State.CLIENT_FLAGS
        self._neg = _Negotiated()
        self.export: ExportInfo | None = None
        flags = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
        self._out += struct.pack(">QQH", NBDMAGIC, IHAVEOPT, flags)

    # ------------------------------------------------------------------ I/O boundary

    def receive_data(self, data: bytes) -> None:
        if self.state is State.CLOSED:
            raise LocalProtocolError("the connection is closed")
        if self.state is State.TLS_HANDSHAKE and data:
            raise LocalProtocolError("the TLS handshake is under way: its bytes go to the TLS "
                                     "session; call tls_established() when it is done")
        if data:
            self._in += data
        else:
            self._eof = True

    def data_to_send(self) -> bytes:
        out, self._out = bytes(self._out), bytearray()
        return out

    def next_event(self) -> ServerEvent | NeedData:
        try:
            while True:
                if self.state is State.CLOSED:
                    return Disconnect()
                if self.state is State.TLS_HANDSHAKE:
                    raise LocalProtocolError("run the TLS handshake and call tls_established() "
                                             "first")
                if self.state is State.CLIENT_FLAGS:
                    if not self._client_flags():
                        return self._need()
                elif self.state is State.OPTIONS:
                    chosen = self._option()
                    if chosen is None:
                        return self._need()
                    if isinstance(chosen, ExportChosen | Disconnect | StartTls):
                        return chosen
                else:
                    return self._request()
        except RemoteProtocolError:
            self.state = State.CLOSED
            raise

    def _need(self) -> NeedData | Disconnect:
        if self._eof:
            if len(self._in) > self._pos or self.state is not State.TRANSMISSION:
                self.state = State.CLOSED
                raise RemoteProtocolError("the client closed the connection mid-message")
            self.state = State.CLOSED
            return Disconnect()
        return NEED_DATA

    def tls_established(self) -> None:
        """The TLS handshake that followed `StartTls` succeeded; negotiation starts afresh."""
        if self.state is not State.TLS_HANDSHAKE:
            raise LocalProtocolError(f"no TLS handshake is pending (state {self.state.name})")
        self.tls_active = True
        self.state = State.OPTIONS

    # ------------------------------------------------------------------ negotiation

    def _client_flags(self) -> bool:
        if len(self._in) < 4:
            return False
        (flags,) = struct.unpack_from(">I", self._in)
        del self._in[:4]
        if not flags & ClientFlag.FIXED_NEWSTYLE or flags & ~0x3:
            raise RemoteProtocolError(f"unsupported client flags {flags:#x}")
        self._neg.no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
        self.state = State.OPTIONS
        return True

    def _option(self) -> ServerEvent | bool | None:
        if len(self._in) < _OPTION.size:
            return None
        magic, option, length = _OPTION.unpack_from(self._in)
        if magic != IHAVEOPT:
            raise RemoteProtocolError("bad option magic")
        if length > MAX_OPTION_LENGTH:
            raise RemoteProtocolError(f"option length {length} is too large")
        if len(self._in) < _OPTION.size + length:
            return None
        data = bytes(self._in[_OPTION.size : _OPTION.size + length])
        del self._in[: _OPTION.size + length]
        return self._handle_option(option, data)

    def _reply(self, option: int, kind: OptionReply, data: bytes = b"") -> None:
        self._out += struct.pack(">QIII", OPTION_REPLY_MAGIC, option, kind, len(data)) + data

    def _error(self, option: int, kind: OptionReply, message: str) -> bool:
        self._reply(option, kind, message.encode())
        return True

    def _handle_option(self, option: int, data: bytes) -> ServerEvent | bool:
        if option == Option.STARTTLS:
            return self._starttls(data)
        if self._tls is TlsMode.REQUIRE and not self.tls_active and option != Option.ABORT:
            if option == Option.EXPORT_NAME:
                raise RemoteProtocolError("EXPORT_NAME before STARTTLS, and this server "
                                          "requires TLS")
            return self._error(option, OptionReply.ERR_TLS_REQD,
                               "TLS is required: send NBD_OPT_STARTTLS first")
        if option == Option.EXPORT_NAME:
            return self._export_name(data)
        if option == Option.ABORT:
            self._reply(option, OptionReply.ACK)
            self.state = State.CLOSED
            return Disconnect()
        if option == Option.LIST:
            if data:
                return self._error(option, OptionReply.ERR_INVALID, "LIST takes no data")
            for name in self._catalog.names():
                raw = name.encode()
                self._reply(option, OptionReply.SERVER, struct.pack(">I", len(raw)) + raw)
            self._reply(option, OptionReply.ACK)
            return True
        if option == Option.STRUCTURED_REPLY:
            if data:
                return self._error(option, OptionReply.ERR_INVALID, "takes no data")
            self._neg.structured = True
            self._reply(option, OptionReply.ACK)
            return True
        if option in (Option.INFO, Option.GO):
            return self._info_or_go(option, data)
        if option in (Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT):
            return self._meta_context(option, data)
        return self._error(option, OptionReply.ERR_UNSUP, f"option {option} is not supported")

    def _starttls(self, data: bytes) -> StartTls | bool:
        option = Option.STARTTLS
        if data:
            return self._error(option, OptionReply.ERR_INVALID, "STARTTLS takes no data")
        if self._tls is TlsMode.OFF:
            return self._error(option, OptionReply.ERR_UNSUP, "TLS is not configured")
        if self.tls_active:
            return self._error(option, OptionReply.ERR_INVALID, "TLS is already active")
        if self._in:
            # A client waits for the ACK before its ClientHello: these bytes came from someone
            # else, and must never be taken as if they had arrived over TLS.
            raise RemoteProtocolError(f"{len(self._in)} bytes of plaintext followed STARTTLS "
                                      f"before the TLS handshake; connection closed")
        self._reply(option, OptionReply.ACK)
        self._neg = _Negotiated(no_zeroes=self._neg.no_zeroes)  # nothing survives STARTTLS
        self.state = State.TLS_HANDSHAKE
        return StartTls()

    def _export_name(self, data: bytes) -> ServerEvent:
        export = self._lookup(data)
        if export is None:
            raise RemoteProtocolError("unknown export requested with EXPORT_NAME")
        self._out += struct.pack(">QH", export.size_bytes, _transmission_flags(export))
        if not self._neg.no_zeroes:
            self._out += bytes(124)
        return self._choose(export)

    def _lookup(self, raw: bytes) -> ExportInfo | None:
        if len(raw) > MAX_NAME_LENGTH:
            raise RemoteProtocolError("export name too long")
        try:
            return self._catalog.lookup(raw.decode())
        except UnicodeDecodeError:
            return None

    def _info_or_go(self, option: int, data: bytes) -> ServerEvent | bool:
        if len(data) < 6:
            return self._error(option, OptionReply.ERR_INVALID, "truncated INFO/GO request")
        (name_length,) = struct.unpack_from(">I", data)
        if len(data) < 4 + name_length + 2 or name_length > MAX_NAME_LENGTH:
            return self._error(option, OptionReply.ERR_INVALID, "bad export name length")
        name = data[4 : 4 + name_length]
        (count,) = struct.unpack_from(">H", data, 4 + name_length)
        if len(data) != 4 + name_length + 2 + 2 * count:
            return self._error(option, OptionReply.ERR_INVALID, "bad information request list")
        requests = set(struct.unpack_from(f">{count}H", data, 6 + name_length))
        export = self._lookup(name)
        if export is None:
            return self._error(option, OptionReply.ERR_UNKNOWN, "no such export")
        self._reply(option, OptionReply.INFO, struct.pack(
            ">HQH", Info.EXPORT, export.size_bytes, _transmission_flags(export)))
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
        if option == Option.GO:
            return self._choose(export)
        return True

    def _meta_context(self, option: int, data: bytes) -> bool:
        try:
            name, queries = _parse_meta_request(data)
        except ValueError as exc:
            return self._error(option, OptionReply.ERR_INVALID, str(exc))
        export = self._lookup(name)
        if export is None:
            return self._error(option, OptionReply.ERR_UNKNOWN, "no such export")
        if option == Option.SET_META_CONTEXT:
            if not self._neg.structured:
                return self._error(option, OptionReply.ERR_INVALID,
                                   "negotiate structured replies first")
            self._neg.contexts = {}
        chosen = _match_contexts(export.contexts, queries, listing=option ==
                                 Option.LIST_META_CONTEXT)
        for index, context in enumerate(chosen, 1):
            if option == Option.SET_META_CONTEXT:
                self._neg.contexts[index] = context
            context_id = index if option == Option.SET_META_CONTEXT else 0
            self._reply(option, OptionReply.META_CONTEXT,
                        struct.pack(">I", context_id) + context.encode())
        self._reply(option, OptionReply.ACK)
        return True

    def _choose(self, export: ExportInfo) -> ExportChosen:
        self.export = export
        self.state = State.TRANSMISSION
        return ExportChosen(export, self._neg.structured, dict(self._neg.contexts))

    # ------------------------------------------------------------------ transmission

    def _request(self) -> ServerEvent | NeedData:
        # Requests are parsed at a read position, and the buffer is compacted once per batch
        # (not once per request: a batch of many small requests would move the buffer often).
        pos = self._pos
        if len(self._in) - pos < _REQUEST.size:
            return self._compact_and_need()
        magic, flags, kind, cookie, offset, length = _REQUEST.unpack_from(self._in, pos)
        if magic != REQUEST_MAGIC:
            raise RemoteProtocolError("bad request magic")
        if kind == Command.WRITE and length > MAX_PAYLOAD:
            raise RemoteProtocolError(f"write of {length} bytes exceeds {MAX_PAYLOAD}")
        payload = length if kind == Command.WRITE else 0
        end = pos + _REQUEST.size + payload
        if len(self._in) < end:
            return self._compact_and_need()
        with memoryview(self._in) as view:
            data = bytes(view[pos + _REQUEST.size : end]) if payload else b""
        self._pos = end
        try:
            command = Command(kind)
        except ValueError:
            return InvalidRequest(cookie, kind, Errno.EINVAL, f"unknown command {kind}")
        if flags & ~ALLOWED_FLAGS[command]:
            return InvalidRequest(cookie, kind, Errno.EINVAL,
                                  f"flags {flags:#x} are not allowed on {command.name}")
        if command in (Command.READ, Command.CACHE) and length > MAX_PAYLOAD:
            return InvalidRequest(cookie, kind, Errno.EINVAL,
                                  f"{command.name} of {length} bytes exceeds {MAX_PAYLOAD}")
        if command is Command.DISC:
            self.state = State.CLOSED
            return Disconnect()
        return Request(cookie, command, CommandFlag(flags), offset, length, data)

    def _compact_and_need(self) -> NeedData | Disconnect:
        if self._pos:
            del self._in[: self._pos]
            self._pos = 0
        return self._need()

    def reply_simple(self, cookie: int, error: int = 0, data: bytes = b"") -> None:
        self._check_transmission()
        self._out += struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, cookie) + data

    def reply_chunk(self, cookie: int, kind: ReplyType, payload: bytes, *, done: bool) -> None:
        self._check_transmission()
        if not self._neg.structured:
            raise LocalProtocolError("structured replies were not negotiated")
        flags = REPLY_FLAG_DONE if done else 0
        self._out += struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, flags, kind, cookie,
                                 len(payload)) + payload

    def reply_read_header(self, cookie: int, offset: int, length: int, *, done: bool) -> None:
        """The header of a read's data: an OFFSET_DATA chunk (a simple reply without structured
        replies, where ``done`` must be True). The I/O layer sends exactly ``length`` bytes of
        data right after what `data_to_send` then returns, so they need not pass through here."""
        self._check_transmission()
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

    @property
    def structured_replies(self) -> bool:
        return self._neg.structured

    def reply_error(self, cookie: int, error: int, message: str = "") -> None:
        """An error reply, structured when negotiated (with a message), simple otherwise."""
        if self._neg.structured:
            raw = message.encode()[:4096]
            self.reply_chunk(cookie, ReplyType.ERROR,
                             struct.pack(">IH", error, len(raw)) + raw, done=True)
        else:
            self.reply_simple(cookie, error)

    def _check_transmission(self) -> None:
        if self.state is not State.TRANSMISSION:
            raise LocalProtocolError(f"cannot reply in state {self.state.name}")


def _transmission_flags(export: ExportInfo) -> int:
    flags = (TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
             | TransmissionFlag.SEND_DF)
    if export.multi_conn:
        flags |= TransmissionFlag.CAN_MULTI_CONN
    if export.read_only:
        flags |= TransmissionFlag.READ_ONLY
    else:
        flags |= (TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES
                  | TransmissionFlag.SEND_FAST_ZERO)
    return int(flags)


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
