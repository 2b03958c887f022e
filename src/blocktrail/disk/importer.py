"""Bring an existing raw image under tracking."""

from __future__ import annotations

import os
from collections.abc import Callable

from blocktrail.disk.disk import Disk
from blocktrail.errors import InvalidArgument
from blocktrail.fileio import OsFileHandle

IMPORT_CHUNK = 1 << 20


def import_raw(source: str | os.PathLike[str], path: str | os.PathLike[str],
               granularity: int = 64 * 1024, *, cluster_size: int = 64 * 1024,
               progress: Callable[[int, int], None] | None = None) -> Disk:
    """Create a disk at ``path`` holding the raw image ``source``.

    Every byte goes through the disk's write path, so the imported data counts as changed since
    the epoch's first change ID; holes and all-zero chunks are skipped (they stay holes)."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidArgument(f"cannot read {os.fspath(source)}: {exc.strerror}") from exc
    handle = OsFileHandle(fd)
    try:
        size = handle.size()
        disk = Disk.create(path, size, granularity, cluster_size=cluster_size)
        copied = 0
        for extent in handle.data_extents():
            pos = extent.offset
            while pos < extent.end:
                n = min(IMPORT_CHUNK, extent.end - pos)
                data = handle.pread(n, pos)
                if data.count(0) != n:
                    disk.pwrite(data, pos)
                pos += n
                copied += n
                if progress is not None:
                    progress(copied, size)
        disk.flush()
        return disk
    finally:
        handle.close()
