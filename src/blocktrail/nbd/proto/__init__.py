"""The sans-IO NBD protocol core: no sockets, no asyncio, no threads."""

from blocktrail.nbd.proto.client import ClientConnection, Ready, ReplyChunk, ReplyDone
from blocktrail.nbd.proto.constants import Command, CommandFlag, Errno, ReplyType
from blocktrail.nbd.proto.errors import LocalProtocolError, NbdError, RemoteProtocolError
from blocktrail.nbd.proto.server import (
    NEED_DATA,
    Disconnect,
    ExportCatalog,
    ExportChosen,
    ExportInfo,
    InvalidRequest,
    Request,
    ServerConnection,
)

__all__ = ["NEED_DATA", "ClientConnection", "Command", "CommandFlag", "Disconnect", "Errno",
           "ExportCatalog", "ExportChosen", "ExportInfo", "InvalidRequest", "LocalProtocolError",
           "NbdError", "Ready", "RemoteProtocolError", "ReplyChunk", "ReplyDone", "ReplyType",
           "Request", "ServerConnection"]
