"""The sans-IO client against the sans-IO server, bytes piped through whole or byte by byte."""

from __future__ import annotations

import struct

import pytest

from blocktrail.nbd.proto import (
    NEED_DATA,
    Command,
    ExportInfo,
    RemoteProtocolError,
    ReplyType,
    Request,
    ServerConnection,
)
from blocktrail.nbd.proto.client import ClientConnection, Ready, ReplyChunk, ReplyDone
from blocktrail.nbd.proto.constants import Errno

EXPORT = ExportInfo("d", 1 << 20, False, contexts=("base:allocation", "qemu:dirty-bitmap:"))


class Catalog:
    def lookup(self, name: str) -> ExportInfo | None:
        return EXPORT if name == "d" else None

    def names(self) -> list[str]:
        return ["d"]


def pump(client: ClientConnection, server: ServerConnection, step: int) -> list[object]:
    """Move bytes both ways until neither side has anything to do; answer requests."""
    events: list[object] = []
    for _ in range(100_000):
        moved = False
        for data, target in ((server.data_to_send(), client), (client.data_to_send(), server)):
            for i in range(0, len(data), step):
                target.receive_data(data[i : i + step])
                moved = True
                drain(client, server, events)
        drain(client, server, events)
        if not moved:
            return events
    raise AssertionError("no progress")


def drain(client: ClientConnection, server: ServerConnection, events: list[object]) -> None:
    while (event := server.next_event()) is not NEED_DATA:
        if isinstance(event, Request):
            if event.command is Command.READ:
                server.reply_chunk(event.cookie, ReplyType.OFFSET_DATA,
                                   struct.pack(">Q", event.offset) + b"x" * event.length,
                                   done=True)
            else:
                server.reply_error(event.cookie, Errno.EPERM, "read-only test")
        elif not hasattr(event, "export"):
            break
    while (event := client.next_event()) is not NEED_DATA:
        events.append(event)


@pytest.mark.parametrize("step", [1, 7, 1 << 20])
def test_negotiate_read_and_error(step: int) -> None:
    client = ClientConnection("d", ["base:allocation", "qemu:dirty-bitmap:x/1"])
    server = ServerConnection(Catalog())
    events = pump(client, server, step)
    assert events == [Ready(1 << 20, events[0].transmission_flags,  # type: ignore[attr-defined]
                            {1: "base:allocation", 2: "qemu:dirty-bitmap:x/1"})]
    read = client.send_request(Command.READ, 4096, 10)
    write = client.send_request(Command.WRITE, 0, 3, data=b"abc")
    events = pump(client, server, step)
    assert events == [ReplyChunk(read, ReplyType.OFFSET_DATA, struct.pack(">Q", 4096) + b"x" * 10),
                      ReplyDone(read, 0),
                      ReplyDone(write, Errno.EPERM, "read-only test")]


def test_unknown_export_is_refused() -> None:
    client = ClientConnection("nope")
    server = ServerConnection(Catalog())
    with pytest.raises(RemoteProtocolError, match="refused option"):
        pump(client, server, 1 << 20)


def test_reply_for_a_cookie_not_in_flight_is_a_protocol_error() -> None:
    client = ClientConnection("d")
    server = ServerConnection(Catalog())
    pump(client, server, 1 << 20)
    client.receive_data(struct.pack(">IIQ", 0x67446698, 0, 999))
    with pytest.raises(RemoteProtocolError, match="not in flight"):
        client.next_event()
