"""Instant restore against a plain restore, in one run.

    .venv/bin/python -m bench.instant_bench [--size-gib 4] [--json]

A point of an ext4 image (a file whose first line the guest prints, and random files filling
half the disk), backed up into a local repository, encrypted as by default (argon2id t=3 m=64 MiB
p=4; every command and the host get the password from BLOCKTRAIL_PASSWORD). Then, page caches
dropped before each step (when run as root):

- seconds from the command to the first read of the boot sector (the disk usable), and to the
  guest's output: an instant restore (the whole command `blocktrail restore REPO POINT --instant
  --host API --disk NAME`, then a guest booted on the disk's NBD export) vs a full restore (the
  whole command `blocktrail restore REPO POINT --to FILE`) followed by a boot on the file. The
  guest is the test suite's (tests/guest: QEMU's system emulator, TCG, a Debian cloud kernel
  booted directly with a busybox initramfs). Three marks of its serial console: its first line
  of any kind (the kernel's or the initramfs's; a directly booted kernel may print it before it
  reads the disk at all), ``READY`` (the initramfs found the disk: the kernel probed it) and the
  disk's first line (ext4 mounted, a file read: the headline, as it needs the disk to work).
  The same guest booted on a local file with no restore at all is the floor both share.
  Without the guest kit, the time to the first successful read of the boot sector, and it says
  so;
- 4 KiB random read latency (p50/p99, one request at a time over NBD) from an instant disk whose
  fill is paused (every read fetched from the repository) vs the same disk once local;
- fill throughput (restore command to `local`, nothing else running) vs a plain restore;
- `blocktrail serve` read throughput (`nbdcopy EXPORT null:`) vs a plain restore.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from blocktrail.backup.engine import BackupOptions, run_backup
from blocktrail.backup.sources.local import LocalDiskSource
from blocktrail.disk.importer import import_raw
from blocktrail.host.client import HostClient
from blocktrail.repo import Encryption, Repository

MiB, GiB = 1 << 20, 1 << 30
ROOT = Path(__file__).resolve().parents[1]
FIRST_LINE = "blocktrail instant restore: the first line of this disk"
PASSWORD = "bench"
BT = [sys.executable, "-m", "blocktrail.cli.main"]
GUEST_SCRIPT = """
dev=$(bt_disk d0)
mkdir -p /mnt/d0
mount -t ext4 -o ro "$dev" /mnt/d0
bt_say FIRST "$(head -n 1 /mnt/d0/hello.txt)"
umount /mnt/d0
"""


def bt_env() -> dict[str, str]:
    """The environment of every blocktrail command and of the host: the repository's
    password."""
    return {**os.environ, "BLOCKTRAIL_PASSWORD": PASSWORD}


def drop_caches() -> None:
    os.sync()
    with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def guest_kit() -> tuple[Any, list[str]]:
    """The test suite's guest kit (tests/guest/guestvm.py), or None and what is missing."""
    sys.path.insert(0, str(ROOT / "tests" / "guest"))
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import guestvm
    except ImportError as exc:
        return None, [f"tests/guest/guestvm.py cannot be imported ({exc})"]
    return guestvm.find_kit()


def make_image(work: Path, size: int, mke2fs: str) -> Path:
    """An ext4 image of ``size`` bytes: hello.txt and random files filling about half."""
    tree = work / "tree"
    (tree / "data").mkdir(parents=True)
    (tree / "hello.txt").write_text(FIRST_LINE + "\n")
    rng = random.Random(5)
    left, n = size // 2, 0
    while left > 0:
        piece = min(left, 64 * MiB)
        with open(tree / "data" / f"f{n:04d}", "wb") as f:
            for _ in range(0, piece, MiB):
                f.write(rng.randbytes(MiB))
        left -= piece
        n += 1
    image = work / "image.raw"
    subprocess.run([mke2fs, "-q", "-F", "-t", "ext4", "-E", "nodiscard", "-d", str(tree),
                    str(image), f"{size // 1024}k"], check=True)
    shutil.rmtree(tree)
    return image


class Host:
    def __init__(self, work: Path) -> None:
        self.api, self.nbd = work / "api.sock", work / "nbd.sock"
        self.proc = subprocess.Popen(
            [*BT, "host", "--data", str(work / "disks"), "--api", f"unix:{self.api}", "--nbd",
             f"unix:{self.nbd}"], env=bt_env(),
            stderr=open(work / "host.log", "ab"))  # noqa: SIM115  (the child keeps it)
        deadline = time.monotonic() + 60
        while not (self.api.exists() and self.nbd.exists()):
            assert self.proc.poll() is None and time.monotonic() < deadline, "no host"
            time.sleep(0.05)
        self.client = HostClient(f"unix:{self.api}")

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.client.call(method, path, **kwargs)

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.nbd}"

    def restore_command(self, name: str, repo: Path, point: str) -> None:
        """The whole command a user types: `blocktrail restore ... --instant`."""
        subprocess.run([*BT, "restore", str(repo), point, "--instant", "--host",
                        f"unix:{self.api}", "--disk", name], check=True, capture_output=True,
                       env=bt_env())

    def restore(self, name: str, repo: Path, point: str, **fill: Any) -> None:
        self.call("POST", "/disks/restore", json={"name": name, "repository": str(repo),
                                                  "point": point, "fill": fill})

    def wait_local(self, name: str, timeout_s: float = 3600) -> None:
        deadline = time.monotonic() + timeout_s
        while self.call("GET", f"/disks/{name}")["restore"]["state"] != "local":
            assert time.monotonic() < deadline
            time.sleep(0.02)

    def close(self) -> None:
        self.client.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)


