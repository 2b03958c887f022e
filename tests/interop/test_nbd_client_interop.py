"""Our sans-IO client, driven over a plain socket, against qemu-nbd (with a dirty bitmap)."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

from blocktrail.nbd.proto import (
    NEED_DATA,
    BlockStatus,
    ClientConnection,
    Command,
    CommandFlag,
    Ready,
    ReplyDone,
)
from hostproc import require_tools

pytestmark = pytest.mark.interop


def _tools() -> None:
    require_tools("qemu-nbd", "qemu-img", "qemu-io")


def exchange(sock: socket.socket, conn: ClientConnection) -> list[object]:
    """Send what the client has; read until negotiation ends or a reply is complete."""
    sock.sendall(conn.data_to_send())
    events: list[object] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            sock.sendall(conn.data_to_send())
            conn.receive_data(sock.recv(1 << 20))
            continue
        events.append(event)
        if isinstance(event, Ready | ReplyDone):
            return events


def test_client_reads_data_and_dirty_bitmap_from_qemu_nbd(tmp_path: Path) -> None:
    _tools()
    image, sock_path = tmp_path / "img.qcow2", tmp_path / "nbd.sock"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "4M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", str(image)],
                   check=True, capture_output=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(image), "bm0"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 1M 64k", str(image)],
                   check=True, capture_output=True)
    server = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-r", "-x", "disk0", "-B", "bm0",
                               "-k", str(sock_path), str(image)])
    try:
        deadline = time.monotonic() + 20
        while not sock_path.exists():
            assert time.monotonic() < deadline and server.poll() is None
            time.sleep(0.05)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(sock_path))
            conn = ClientConnection("disk0", ["base:allocation", "qemu:dirty-bitmap:bm0"])
            [ready] = exchange(sock, conn)
            assert isinstance(ready, Ready) and ready.size_bytes == 4 << 20
            assert sorted(ready.contexts.values()) == ["base:allocation",
                                                       "qemu:dirty-bitmap:bm0"]
            data = bytearray(4096)
            cookie = conn.send_read(1 << 20, data)
            events = exchange(sock, conn)
            assert data == b"\x22" * 4096 and events[-1] == ReplyDone(cookie, 0)
            conn.send_request(Command.BLOCK_STATUS, 0, 4 << 20, CommandFlag(0))
            events = exchange(sock, conn)
            by_context = {e.context: e.descriptors for e in events if isinstance(e, BlockStatus)}
            dirty = []
            offset = 0
            for length, flags in by_context["qemu:dirty-bitmap:bm0"]:
                if flags & 1:
                    dirty.append((offset, length))
                offset += length
            assert dirty == [(1 << 20, 64 << 10)]  # only what was written after bm0
    finally:
        server.terminate()
        server.wait(timeout=10)
