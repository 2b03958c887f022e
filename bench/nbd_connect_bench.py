"""What one short NBD connection costs: connect, negotiate one meta context, one BLOCK_STATUS of
the whole export, NBD_CMD_DISC; our host side by side with qemu-nbd, in one run.

    .venv/bin/python -m bench.nbd_connect_bench [--connections 500] [--nbdinfo 50] [--json]

A 1 GiB disk with 64 scattered 64 KiB writes, a snapshot, 64 more, a second snapshot:
``blocktrail host`` serves ``d0@s1`` (``base:allocation``, ``qemu:dirty-bitmap:CHANGE_ID`` since
the first snapshot), ``qemu-nbd -r -B bm0`` the same writes in a qcow2 image with a bitmap. The
client is the sans-IO client core on a blocking socket (the same for both, and cheap, so the
difference is the server's); the connections run one after the other. Reported per connection:
wall time (median and mean) and the server process's CPU time (user + system, from
/proc/PID/stat, over the whole loop). ``--nbdinfo N`` adds ``nbdinfo --map=CONTEXT`` run N times
(process start included, for both). ``--floor`` adds a third server, the replay floor
(bench/nbd_replay.py): what our host sent in one recorded connection of the same client,
replayed byte for byte by a minimal asyncio server with no NBD logic. What asyncio and the
socket calls cost is in its row; what our host's own work adds is the difference to ours.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from bench import nbd_replay
from bench.measure import process_cpu_seconds
from bench.nbd_bench import running
from blocktrail.disk import Disk
from blocktrail.nbd.proto import NEED_DATA, ClientConnection, Command, Ready, ReplyDone

MiB, GiB = 1 << 20, 1 << 30
SIZE = GiB
BLOCK = 64 << 10
PY = sys.executable


@dataclass
class Row:
    server: str
    context: str
    median_ms: float
    mean_ms: float
    server_cpu_ms: float  # per connection


def _writes(seed: int) -> list[int]:
    return [((seed * 7919 + i * 104_729) % (SIZE // BLOCK)) * BLOCK for i in range(64)]


def make_disk(data: str) -> str:
    """The disk d0 with snapshots s0 and s1; -> the change ID of s0."""
    with Disk.create(os.path.join(data, "d0"), SIZE) as disk:
        for offset in _writes(1):
            disk.pwrite(b"a" * BLOCK, offset)
        since = disk.create_snapshot("s0").change_id
        for offset in _writes(2):
            disk.pwrite(b"b" * BLOCK, offset)
        disk.create_snapshot("s1")
    return since


def make_qcow2(path: str) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(SIZE)], check=True)
    _qemu_io(path, _writes(1), "a")
    subprocess.run(["qemu-img", "bitmap", "--add", path, "bm0"], check=True)
    _qemu_io(path, _writes(2), "b")


def _qemu_io(path: str, offsets: list[int], byte: str) -> None:
    script = "".join(f"write -P 0x{ord(byte):02x} {o} {BLOCK}\n" for o in offsets)
    subprocess.run(["qemu-io", "-f", "qcow2", path], input=script + "quit\n", text=True,
                   check=True, stdout=subprocess.DEVNULL)


def one_connection(path: str, export: str, context: str) -> None:
    """Connect, negotiate ``context``, one BLOCK_STATUS of the whole export, disconnect."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        conn = ClientConnection(export, [context])
        ready: Ready | None = None
        cookie = -1
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                if out := conn.data_to_send():
                    sock.sendall(out)
                data = sock.recv(1 << 16)
                if not data:
                    raise ConnectionError("the server closed the connection")
                conn.receive_data(data)
            elif isinstance(event, Ready):
                ready = event
                if context not in event.contexts.values():
                    raise RuntimeError(f"{context} was not agreed to")
                length = min(ready.size_bytes, (1 << 32) - BLOCK)
                cookie = conn.send_request(Command.BLOCK_STATUS, 0, length)
            elif isinstance(event, ReplyDone) and event.cookie == cookie:
                if event.error:
                    raise RuntimeError(f"BLOCK_STATUS failed: {event.message}")
                break
        conn.send_request(Command.DISC)
        sock.sendall(conn.data_to_send())
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # the server closes its end


def loop(pid: int, path: str, export: str, context: str, count: int) -> tuple[float, float,
                                                                            float]:
    for _ in range(20):  # warm up
        one_connection(path, export, context)
    times = []
    cpu = process_cpu_seconds(pid)
    for _ in range(count):
        start = time.perf_counter()
        one_connection(path, export, context)
        times.append(time.perf_counter() - start)
    cpu = process_cpu_seconds(pid) - cpu
    return statistics.median(times) * 1000, statistics.mean(times) * 1000, cpu / count * 1000


def nbdinfo_map(uri: str, context: str) -> str:
    return subprocess.run(["nbdinfo", f"--map={context}", uri], check=True,
                          capture_output=True, text=True).stdout


