"""Shared by the instant-restore tests: a restore point of known content in a repository, and
where in the repository a chunk of it is stored (to damage it)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from blocktrail.backup.engine import BackupOptions, run_backup
from blocktrail.backup.sources.local import LocalDiskSource
from blocktrail.disk import Disk
from blocktrail.repo import Repository
from blocktrail.repo.objects import digest as chunk_digest

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
    Repository.init(repo_path).close()
    with Disk.create(root / "source-disk", len(content)) as disk:
        for offset in range(0, len(content), CS):
            piece = content[offset : offset + CS]
            if any(piece):
                disk.pwrite(piece, offset)
        with Repository.open(repo_path) as repo:
            report = run_backup(LocalDiskSource(disk), repo, BackupOptions())
    point = report.point
    assert point.change_id is not None
    return Point(repo_path, point.id, point.disk_id, point.change_id, content)


def damage_chunk(point: Point, index: int) -> None:
    """Change one byte of the stored copy of chunk ``index`` (every copy: it is stored once)."""
    with Repository.open(point.repo) as repo:
        loc = repo.index.get(chunk_digest(point.chunk(index)))
        assert loc is not None, f"chunk {index} is not stored"
        pack = point.repo / "packs" / loc.pack_id[:2] / f"{loc.pack_id}.pack"
    with open(pack, "r+b") as f:
        f.seek(loc.offset + loc.length - 2)
        byte = f.read(1)
        f.seek(loc.offset + loc.length - 2)
        f.write(bytes([byte[0] ^ 0x40]))


def store_again(point: Point, index: int) -> None:
    """Store chunk ``index`` again (a new, intact copy), as a later backup would."""
    with Repository.open(point.repo) as repo:
        repo.store_chunks([point.chunk(index)])
