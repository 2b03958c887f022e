"""What the NBD protocol cores and their I/O layers hand each other, both roles.

    server: ServerConnection(catalog of ExportInfo, TlsMode).next_event() ->
            ExportChosen | Request | InvalidRequest | StartTls | Disconnect | NEED_DATA
    client: ClientConnection(export, contexts, TlsMode).next_event() ->
            Ready | ReadChunk | ReplyChunk | BlockStatus | ReplyDone | StartTls | Disconnect
            | NEED_DATA

Events are frozen dataclasses. The ones an application builds and gives to a core (`ExportInfo`,
`BlockSize`) check themselves when they are made: a value the wire cannot carry raises
`LocalProtocolError` there, not later in the middle of a negotiation. The ones a core parses
from the peer are checked by the parser, which raises `RemoteProtocolError` instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Final

from blocktrail.nbd.proto.constants import (
    MAX_NAME_LENGTH,
    MAX_PAYLOAD,
    Command,
    CommandFlag,
    ReplyType,
)
from blocktrail.nbd.proto.errors import LocalProtocolError

DEFAULT_MAX_BLOCK = 32 * 1024 * 1024  # the spec's advice when the server states no maximum
NO_MAX_BLOCK = 0xFFFFFFFF  # NBD_INFO_BLOCK_SIZE: no maximum but the 32-bit length field
MAX_MIN_BLOCK = 64 * 1024  # the largest minimum block size the spec allows


class NeedData(Enum):
    """`next_event` needs more bytes from the peer (`receive_data`) before it can say more."""

    NEED_DATA = auto()


NEED_DATA: Final = NeedData.NEED_DATA


class TlsMode(Enum):
    """Whether a connection uses TLS: OFF (STARTTLS is refused / not asked for), ALLOW (used
    when the peer wants it), REQUIRE (nothing but STARTTLS and ABORT before TLS; a client gives
    up rather than go on in plaintext)."""

    OFF = auto()
    ALLOW = auto()
    REQUIRE = auto()


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def block_size_problem(minimum: int, preferred: int, maximum: int) -> str | None:
    """Why (minimum, preferred, maximum) are not valid NBD block size constraints, or None."""
    if not (_power_of_two(minimum) and minimum <= MAX_MIN_BLOCK and _power_of_two(preferred)
            and preferred >= minimum and maximum >= minimum
            and (maximum % minimum == 0 or maximum == NO_MAX_BLOCK)
            and maximum <= NO_MAX_BLOCK):
        return (f"invalid block size constraints: minimum {minimum}, preferred {preferred}, "
                f"maximum {maximum}")
    return None


def _check_name(what: str, name: str) -> None:
    try:
        raw = name.encode()
    except UnicodeEncodeError:
        raise LocalProtocolError(f"{what} {name!r} is not valid UTF-8") from None
    if len(raw) > MAX_NAME_LENGTH:
        raise LocalProtocolError(f"{what} of {len(raw)} bytes is longer than {MAX_NAME_LENGTH}")


# ------------------------------------------------------------------------------ both roles


@dataclass(frozen=True, slots=True)
class StartTls:
    """STARTTLS was acknowledged: send `data_to_send()` in plaintext (the server's ACK; nothing
    on the client), run the TLS handshake on the socket, then call `tls_established()` (or close
    the connection if the handshake fails)."""


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The connection is over: NBD_OPT_ABORT or NBD_CMD_DISC, the peer closed it at a message
    boundary, or a core that has stopped is asked again."""


