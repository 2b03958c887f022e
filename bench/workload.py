"""Shared benchmark workloads: a disk image like the compass figures, and scattered changes."""

from __future__ import annotations

import contextlib
import os

import numpy as np

BLOCK = 64 * 1024
_WORDS = (b"the quick brown fox jumps over lazy dogs while backup tools read every block of "
          b"a virtual disk and store only what changed since the last restore point ").split()


def _text_block(rng: np.random.Generator) -> bytes:
    words = rng.choice(len(_WORDS), size=BLOCK // 4)
    out = b" ".join(_WORDS[i] for i in words)
    return (out * 2)[:BLOCK]


def write_image(path: str, size_bytes: int, seed: int = 7) -> dict[str, int]:
    """A raw image of 64 KiB blocks: 50% random, ~27% zeros (holes), ~23% text."""
    rng = np.random.default_rng(seed)
    counts = {"random": 0, "zero": 0, "text": 0}
    kinds = rng.choice(3, size=size_bytes // BLOCK, p=[0.50, 0.27, 0.23])
    text_pool = [_text_block(rng) for _ in range(64)]
    with open(path, "wb") as f:
        f.truncate(size_bytes)
        for index, kind in enumerate(kinds.tolist()):
            if kind == 1:
                counts["zero"] += 1
                continue
            f.seek(index * BLOCK)
            if kind == 0:
                f.write(rng.bytes(BLOCK))
                counts["random"] += 1
            else:
                f.write(text_pool[int(rng.integers(len(text_pool)))])
                counts["text"] += 1
    return counts


def scattered_changes(size_bytes: int, fraction: float, seed: int) -> list[tuple[int, bytes]]:
    """``fraction`` of the disk's 64 KiB blocks, scattered, with new random data."""
    rng = np.random.default_rng(seed)
    blocks = size_bytes // BLOCK
    picked = rng.choice(blocks, size=max(1, int(blocks * fraction)), replace=False)
    return [(int(b) * BLOCK, rng.bytes(BLOCK)) for b in sorted(picked.tolist())]


def apply_to_file(path: str, changes: list[tuple[int, bytes]]) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset, data in changes:
            os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def du_bytes(path: str) -> int:
    """Bytes a directory tree occupies on disk (allocated blocks, like du)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total
