"""Shared by the instant-restore tests: a restore point of known content in a repository, a
chunk of it damaged or stored again, a host that may be killed and started again, qemu-img
compare of a range, and guest-style I/O through qemu-io."""

from __future__ import annotations

import contextlib
import random
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hostproc
from blocktrail.backup.engine import BackupOptions, run_backup
from blocktrail.backup.sources.local import LocalDiskSource
from blocktrail.disk import Disk
from blocktrail.repo import Repository
from blocktrail.repo.objects import KIND_CHUNK
from s3server import TEST_ENCRYPTION, TEST_PASSWORD

CS = 64 * 1024


@dataclass(frozen=True)
class Point:
    repo: Path
    id: str
    disk_id: str
    change_id: str
    content: bytes

    def chunk(self, index: int) -> bytes:
        return self.content[index * CS : (index + 1) * CS]

    @property
    def data_chunks(self) -> list[int]:
        return [i for i in range(-(-len(self.content) // CS)) if any(self.chunk(i))]


def point_bytes(size: int, seed: int, *, data_share: float = 0.7) -> bytes:
    """Chunks of random bytes (``data_share`` of them), repeated chunks and holes."""
    rng = random.Random(seed)
    out = bytearray(size)
    repeated = rng.randbytes(CS)
    for index in range(size // CS):
        roll = rng.random()
        if roll < data_share - 0.1:
            out[index * CS : (index + 1) * CS] = rng.randbytes(CS)
        elif roll < data_share:
            out[index * CS : (index + 1) * CS] = repeated  # stored once, at several offsets
    return bytes(out)


def make_point(root: Path, size: int = 32 * CS, seed: int = 1, *,
               content: bytes | None = None) -> Point:
    """A disk under ``root`` holding ``content`` (default: `point_bytes`), backed up (full)
    into a new repository ``root/repo``."""
    content = point_bytes(size, seed) if content is None else content
    repo_path = root / "repo"
    Repository.init(repo_path, encryption=TEST_ENCRYPTION).close()
    with Disk.create(root / "source-disk", len(content)) as disk:
        for offset in range(0, len(content), CS):
            piece = content[offset : offset + CS]
            if any(piece):
                disk.pwrite(piece, offset)
        with Repository.open(repo_path, password=TEST_PASSWORD) as repo:
            report = run_backup(LocalDiskSource(disk), repo, BackupOptions())
    point = report.point
    assert point.change_id is not None
    return Point(repo_path, point.id, point.disk_id, point.change_id, content)


def damage_chunk(point: Point, index: int) -> None:
    """Change one byte of the stored copy of chunk ``index`` (every copy: it is stored once)."""
    with Repository.open(point.repo, password=TEST_PASSWORD) as repo:
        loc = repo.index.get(repo.codec.name(KIND_CHUNK, point.chunk(index)))
        assert loc is not None, f"chunk {index} is not stored"
        pack = point.repo / "packs" / loc.pack_id[:2] / f"{loc.pack_id}.pack"
    with open(pack, "r+b") as f:
        f.seek(loc.offset + loc.length - 2)
        byte = f.read(1)
        f.seek(loc.offset + loc.length - 2)
        f.write(bytes([byte[0] ^ 0x40]))


def store_again(point: Point, index: int) -> None:
    """Store chunk ``index`` again (a new, intact copy), as a later backup would."""
    with Repository.open(point.repo, password=TEST_PASSWORD) as repo:
        repo.store_chunks([point.chunk(index)])


class HostProcess(hostproc.HostProcess):
    """A host (tests/hostproc.py) that is asked to restore points instantly."""

    def restore(self, point: Point | tuple[str, str], name: str = "r0", **fill: Any) -> Any:
        """POST /disks/restore of a `Point`, or of (repository location, point id)."""
        location, point_id = (str(point.repo), point.id) if isinstance(point, Point) else point
        body: dict[str, Any] = {"name": name, "repository": location, "point": point_id}
        if fill:
            body["fill"] = fill
        return self.call("POST", "/disks/restore", json=body)

    def restore_status(self, name: str = "r0") -> Any:
        return self.call("GET", f"/disks/{name}")["restore"]

    def wait_restore(self, until: Callable[[Any], bool], name: str = "r0",
                     timeout_s: float = 120) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.restore_status(name)
            if until(status):
                return status
            assert time.monotonic() < deadline, f"gave up waiting; last status {status}"
            time.sleep(0.05)

    def wait_local(self, name: str = "r0", timeout_s: float = 120) -> Any:
        return self.wait_restore(lambda s: s["state"] == "local", name, timeout_s)


def qemu_img_compare(image: Path, uri: str, *, offset: int = 0,
                     size: int | None = None) -> subprocess.CompletedProcess[str]:
    """`qemu-img compare` of a raw file with an NBD export, whole or the range
    ``[offset, offset + size)`` of both."""
    if size is None:
        return subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), uri],
                              capture_output=True, text=True, timeout=300)
    socket_path = uri.split("socket=", 1)[1]
    export = uri.split("///", 1)[1].split("?", 1)[0]
    window = f"driver=raw,offset={offset},size={size}"
    return subprocess.run(
        ["qemu-img", "compare", "--image-opts",
         f"{window},file.driver=file,file.filename={image}",
         f"{window},file.driver=nbd,file.server.type=unix,file.server.path={socket_path},"
         f"file.export={export}"], capture_output=True, text=True, timeout=300)


def qemu_io_once(uri: str, *commands: str) -> str:
    """qemu-io run once with ``commands`` on an NBD export; -> its output (stdout and
    stderr)."""
    args = ["qemu-io", "-f", "raw"]
    for command in commands:
        args += ["-c", command]
    done = subprocess.run([*args, uri], capture_output=True, text=True, timeout=120)
    return done.stdout + done.stderr


class QemuIo:
    """One interactive qemu-io on an NBD export: a command at a time, each waited for (its
    statistics line, or its error line: qemu-io reads one line per wake-up of its main loop,
    so a command is sent only once the one before has answered). Only commands that print
    statistics (read, write; `write -f` for a durable write, no `flush`); any failure (an
    error line, "Pattern verification failed") is kept in ``errors``."""

    def __init__(self, uri: str) -> None:
        self._proc = subprocess.Popen(["qemu-io", "-f", "raw", uri], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, bufsize=1)
        self.errors: list[str] = []

    def run(self, command: str) -> list[str]:
        """Run ``command``; -> its output lines (up to its statistics, or its error)."""
        assert command.split()[0] in ("read", "write"), command
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(command + "\n")
        self._proc.stdin.flush()
        lines = []
        while True:
            line = self._proc.stdout.readline()
            if not line:
                self.errors.append(f"qemu-io exited during {command!r}")
                return lines
            lines.append(line.rstrip("\n"))
            if "failed" in line.lower() or "error" in line.lower():
                self.errors.append(f"{command!r}: {line.strip()}")
                return lines
            if " ops; " in line:
                return lines

    def close(self) -> None:
        assert self._proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self._proc.stdin.write("quit\n")
            self._proc.stdin.close()
        self._proc.wait(30)


class GuestLoad(threading.Thread):
    """Guest-style I/O through qemu-io while a fill runs: random 4-128 KiB reads anywhere,
    writes of fresh patterns (applied to ``expected`` too), and reads of written areas checked
    against their pattern (`read -P`). `hold` stops it between two commands (so that the
    expected image is the export's content), `go_on` lets it go on."""

    def __init__(self, uri: str, expected: bytearray, seed: int) -> None:
        super().__init__(daemon=True)
        self.io = QemuIo(uri)
        self.expected = expected
        self._rng = random.Random(seed)
        self._halt = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._idle = threading.Event()
        self.commands = 0
        self._written: list[tuple[int, int, int]] = []  # (offset, length, pattern)

    def run(self) -> None:
        rng, size = self._rng, len(self.expected)
        while not self._halt.is_set() and not self.io.errors:
            if not self._running.is_set():
                self._idle.set()
                self._running.wait(0.1)
                continue
            self._idle.clear()
            length = rng.choice((4096, 16384, 65536, 131072))
            offset = rng.randrange(0, (size - length) // 4096) * 4096
            roll = rng.random()
            if roll < 0.5:
                self.io.run(f"read {offset} {length}")
            elif roll < 0.8 or not self._written:
                pattern = rng.randrange(1, 256)
                self.io.run(f"write -P 0x{pattern:02x} {offset} {length}")
                self.expected[offset : offset + length] = bytes([pattern]) * length
                self._written.append((offset, length, pattern))
            else:
                at, n, pattern = rng.choice(self._written)
                if self.expected[at : at + n] == bytes([pattern]) * n:  # not overwritten
                    self.io.run(f"read -P 0x{pattern:02x} {at} {n}")
            self.commands += 1
            time.sleep(0.005)
        self._idle.set()

    def hold(self) -> None:
        self._running.clear()
        self._idle.wait(30)
        assert self._idle.is_set()

    def go_on(self) -> None:
        self._running.set()

    def stop(self) -> None:
        self._halt.set()
        self._running.set()
        self.join(60)
        self.io.close()
