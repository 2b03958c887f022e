"""NBD benchmarks: our host side by side with qemu-nbd on the same image, in one run.

    .venv/bin/python -m bench.nbd_bench [--size-gib 4] [--rounds 3] [--json]

- read: ``nbdcopy EXPORT null:`` throughput, our host vs ``qemu-nbd -e 8`` (warm page cache,
  best of three each, alternating);
- write: ``nbdcopy IMAGE EXPORT`` into an empty disk: our host (tracking on); the bare NBD server
  of ``bench/nbd_serve.py`` with the same tracker, and with a tracker that records nothing
  (tracking on vs off, nothing else different); and qemu-nbd serving an empty raw file
  (``--rounds`` times each, in turn; best and median reported);
- dirty-bitmap listing: ``nbdinfo --map=qemu:dirty-bitmap:...`` after 1% and 10% of the 64 KiB
  blocks changed, our snapshot export vs ``qemu-nbd -B`` on a qcow2 image with a persistent
  bitmap (the two maps are compared, too; 15 runs each, in turn, medians reported); and the
  same maps read as QEMU reads them, one extent a request (``qemu-img map`` over NBD with
  ``x-dirty-bitmap``, ``NBD_CMD_FLAG_REQ_ONE``; 3 runs each, medians);
- 4 KiB random writes at queue depth 32 over 4 connections (fio's nbd engine, one connection
  per job): IOPS into an empty disk on our host (tracking on) vs qemu-nbd on an empty raw file,
  ``--rounds`` times each, in turn (who goes first alternates), medians reported: the virtual
  disk's write speed drifts by more than the difference between the two within minutes;
- ``base:allocation`` of a snapshot of the image (its holes: thousands of extents): our snapshot
  export vs qemu-nbd serving the raw image (``nbdinfo --map``, best of three);
- backup of a QEMU export: ``blocktrail backup nbd+unix://...`` of qemu-nbd with a 1% dirty
  bitmap (incremental) vs a full re-read of the same export.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from bench.measure import count
from bench.workload import BLOCK, scattered_changes, write_image
from blocktrail.disk import Disk
from blocktrail.disk.importer import import_raw

MiB, GiB = 1 << 20, 1 << 30
PY = sys.executable


@dataclass
class Row:
    name: str
    ours: float
    peer: float
    unit: str
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.ours / self.peer if self.peer else float("nan")


def _drop_caches() -> None:
    os.sync()
    with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


@contextlib.contextmanager
def running(cmd: list[str], socket_path: str) -> Iterator[int]:
    """A server process, up once its socket exists; -> its pid. Stopped at the end."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(socket_path):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[0]} did not start: {proc.stderr.read().decode()}"
                                   if proc.stderr else cmd[0])
            time.sleep(0.05)
        time.sleep(0.5)
        yield proc.pid
    finally:
        proc.terminate()
        proc.wait(60)


def host(data: str, work: str) -> tuple[list[str], str]:
    nbd = os.path.join(work, "bt-nbd.sock")
    return [PY, "-m", "blocktrail.cli.main", "host", "--data", data, "--api",
            f"unix:{os.path.join(work, 'bt-api.sock')}", "--nbd", f"unix:{nbd}"], nbd


def qemu_nbd(image: str, fmt: str, work: str, *extra: str) -> tuple[list[str], str]:
    sock = os.path.join(work, "qemu-nbd.sock")
    return ["qemu-nbd", "-t", "-e", "8", "-f", fmt, "-x", "d0", "-k", sock, *extra, image], sock


def _d0(data: str) -> str:
    """The disk d0 of a data directory: made as DATA/d0, where a host moves it to its disks/ at
    its first start (the layout of a version 1 directory)."""
    moved = os.path.join(data, "disks", "d0")
    return moved if os.path.exists(moved) else os.path.join(data, "d0")


def uri(sock: str, export: str = "d0") -> str:
    return f"nbd+unix:///{export}?socket={sock}"


