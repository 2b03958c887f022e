"""A host that runs out of file descriptors (a flood of connections past its RLIMIT_NOFILE)
keeps serving once they are gone: accepting pauses and says why, it never stops for good."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from blocktrail.disk import Disk
from hostproc import HostProcess
from nbdraw import READ, RawClient

MiB = 1 << 20


def test_a_host_out_of_descriptors_serves_again_once_the_flood_is_gone(tmp_path: Path) -> None:
    root = tmp_path / "host"
    Disk.create(root / "data" / "d0", 8 * MiB).close()
    with HostProcess(root, max_files=96) as host:
        flood = []
        for _ in range(150):  # more than it has descriptors for: the rest wait in the backlog
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(host.nbd_socket))
            flood.append(sock)
        time.sleep(1.5)
        for sock in flood:
            sock.close()
        time.sleep(2.5)  # past the pause that running out of descriptors began
        client = RawClient(str(host.nbd_socket), "d0", timeout=15)
        client.send(READ, 0, 4096)
        reply = client.reply()
        assert reply.error == 0
    log = host.log.read_text()
    assert "cannot accept a connection ([Errno 24] Too many open files); trying again in 1 s" \
        in log