def boot(kit: Any, work: Path, drive: Any, name: str) -> dict[str, float]:
    """Boot a guest on ``drive``; -> the perf_counter clock when QEMU was started, when the
    guest printed its first line of any kind, ``READY`` (the disk found), and the disk's
    first line."""
    import guestvm
    offset = time.perf_counter() - time.monotonic()
    with guestvm.Guest(kit, work, [drive], GUEST_SCRIPT, name=name) as guest:
        guest.expect("READY", 600)
        ready = time.perf_counter()
        message, _ = guest.expect("FIRST", 600)
        first = time.perf_counter()
        assert message.text == FIRST_LINE, message
        started = guest.started + offset
    with open(guest.log_path, encoding="utf-8") as log:  # "[  1.23] line", from QEMU's start
        line = log.readline()
    return {"qemu": started, "any_line": started + float(line[1:line.index("]")]),
            "ready": ready, "disk_line": first}


def read_boot_sector(uri: str) -> float:
    done = subprocess.run(["qemu-io", "-f", "raw", "-c", "read 0 512", uri],
                          capture_output=True, text=True, check=True)
    assert "read 512/512" in done.stdout, done.stdout + done.stderr
    return time.perf_counter()


class Reader:
    """4 KiB reads, one at a time, over a plain NBD connection (newstyle, no structured
    replies): the time of each."""

    def __init__(self, nbd: Path, export: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(nbd))
        f = self.sock.makefile("rwb")
        f.read(18)  # NBDMAGIC, IHAVEOPT, handshake flags
        f.write(struct.pack(">I", 1))  # fixed newstyle
        name = export.encode()
        f.write(struct.pack(">QII", 0x49484156454F5054, 1, len(name)) + name)  # EXPORT_NAME
        f.flush()
        f.read(8 + 2 + 124)
        self.f = f

    def read(self, offset: int, length: int = 4096) -> float:
        started = time.perf_counter()
        self.f.write(struct.pack(">IHHQQI", 0x25609513, 0, 0, 1, offset, length))
        self.f.flush()
        magic, error, _ = struct.unpack(">IIQ", self.f.read(16))
        assert magic == 0x67446698 and error == 0, error
        self.f.read(length)
        return time.perf_counter() - started

    def close(self) -> None:
        self.f.close()
        self.sock.close()