def replay_floor(work: str, ours_sock: str, context: str, args: argparse.Namespace,
                 label: str) -> list[Row]:
    """The replay floor's rows for our client (and nbdinfo): each records one connection of
    its client to our host, then runs its loop against the replay of it."""
    rows = []
    with replaying(work, ours_sock, "client",
                   lambda path: one_connection(path, "d0@s1", context)) as (pid, sock):
        rows.append(Row("replay floor", label,
                        *loop(pid, sock, "d0@s1", context, args.connections)))
    if args.nbdinfo:
        host_map: list[str] = []  # what the host answered the recorded run
        with replaying(work, ours_sock, "nbdinfo", lambda path: host_map.append(
                nbdinfo_map(f"nbd+unix:///d0@s1?socket={path}", context))) as (pid, sock):
            uri = f"nbd+unix:///d0@s1?socket={sock}"
            if nbdinfo_map(uri, context) != host_map[0]:
                raise RuntimeError("the replay's map differs from the host's")
            rows.append(Row("replay floor (nbdinfo)", label,
                            *nbdinfo_loop(pid, uri, context, args.nbdinfo)))
    return rows


@contextlib.contextmanager
def replaying(work: str, ours_sock: str, name: str,
              client: Callable[[str], object]) -> Iterator[tuple[int, str]]:
    """One run of ``client`` against our host recorded, then replayed by its own server
    process until the end: -> (its pid, its socket)."""
    saved = os.path.join(work, f"replay-{name}.json")
    nbd_replay.save(nbd_replay.record(ours_sock, client), saved)
    sock = os.path.join(work, f"replay-{name}.sock")
    with running([PY, "-m", "bench.nbd_replay", sock, saved], sock) as pid:
        yield pid, sock


def nbdinfo_loop(pid: int, uri: str, context: str, count: int) -> tuple[float, float, float]:
    times = []
    cpu = process_cpu_seconds(pid)
    for _ in range(count):
        start = time.perf_counter()
        subprocess.run(["nbdinfo", f"--map={context}", uri], check=True,
                       stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    cpu = process_cpu_seconds(pid) - cpu
    return statistics.median(times) * 1000, statistics.mean(times) * 1000, cpu / count * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--nbdinfo", type=int, default=0, metavar="N")
    parser.add_argument("--floor", action="store_true",
                        help="add the replay floor: our host's replies, replayed with no logic")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    missing = [t for t in ("qemu-nbd", "qemu-img", "qemu-io", "nbdinfo") if not shutil.which(t)]
    if missing:
        print(f"missing {missing}: install qemu-utils and libnbd-bin", file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="bt-nbd-connect-", dir=os.environ.get("BENCH_DIR",
                                                                          "/var/tmp"))
    rows: list[Row] = []
    try:
        data = os.path.join(work, "data")
        since = make_disk(data)
        qcow2 = os.path.join(work, "d0.qcow2")
        make_qcow2(qcow2)
        ours_sock = os.path.join(work, "bt-nbd.sock")
        peer_sock = os.path.join(work, "qemu-nbd.sock")
        ours_cmd = [PY, "-m", "blocktrail.cli.main", "host", "--data", data, "--api",
                    f"unix:{os.path.join(work, 'bt-api.sock')}", "--nbd", f"unix:{ours_sock}"]
        peer_cmd = ["qemu-nbd", "-t", "-e", "8", "-r", "-f", "qcow2", "-x", "d0", "-B", "bm0",
                    "-k", peer_sock, qcow2]
        cases = [("base:allocation", "base:allocation"),
                 (f"qemu:dirty-bitmap:{since}", "qemu:dirty-bitmap:bm0")]
        with running(ours_cmd, ours_sock) as ours, running(peer_cmd, peer_sock) as peer:
            for ours_ctx, peer_ctx in cases:
                label = ours_ctx.split(":")[0] + ":" + ours_ctx.split(":")[1]
                rows.append(Row("blocktrail host", label,
                                *loop(ours, ours_sock, "d0@s1", ours_ctx, args.connections)))
                rows.append(Row("qemu-nbd", label,
                                *loop(peer, peer_sock, "d0", peer_ctx, args.connections)))
                if args.nbdinfo:
                    rows.append(Row("blocktrail host (nbdinfo)", label, *nbdinfo_loop(
                        ours, f"nbd+unix:///d0@s1?socket={ours_sock}", ours_ctx,
                        args.nbdinfo)))
                    rows.append(Row("qemu-nbd (nbdinfo)", label, *nbdinfo_loop(
                        peer, f"nbd+unix:///d0?socket={peer_sock}", peer_ctx, args.nbdinfo)))
                if args.floor:
                    rows += replay_floor(work, ours_sock, ours_ctx, args, label)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        print(f"{'server':<27} {'context':<19} {'median ms':>9} {'mean ms':>8} "
              f"{'server CPU ms':>13}")
        for r in rows:
            print(f"{r.server:<27} {r.context:<19} {r.median_ms:>9.3f} {r.mean_ms:>8.3f} "
                  f"{r.server_cpu_ms:>13.3f}")
        print(f"({args.connections} connections each, one after the other)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