def timed(*cmd: str) -> float:
    start = time.perf_counter()
    subprocess.run(list(cmd), check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


# ---------------------------------------------------------------------- read and write


def read_throughput(work: str, image: str, size: int) -> list[Row]:
    data = os.path.join(work, "read-data")
    import_raw(image, os.path.join(data, "d0")).close()
    ours_cmd, ours_sock = host(data, work)
    peer_cmd, peer_sock = qemu_nbd(image, "raw", work, "-r")
    with running(ours_cmd, ours_sock), running(peer_cmd, peer_sock):
        for sock in (ours_sock, peer_sock):  # warm the page cache and both servers
            timed("nbdcopy", uri(sock), "null:")
        ours, peer = [], []
        for _ in range(3):
            ours.append(timed("nbdcopy", uri(ours_sock), "null:"))
            peer.append(timed("nbdcopy", uri(peer_sock), "null:"))
    shutil.rmtree(data)
    return [Row("nbdcopy read (MiB/s)", size / MiB / min(ours), size / MiB / min(peer), "MiB/s",
                f"best of 3: {min(ours):.2f} s vs {min(peer):.2f} s; all: "
                f"{[round(t, 2) for t in ours]} vs {[round(t, 2) for t in peer]}")]


def write_throughput(work: str, image: str, size: int, rounds: int = 3) -> list[Row]:
    times: dict[str, list[float]] = {"on": [], "tracked": [], "off": [], "qemu": []}
    for _ in range(rounds):  # alternating: freeing the last target's blocks slows
        for kind in times:  # whichever run comes next
            times[kind].append(_write_once(work, image, size, kind))
    best = {kind: min(t) for kind, t in times.items()}
    median = {kind: statistics.median(t) for kind, t in times.items()}
    mib = size / MiB
    return [
        Row("nbdcopy write, tracking on vs off, same server (s)", best["tracked"], best["off"],
            "s", f"best of {rounds}; tracking costs "
            f"{100 * (best['tracked'] / best['off'] - 1):+.1f}% ({mib / best['tracked']:.0f} "
            f"vs {mib / best['off']:.0f} MiB/s); medians {median['tracked']:.2f} vs "
            f"{median['off']:.2f} s ({100 * (median['tracked'] / median['off'] - 1):+.1f}%)"),
        Row("nbdcopy write, host vs bare server untracked (s)", best["on"], best["off"], "s",
            f"best of {rounds}; the host (tracking, control API, metrics) costs "
            f"{100 * (best['on'] / best['off'] - 1):+.1f}%; medians "
            f"{median['on']:.2f} vs {median['off']:.2f} s"),
        Row("nbdcopy write, ours (tracking on) vs qemu-nbd (s)", best["on"], best["qemu"], "s",
            f"best of {rounds}: {mib / best['on']:.0f} vs {mib / best['qemu']:.0f} MiB/s; "
            f"medians {median['on']:.2f} vs {median['qemu']:.2f} s "
            f"({median['on'] / median['qemu']:.2f}); all: "
            f"{[round(t, 2) for t in times['on']]} vs {[round(t, 2) for t in times['qemu']]}"),
    ]


def _write_once(work: str, image: str, size: int, kind: str) -> float:
    os.sync()
    server = {"on": "host", "tracked": "tracked", "off": "untracked", "qemu": "qemu"}[kind]
    target, cmd, sock = _empty_target(work, f"write-{kind}", size, server)
    with running(cmd, sock):
        seconds = timed("nbdcopy", image, uri(sock))
    _remove(target)
    return seconds


def _empty_target(work: str, name: str, size: int, server: str) -> tuple[str, list[str], str]:
    """An empty disk of ``size`` bytes and the command that serves it: ``qemu`` (qemu-nbd, a
    raw file), ``host`` (our host, tracking on), ``tracked`` (the bare NBD server of
    ``bench/nbd_serve.py``, tracking on) or ``untracked`` (that server with tracking off);
    -> (target, command, socket)."""
    target = os.path.join(work, name)
    if server == "qemu":
        with open(target, "wb") as f:
            f.truncate(size)
        cmd, sock = qemu_nbd(target, "raw", work)
        return target, cmd, sock
    os.makedirs(target)
    Disk.create(os.path.join(target, "d0"), size).close()
    if server == "host":
        cmd, sock = host(target, work)
        return target, cmd, sock
    sock = os.path.join(work, f"{server}.sock")
    off = ["--no-tracking"] if server == "untracked" else []
    return target, [PY, "-m", "bench.nbd_serve", os.path.join(target, "d0"), sock, *off], sock


def _remove(target: str) -> None:
    if os.path.isdir(target):
        shutil.rmtree(target)
    else:
        os.unlink(target)


def _fio_iops(sock: str, size: int, work: str) -> float:
    out = os.path.join(work, "fio.json")
    subprocess.run(["fio", "--name=randwrite", "--ioengine=nbd", f"--uri={uri(sock)}",
                    "--rw=randwrite", "--bs=4k", "--iodepth=32", "--numjobs=4",
                    f"--size={size}", "--time_based", "--runtime=15", "--group_reporting",
                    "--output-format=json", f"--output={out}"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out) as f:
        return float(json.load(f)["jobs"][0]["write"]["iops"])


def random_writes(work: str, image: str, size: int, rounds: int = 3) -> list[Row]:
    if shutil.which("fio") is None:
        print("fio missing (Debian package fio): random writes skipped", file=sys.stderr)
        return []
    iops: dict[str, list[float]] = {"ours": [], "qemu": []}
    for round_no in range(rounds):
        for kind in (("ours", "qemu") if round_no % 2 == 0 else ("qemu", "ours")):
            target, cmd, sock = _empty_target(work, f"rand-{kind}", size,
                                              "qemu" if kind == "qemu" else "host")
            with running(cmd, sock):
                iops[kind].append(_fio_iops(sock, size, work))
            _remove(target)
            os.sync()
    ours, peer = statistics.median(iops["ours"]), statistics.median(iops["qemu"])
    return [Row("4 KiB random writes, QD32 x 4 connections (IOPS)", ours, peer, "IOPS",
                f"fio nbd engine, 15 s each, median of {rounds}; all: "
                f"{[round(i) for i in iops['ours']]} vs {[round(i) for i in iops['qemu']]}; "
                "higher is better")]


def allocation_map(work: str, image: str, size: int) -> list[Row]:
    data = os.path.join(work, "alloc-data")
    with import_raw(image, os.path.join(data, "d0")) as disk:
        disk.create_snapshot("s0")
    ours_cmd, ours_sock = host(data, work)
    peer_cmd, peer_sock = qemu_nbd(image, "raw", work, "-r")
    with running(ours_cmd, ours_sock), running(peer_cmd, peer_sock):
        best = {"ours": float("inf"), "peer": float("inf")}
        for _ in range(3):
            start = time.perf_counter()
            ours = subprocess.run(["nbdinfo", "--map=base:allocation", uri(ours_sock, "d0@s0")],
                                  check=True, capture_output=True, text=True).stdout
            best["ours"] = min(best["ours"], time.perf_counter() - start)
            start = time.perf_counter()
            peer = subprocess.run(["nbdinfo", "--map=base:allocation", uri(peer_sock)],
                                  check=True, capture_output=True, text=True).stdout
            best["peer"] = min(best["peer"], time.perf_counter() - start)
    shutil.rmtree(data)
    return [Row("base:allocation of a snapshot (ms)", best["ours"] * 1000, best["peer"] * 1000,
                "ms", f"{len(ours.splitlines())} vs {len(peer.splitlines())} extents, "
                "nbdinfo --map as a whole command")]


# ---------------------------------------------------------------------- dirty bitmaps


def _qemu_io_writes(image: str, changes: list[tuple[int, bytes]]) -> None:
    script = "".join(f"write -P 0x5a {offset} {len(data)}\n" for offset, data in changes)
    subprocess.run(["qemu-io", "-f", "qcow2", image], input=script + "quit\n", text=True,
                   check=True, stdout=subprocess.DEVNULL)


MAP_RUNS = 15


def _map(sock: str, export: str, context: str) -> tuple[float, list[tuple[int, int]]]:
    start = time.perf_counter()
    out = subprocess.run(["nbdinfo", f"--map={context}", uri(sock, export)], check=True,
                         capture_output=True, text=True).stdout
    seconds = time.perf_counter() - start
    dirty = [(int(o), int(n)) for o, n, state, *_ in (line.split() for line in
                                                       out.splitlines()) if state == "1"]
    return seconds, dirty


REQ_ONE_RUNS = 3


def _qemu_map(sock: str, export: str, context: str) -> tuple[float, int]:
    """``qemu-img map`` of a dirty map over NBD: QEMU's client asks for one extent a request
    (``NBD_CMD_FLAG_REQ_ONE``), from where the last one ended. -> seconds, extents listed."""
    options = (f"driver=nbd,server.type=unix,server.path={sock},export={export},"
               f"x-dirty-bitmap={context}")
    start = time.perf_counter()
    out = subprocess.run(["qemu-img", "map", "--output=json", "--image-opts", options],
                         check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - start, len(json.loads(out))


def dirty_listing(work: str, image: str, size: int) -> list[Row]:
    data = os.path.join(work, "map-data")
    qcow2 = os.path.join(work, "img.qcow2")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", image, qcow2], check=True)
    rows = []
    with import_raw(image, os.path.join(data, "d0")) as disk:
        since = disk.create_snapshot("s0").change_id
    for step, fraction in enumerate((0.01, 0.10), 1):
        changes = scattered_changes(size, fraction, seed=step)
        bitmap = f"bm{step}"
        subprocess.run(["qemu-img", "bitmap", "--add", qcow2, bitmap], check=True)
        _qemu_io_writes(qcow2, changes)
        with Disk.open(_d0(data)) as disk:
            for offset, block in changes:
                disk.pwrite(block, offset)
            disk.create_snapshot(f"s{step}")
        ours_cmd, ours_sock = host(data, work)
        peer_cmd, peer_sock = qemu_nbd(qcow2, "qcow2", work, "-r", "-B", bitmap)
        with running(ours_cmd, ours_sock), running(peer_cmd, peer_sock):
            ours_t, peer_t = [], []
            for _ in range(MAP_RUNS):  # in turn: a whole nbdinfo run is a few ms, and noisy
                t, ours_map = _map(ours_sock, f"d0@s{step}", f"qemu:dirty-bitmap:{since}")
                ours_t.append(t)
                t, peer_map = _map(peer_sock, "d0", f"qemu:dirty-bitmap:{bitmap}")
                peer_t.append(t)
            ours_one, peer_one = [], []
            for _ in range(REQ_ONE_RUNS):
                t, ours_extents = _qemu_map(ours_sock, f"d0@s{step}", f"qemu:dirty-bitmap:{since}")
                ours_one.append(t)
                t, peer_extents = _qemu_map(peer_sock, "d0", f"qemu:dirty-bitmap:{bitmap}")
                peer_one.append(t)
        want = sorted((o, BLOCK) for o, _ in changes)
        same = _blocks(ours_map) == _blocks(peer_map) == _blocks(want)
        rows.append(Row(f"dirty map, {fraction:.0%} changed (ms)",
                        statistics.median(ours_t) * 1000, statistics.median(peer_t) * 1000,
                        "ms", f"median of {MAP_RUNS} (best {min(ours_t) * 1000:.2f} vs "
                        f"{min(peer_t) * 1000:.2f}); {len(ours_map)} vs {len(peer_map)} dirty "
                        "extents; maps " + ("equal the change" if same else "DIFFER")))
        rows.append(Row(f"dirty map one extent a request, {fraction:.0%} (ms)",
                        statistics.median(ours_one) * 1000, statistics.median(peer_one) * 1000,
                        "ms", f"qemu-img map over NBD (REQ_ONE), median of {REQ_ONE_RUNS}; "
                        f"{ours_extents} vs {peer_extents} extents"))
        with Disk.open(_d0(data)) as disk:
            since = next(s.change_id for s in disk.snapshots if s.name == f"s{step}")
    shutil.rmtree(data)
    return rows


def _blocks(extents: list[tuple[int, int]]) -> set[int]:
    return {b for o, n in extents for b in range(o // BLOCK, (o + n) // BLOCK)}


# ---------------------------------------------------------------------- backup of QEMU


def qemu_backup(work: str, image: str, size: int) -> list[Row]:
    qcow2 = os.path.join(work, "backup.qcow2")
    repo = os.path.join(work, "bt-repo")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", image, qcow2], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", qcow2, "bm0"], check=True)
    env = {**os.environ, "BLOCKTRAIL_PASSWORD": "bench"}  # encrypted, as a user's is
    subprocess.run([PY, "-m", "blocktrail.cli.main", "repo", "init", repo], check=True,
                   stdout=subprocess.DEVNULL, env=env)

    def backup(sock: str, *extra: str) -> tuple[float, dict[str, object]]:
        _drop_caches()
        start = time.perf_counter()
        out = subprocess.run([PY, "-m", "blocktrail.cli.main", "backup", uri(sock),
                              "--disk-id", "bench-qemu", "--repo", repo, "--json", *extra],
                             check=True, capture_output=True, text=True, env=env).stdout
        return time.perf_counter() - start, json.loads(out)

    cmd, sock = qemu_nbd(qcow2, "qcow2", work, "-r", "-B", "bm0")
    with running(cmd, sock):  # the base point, taken while bm0 records: the incremental's
        backup(sock, "--bitmap", "bm0")  # base must name the bitmap (else it is refused)
    changes = scattered_changes(size, 0.01, seed=11)
    _qemu_io_writes(qcow2, changes)
    with running(cmd, sock):
        inc_s, inc = backup(sock, "--bitmap", "bm0")
        full_s, full = backup(sock, "--full")
    if inc["kind"] != "incremental":
        raise RuntimeError(f"the backup with bm0 was not incremental: {inc['fallback_reason']}")
    return [Row("backup of a qemu-nbd export, 1% dirty bitmap vs full re-read (s)", inc_s,
                full_s, "s", f"incremental read {int(str(inc['bytes_read'])) / MiB:.0f} MiB "
                f"({inc['kind']}), full read {int(str(full['bytes_read'])) / MiB:.0f} MiB")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-gib", type=float, default=4)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--rounds", type=count, default=3, metavar="N",
                        help="runs of the write and random-write steps, each side in turn")
    parser.add_argument("--only", choices=["read", "write", "randwrite", "alloc", "map",
                                           "backup"], action="append")
    args = parser.parse_args(argv)
    missing = [t for t in ("qemu-nbd", "qemu-img", "qemu-io", "nbdcopy", "nbdinfo")
               if shutil.which(t) is None]
    if missing:
        print(f"missing {missing}: install qemu-utils and libnbd-bin", file=sys.stderr)
        return 2
    size = int(args.size_gib * GiB)
    work = tempfile.mkdtemp(prefix="bt-nbd-bench-", dir=os.environ.get("BENCH_DIR", "/var/tmp"))
    started = time.perf_counter()
    try:
        image = os.path.join(work, "img.raw")
        write_image(image, size)
        steps = {"read": read_throughput,
                 "write": lambda w, i, s: write_throughput(w, i, s, rounds=args.rounds),
                 "randwrite": lambda w, i, s: random_writes(w, i, s, rounds=args.rounds),
                 "alloc": allocation_map, "map": dirty_listing, "backup": qemu_backup}
        rows: list[Row] = []
        for name, step in steps.items():
            if args.only is None or name in args.only:
                rows += step(work, image, size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps([{**asdict(r), "ratio": r.ratio} for r in rows], indent=2))
    else:
        width = max(len(r.name) for r in rows)
        print(f"{'':<{width}}  {'ours':>10} {'peer':>10} {'ratio':>7}")
        for r in rows:
            print(f"{r.name:<{width}}  {r.ours:>10.2f} {r.peer:>10.2f} {r.ratio:>7.2f}  "
                  f"{r.note}")
        print(f"({size / GiB:g} GiB image; total {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
