"""Shared by the repository damage tests: a small repository of three restore points of a
tracked disk, the file and offset of each stored object, byte flips, and full file systems."""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from blocktrail.backup.engine import BackupOptions, BackupReport, run_backup
from blocktrail.backup.sources.local import LocalDiskSource
from blocktrail.disk import Disk
from blocktrail.fileio import FileHandle, OsFileIO
from blocktrail.repo import Repository
from blocktrail.repo import index as index_file
from blocktrail.repo.packs import Location
from s3server import RepoTarget

CS = 64 * 1024
DISK_BYTES = 32 * CS


@dataclass
class Golden:
    """A disk and a repository with three restore points P1 (full), P2, P3 (incrementals)."""

    root: Path
    ids: list[str]  # P1, P2, P3
    contents: dict[str, bytes]  # point id -> the disk's bytes it must restore to
    target: RepoTarget | None = None  # where the repository is (None: root / "repo")

    @property
    def repo(self) -> RepoTarget:
        return self.target or RepoTarget("local", str(self.root / "repo"))

    def copy_repo(self, dest: Path) -> Path:
        """A copy of the repository (not of the disk: a copied disk is a changed disk, whose
        tracker refuses every older change ID)."""
        shutil.copytree(self.root / "repo", dest / "repo")
        return dest


def backup(root: Path, *, full: bool = False, audit_percent: float = 1.0,
           audit_minimum: int = 16, target: RepoTarget | None = None) -> BackupReport:
    where = target or RepoTarget("local", str(root / "repo"))
    with Disk.open(root / "disk") as disk, where.open() as repo:
        return run_backup(LocalDiskSource(disk), repo, BackupOptions(
            force_full=full, audit_percent=audit_percent, audit_minimum=audit_minimum, seed=1))


def write_chunks(root: Path, chunks: dict[int, bytes]) -> None:
    with Disk.open(root / "disk") as disk:
        for index, data in chunks.items():
            disk.pwrite(data, index * CS)


def disk_bytes(root: Path) -> bytes:
    with Disk.open(root / "disk") as disk:
        return disk.pread(disk.size_bytes, 0)


def make_golden(root: Path, seed: int = 7, target: RepoTarget | None = None) -> Golden:
    """P1: chunks 0-15 of random data; P2 changes chunks 3 and 20; P3 changes chunk 7. The
    repository at ``target`` (default: root / "repo")."""
    rng = random.Random(seed)
    Disk.create(root / "disk", DISK_BYTES).close()
    (target or RepoTarget("local", str(root / "repo"))).init().close()
    ids: list[str] = []
    contents: dict[str, bytes] = {}
    for changes in ({i: rng.randbytes(CS) for i in range(16)},
                    {3: rng.randbytes(CS), 20: rng.randbytes(CS)},
                    {7: rng.randbytes(CS)}):
        write_chunks(root, changes)
        report = backup(root, audit_percent=0, audit_minimum=0, target=target)
        ids.append(report.point.id)
        contents[report.point.id] = disk_bytes(root)
    return Golden(root, ids, contents, target)


def restored(repo: Repository, point_id: str, tmp: Path) -> bytes:
    target = tmp / f"restore-{point_id}.raw"
    repo.restore(point_id, str(target))
    data = target.read_bytes()
    target.unlink()
    return data


def object_file(repo_root: Path, loc: Location) -> Path:
    return repo_root / "packs" / loc.pack_id[:2] / f"{loc.pack_id}.pack"


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    """Change one byte of a file in place, as bit rot (or a careless tool) would."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ mask]))


def index_file_naming(repo_root: Path, name: bytes) -> Path:
    for path in sorted((repo_root / "index").iterdir()):
        if name in index_file.decode(path.read_bytes(), path.name):
            return path
    raise LookupError(f"no index file names {name.hex()}")


def repo_files(repo_root: Path) -> set[str]:
    return {str(p.relative_to(repo_root)) for p in repo_root.rglob("*") if p.is_file()}


class NoSpaceAt(OsFileIO):
    """A repository whose file system fills up at the ``fail_at``-th write, fsync, rename,
    directory fsync or mkdir: that operation fails with ENOSPC (a write first writes half of its
    data, as a real short write would)."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at, self.ops = fail_at, 0

    def tick(self, what: str) -> None:
        self.ops += 1
        if self.ops == self.fail_at:
            raise OSError(errno.ENOSPC, f"No space left on device (injected: {what})")

    def create_empty(self, path: str) -> FileHandle:
        return _NoSpaceHandle(super().create_empty(path), self)

    def rename(self, src: str, dst: str) -> None:
        self.tick("rename")
        super().rename(src, dst)

    def fsync_dir(self, path: str) -> None:
        self.tick("fsync_dir")
        super().fsync_dir(path)

    def makedirs(self, path: str) -> None:
        self.tick("makedirs")
        super().makedirs(path)


class _NoSpaceHandle:
    def __init__(self, inner: FileHandle, fs: NoSpaceAt) -> None:
        self._inner, self._fs = inner, fs

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        if self._fs.ops + 1 == self._fs.fail_at:
            self._inner.pwrite(data[: len(data) // 2], offset)
        self._fs.tick("write")
        self._inner.pwrite(data, offset)

    def pwrite_direct(self, data: memoryview, offset: int) -> None:
        self.pwrite(data, offset)  # the same failure, wherever the bytes go past the cache

    def fsync(self) -> None:
        self._fs.tick("fsync")
        self._inner.fsync()

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


def mount_tmpfs(path: Path, size: str) -> str | None:
    """Mount a small tmpfs at ``path``; -> None, or why it cannot be done here."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return f"mount -t tmpfs is not permitted here: {done.stderr.strip()}"
    return None


def unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def fill(path: Path) -> Path:
    """Write a file into ``path`` until its file system is full; -> the file."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 20, 64 << 10, 4096, 512, 1):
            block = os.urandom(size)
            try:
                while True:
                    os.write(fd, block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    return filler
