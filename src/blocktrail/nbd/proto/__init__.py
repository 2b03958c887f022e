"""The sans-IO NBD protocol core: no sockets, no asyncio, no threads."""

from blocktrail.nbd.proto.client import ClientConnection
from blocktrail.nbd.proto.constants import Command, CommandFlag, Errno, ReplyType
from blocktrail.nbd.proto.errors import (
    CommandNotSupported,
    ConnectionLost,
    LocalProtocolError,
    NbdError,
    NegotiationRefused,
    RemoteProtocolError,
    RequestFailed,
    ServerUnreachable,
    TlsError,
    TlsNotOffered,
    TlsRequiredByServer,
)
from blocktrail.nbd.proto.events import (
    NEED_DATA,
    BlockSize,
    BlockStatus,
    ClientEvent,
    Disconnect,
    ExportChosen,
    ExportInfo,
    InvalidRequest,
    NeedData,
    ReadChunk,
    Ready,
    ReplyChunk,
    ReplyDone,
    Request,
    ServerEvent,
    StartTls,
    TlsMode,
    TransmissionEvent,
)
from blocktrail.nbd.proto.server import ExportCatalog, ServerConnection

__all__ = ["NEED_DATA", "BlockSize", "BlockStatus", "ClientConnection", "ClientEvent", "Command",
           "CommandFlag", "CommandNotSupported", "ConnectionLost", "Disconnect", "Errno",
           "ExportCatalog", "ExportChosen", "ExportInfo", "InvalidRequest", "LocalProtocolError",
           "NbdError", "NeedData", "NegotiationRefused", "ReadChunk", "Ready",
           "RemoteProtocolError", "ReplyChunk", "ReplyDone", "ReplyType", "Request",
           "RequestFailed", "ServerConnection", "ServerEvent", "ServerUnreachable", "StartTls",
           "TlsError", "TlsMode", "TlsNotOffered", "TlsRequiredByServer", "TransmissionEvent"]