# ------------------------------------------------------------------------------ server


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What a server's catalog says about one export. ``contexts`` are the meta contexts it
    answers; a name ending in ":" is an open namespace (any name under it may be asked for, and
    is refused with an error reply when it cannot be answered). ``multi_conn``: a flush on any
    connection makes every write completed on any connection to this export durable
    (NBD_FLAG_CAN_MULTI_CONN); leave it False unless that holds. ``binding``: what the catalog
    found behind the name, opaque here; it comes back to the catalog's ``open`` with the export
    a connection chose, so the connection uses what negotiation described."""

    name: str
    size_bytes: int
    read_only: bool
    description: str = ""
    contexts: tuple[str, ...] = ()
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = MAX_PAYLOAD
    multi_conn: bool = False
    binding: object = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        _check_name("export name", self.name)
        _check_name("export description", self.description)
        if not 0 <= self.size_bytes < 1 << 64:
            raise LocalProtocolError(f"export size {self.size_bytes} does not fit 64 bits")
        problem = block_size_problem(self.min_block, self.preferred_block, self.max_block)
        if problem is not None:
            raise LocalProtocolError(f"export {self.name!r}: {problem}")
        for context in self.contexts:
            if not context:
                raise LocalProtocolError(f"export {self.name!r}: an empty meta context name")
            _check_name("meta context name", context)


@dataclass(frozen=True, slots=True)
class ExportChosen:
    """Negotiation is over (NBD_OPT_GO or NBD_OPT_EXPORT_NAME): requests follow."""

    export: ExportInfo
    structured_replies: bool
    contexts: dict[int, str]  # context id -> name, as negotiated with SET_META_CONTEXT


@dataclass(frozen=True, slots=True)
class Request:
    """A request to carry out (WRITE's data included); answer it with the core's ``reply_*``.
    A large WRITE's data is the bytearray it was received into (no copy), the request's own."""

    cookie: int
    command: Command
    flags: CommandFlag
    offset: int
    length: int
    data: bytes | bytearray = b""


@dataclass(frozen=True, slots=True)
class InvalidRequest:
    """A request the server must refuse with an error reply (the connection goes on)."""

    cookie: int
    command: int
    errno: int
    message: str


ServerEvent = ExportChosen | Request | InvalidRequest | StartTls | Disconnect


# ------------------------------------------------------------------------------ client


@dataclass(frozen=True, slots=True)
class BlockSize:
    """The server's block size constraints (NBD_INFO_BLOCK_SIZE); without them, the spec's
    defaults: any alignment, 4 KiB preferred, at most 32 MiB a request."""

    minimum: int = 1
    preferred: int = 4096
    maximum: int = DEFAULT_MAX_BLOCK

    def __post_init__(self) -> None:
        problem = block_size_problem(self.minimum, self.preferred, self.maximum)
        if problem is not None:
            raise LocalProtocolError(problem)


@dataclass(frozen=True, slots=True)
class Ready:
    """GO succeeded: what the export is and what was agreed; requests may be sent."""

    size_bytes: int
    transmission_flags: int
    contexts: dict[int, str]  # context id -> name the server agreed to
    structured_replies: bool = True
    block_size: BlockSize = BlockSize()


@dataclass(frozen=True, slots=True)
class ReadChunk:
    """Bytes ``[offset, offset + length)`` of a read are in its buffer (a hole: as zeros)."""

    cookie: int
    offset: int
    length: int
    hole: bool = False


@dataclass(frozen=True, slots=True)
class ReplyChunk:
    """A content chunk of a READ sent with `send_request` (no buffer): the payload as the
    structured chunk carries it (64-bit offset, then the data; for a hole, offset and size)."""

    cookie: int
    kind: ReplyType
    payload: bytes


@dataclass(frozen=True, slots=True)
class BlockStatus:
    """One meta context's answer to BLOCK_STATUS: (length, flags) descriptors, consecutive from
    the request's offset; the last one may reach past the request's end."""

    cookie: int
    context_id: int
    context: str
    descriptors: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class ReplyDone:
    """A request is answered: error 0, or an NBD errno and the server's message."""

    cookie: int
    error: int
    message: str = ""


TransmissionEvent = ReadChunk | ReplyChunk | BlockStatus | ReplyDone | Disconnect
ClientEvent = Ready | ReadChunk | ReplyChunk | BlockStatus | ReplyDone | StartTls | Disconnect
