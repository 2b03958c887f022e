"""Several NBD connections to one export: the host advertises NBD_FLAG_CAN_MULTI_CONN, so a
flush on any connection must make every write completed on any connection durable. qemu-img,
nbdcopy and QEMU open several connections when it is set."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from blocktrail.disk import Disk
from blocktrail.nbd.blocking import BlockingNbdClient
from blocktrail.simfileio import SimulatedFileIO
from hostproc import cli_json, require_tools, running_host

pytestmark = pytest.mark.interop
MiB = 1 << 20
BLOCK = 64 * 1024


def test_nbdcopy_over_four_connections_writes_what_it_read(tmp_path: Path) -> None:
    require_tools("nbdcopy", "nbdinfo")
    image = tmp_path / "image.raw"
    rng = random.Random(5)
    with open(image, "wb") as f:
        f.truncate(32 * MiB)
        for _ in range(200):
            f.seek(rng.randrange(0, 32 * MiB - BLOCK))
            f.write(rng.randbytes(rng.randrange(1, BLOCK)))
    with running_host(tmp_path) as (api, nbd):
        cli_json("disk", "create", "d0", "--size", "32M", "--host", api)
        uri = f"nbd+unix:///d0?socket={nbd}"
        info = subprocess.run(["nbdinfo", "--json", uri], capture_output=True, text=True,
                              check=True).stdout
        assert '"can_multi_conn": true' in info
        subprocess.run(["nbdcopy", "--connections=4", "--flush", str(image), uri], check=True,
                       timeout=120)
        back = tmp_path / "back.raw"
        subprocess.run(["nbdcopy", "--connections=4", uri, str(back)], check=True, timeout=120)
        assert back.read_bytes() == image.read_bytes()


def test_our_client_shares_the_work_over_four_connections(tmp_path: Path) -> None:
    with running_host(tmp_path) as (api, nbd):
        cli_json("disk", "create", "d0", "--size", "16M", "--host", api)
        data = random.Random(6).randbytes(16 * MiB)
        with BlockingNbdClient.connect(f"nbd+unix:///d0?socket={nbd}", connections=4) as c:
            assert c.connections == 4
            c.pwrite(data, 0)
            c.flush()
            assert c.pread(16 * MiB, 0) == data


def test_a_flush_makes_every_threads_writes_durable() -> None:
    """The disk side of the promise: writes that returned on any thread, one flush on another,
    and a power loss: all of them are there."""
    fs = SimulatedFileIO()
    disk = Disk.create("/sim/d", 4 * MiB, 4096, cluster_size=16384, fileio=fs)
    disk.create_snapshot("s")  # a delta top: its map entries too must be durable
    blocks = {i: random.Random(i).randbytes(4096) for i in range(64)}
    threads = [threading.Thread(target=lambda part=part: [
        disk.pwrite(blocks[i], i * 65536 + 512) for i in range(part, 64, 4)]) for part in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    disk.flush()  # from this thread, which wrote nothing
    disk.abandon()
    fs.power_loss()
    with Disk.open("/sim/d", fileio=fs) as again:
        for i, data in blocks.items():
            assert again.pread(4096, i * 65536 + 512) == data, f"write {i} was lost"


def test_sigkill_while_four_connections_write_with_fua_and_flush(tmp_path: Path) -> None:
    """Every write acknowledged as durable (FUA, or before a flush that returned) is on the disk
    after the host is killed and started again, and the next changed-areas query reports it."""
    data_dir, api_sock, nbd_sock = tmp_path / "data", tmp_path / "api.sock", tmp_path / "nbd.sock"
    args = [sys.executable, "-m", "blocktrail.cli.main", "host", "--data", str(data_dir),
            "--api", f"unix:{api_sock}", "--nbd", f"unix:{nbd_sock}"]

    def start() -> subprocess.Popen[bytes]:
        for sock in (api_sock, nbd_sock):
            sock.unlink(missing_ok=True)
        proc = subprocess.Popen(args, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not (api_sock.exists() and nbd_sock.exists()):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.2)
        return proc

    host = start()
    first = cli_json("disk", "create", "d0", "--size", "64M", "--host", f"unix:{api_sock}")
    since = first["current_change_id"]
    # block -> every content written to it, in order; the index of the newest one that was
    # acknowledged as durable (FUA, or before a flush that returned). After the kill the block
    # holds that content or a later one (a write issued after it may or may not have landed).
    written: dict[int, list[bytes]] = {}
    durable: dict[int, int] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def writer(part: int) -> None:
        rng = random.Random(part)
        pending: dict[int, int] = {}
        try:
            with BlockingNbdClient.connect(f"nbd+unix:///d0?socket={nbd_sock}") as client:
                while not stop.is_set():
                    block = rng.randrange(part, 1024, 4)  # each thread its own blocks
                    data = rng.randbytes(BLOCK)
                    fua = rng.random() < 0.3
                    with lock:
                        written.setdefault(block, []).append(data)
                        index = len(written[block]) - 1
                    client.pwrite(data, block * BLOCK, fua=fua)
                    if fua:
                        with lock:
                            durable[block] = index
                        pending.pop(block, None)
                    else:
                        pending[block] = index
                    if rng.random() < 0.1:
                        client.flush()
                        with lock:
                            durable.update(pending)
                        pending.clear()
        except Exception:  # the host died under the request
            pass

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1.5 + random.random())
    host.send_signal(signal.SIGKILL)
    host.wait(timeout=30)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert durable, "nothing was acknowledged before the kill"
    host = start()
    try:
        with BlockingNbdClient.connect(f"nbd+unix:///d0?socket={nbd_sock}") as client:
            for block, index in durable.items():
                assert client.pread(BLOCK, block * BLOCK) in written[block][index:], \
                    f"block {block}: its durable write is lost"
        areas = cli_json("cbt", "query", "d0", "--since", since, "--host", f"unix:{api_sock}")
        reported = {o // BLOCK + i for a in areas["changed_areas"]
                    for o, n in [(a["offset"], a["length"])] for i in range(-(-n // BLOCK))}
        assert set(durable) <= reported, sorted(set(durable) - reported)[:10]
    finally:
        host.send_signal(signal.SIGTERM)
        assert host.wait(timeout=30) == 0
    assert not os.path.exists(tmp_path / "core")