def latencies(host: Host, export: str, size: int, count: int, seed: int) -> tuple[float, float]:
    rng = random.Random(seed)
    reader = Reader(host.nbd, export)
    try:
        times = [reader.read(rng.randrange(size // 4096) * 4096) for _ in range(count)]
    finally:
        reader.close()
    times.sort()
    return statistics.median(times) * 1e3, times[int(len(times) * 0.99) - 1] * 1e3


@contextlib.contextmanager
def serving(work: Path, repo: Path, point: str) -> Iterator[str]:
    sock = work / "serve.sock"
    proc = subprocess.Popen([*BT, "serve", str(repo), point, "--nbd", f"unix:{sock}"],
                            stderr=subprocess.DEVNULL, env=bt_env())
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "serve did not start"
            time.sleep(0.05)
        yield f"nbd+unix:///{point}?socket={sock}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=0.5)
    parser.add_argument("--reads", type=int, default=400, help="4 KiB reads per latency run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    size = int(args.size_gib * GiB) // MiB * MiB
    kit, missing = guest_kit()
    mke2fs = shutil.which("mke2fs", path=os.pathsep.join([os.environ["PATH"], "/sbin",
                                                           "/usr/sbin"]))
    if mke2fs is None:
        print("needs mke2fs (Debian package e2fsprogs)", file=sys.stderr)
        return 2
    out: dict[str, Any] = {"size_bytes": size, "guest": kit is not None}
    work = Path(tempfile.mkdtemp(prefix="instant-bench-", dir=os.environ.get("BENCH_DIR",
                                                                            "/var/tmp")))
    try:
        image = make_image(work, size, mke2fs)
        repo = work / "repo"
        disk = import_raw(image, work / "source-disk")
        with Repository.init(repo, encryption=Encryption(PASSWORD)) as store:
            point = run_backup(LocalDiskSource(disk), store, BackupOptions()).point.id
        disk.close()
        image.unlink()
        host = Host(work)
        try:
            out.update(measure(args, kit, work, repo, point, host, size))
        finally:
            host.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not kit:
        out["guest_missing"] = missing
    report(out, args.json)
    return 0


def measure(args: argparse.Namespace, kit: Any, work: Path, repo: Path, point: str, host: Host,
            size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if kit is not None:
        import guestvm
    # a full restore, then a boot
    target = work / "restored.raw"
    drop_caches()
    started = time.perf_counter()
    subprocess.run([*BT, "restore", str(repo), point, "--to", str(target)], check=True,
                   capture_output=True, env=bt_env())
    restored = time.perf_counter()
    out["full_first_read_s"] = read_boot_sector(str(target)) - started
    if kit is not None:
        marks = boot(kit, work, guestvm.Drive.image("d0", target), "full")
        out["full_marks_s"] = {k: v - started for k, v in marks.items()}
        done = marks["disk_line"]
        # the floor: the same boot on the file already there (page cache dropped), no restore
        drop_caches()
        started_boot = time.perf_counter()
        marks = boot(kit, work, guestvm.Drive.image("d0", target), "local")
        out["boot_only_marks_s"] = {k: v - started_boot for k, v in marks.items()}
    else:
        done = read_boot_sector(str(target))
    out["restore_s"] = restored - started
    out["full_then_boot_s"] = done - started
    target.unlink()
    # an instant restore (the whole command), then a boot
    drop_caches()
    started = time.perf_counter()
    host.restore_command("inst", repo, point)
    out["instant_command_s"] = time.perf_counter() - started
    out["instant_first_read_s"] = read_boot_sector(host.uri("inst")) - started
    if kit is not None:
        marks = boot(kit, work, guestvm.Drive.nbd("d0", host.nbd, "inst"), "instant")
        out["instant_marks_s"] = {k: v - started for k, v in marks.items()}
        done = marks["disk_line"]
    else:
        done = read_boot_sector(host.uri("inst"))
    out["instant_then_boot_s"] = done - started
    host.wait_local("inst")
    # the fill alone
    drop_caches()
    started = time.perf_counter()
    host.restore("fill", repo, point)
    host.wait_local("fill")
    out["fill_s"] = time.perf_counter() - started
    # 4 KiB random reads: an unfilled instant disk, then the local one
    host.restore("lat", repo, point, paused=True)
    drop_caches()
    out["instant_read_ms"] = latencies(host, "lat", size, args.reads, 1)
    drop_caches()
    out["local_read_ms"] = latencies(host, "inst", size, args.reads, 1)
    # serve, read whole by nbdcopy
    with serving(work, repo, point) as uri:
        drop_caches()
        started = time.perf_counter()
        subprocess.run(["nbdcopy", uri, "null:"], check=True)
        out["serve_s"] = time.perf_counter() - started
    return out


def report(out: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(out))
        return
    size = out["size_bytes"]
    mib = size / MiB
    to_what = "the guest's first line of output from its disk" if out["guest"] else \
        "the first successful read of the boot sector (no guest kit: " + \
        "; ".join(out.get("guest_missing", [])) + ")"
    ratio = out["instant_then_boot_s"] / out["full_then_boot_s"]
    print(f"image {mib:.0f} MiB (ext4, about half of it data); load: "
          f"{os.getloadavg()[0]:.2f}")
    print(f"to {to_what}: instant restore {out['instant_then_boot_s']:.2f} s, full restore "
          f"({out['restore_s']:.2f} s) then boot {out['full_then_boot_s']:.2f} s: "
          f"{ratio:.3f}x (goal <= 0.1x)")
    print(f"the instant restore command alone: {out['instant_command_s']:.2f} s")
    if "instant_marks_s" in out:
        marks = [("QEMU started", "qemu"), ("the guest's first line of any kind", "any_line"),
                 ("READY (the disk found)", "ready"), ("the disk's first line", "disk_line")]
        print(f"{'seconds from the command to':<40} {'instant':>8} {'full':>8} {'ratio':>7} "
              f"{'boot alone':>10}")
        for label, key in marks:
            i, f = out["instant_marks_s"][key], out["full_marks_s"][key]
            print(f"{label:<40} {i:>8.2f} {f:>8.2f} {i / f:>7.3f} "
                  f"{out['boot_only_marks_s'][key]:>10.2f}")
    print(f"to the first read of the boot sector: instant restore "
          f"{out['instant_first_read_s']:.2f} s, full restore {out['full_first_read_s']:.2f} s: "
          f"{out['instant_first_read_s'] / out['full_first_read_s']:.3f}x")
    ip50, ip99 = out["instant_read_ms"]
    lp50, lp99 = out["local_read_ms"]
    print(f"4 KiB random reads: unfilled instant disk p50 {ip50:.2f} ms p99 {ip99:.2f} ms; "
          f"local disk p50 {lp50:.2f} ms p99 {lp99:.2f} ms")
    plain = mib / out["restore_s"]
    fill = mib / out["fill_s"]
    serve = mib / out["serve_s"]
    print(f"fill {fill:.0f} MiB/s vs plain restore {plain:.0f} MiB/s: {fill / plain:.2f}x "
          f"(goal >= 0.8x)")
    print(f"serve via nbdcopy {serve:.0f} MiB/s vs plain restore {plain:.0f} MiB/s: "
          f"{serve / plain:.2f}x")


if __name__ == "__main__":
    raise SystemExit(main())
