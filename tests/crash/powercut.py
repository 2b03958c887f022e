"""A simulated machine that loses power at a chosen durability operation (fsync, directory
fsync): the sweeps of the repository, of disk imports and of the host's data directory run on
it, each also with the unsynced file data torn (`SimulatedFileIO.torn`)."""

from __future__ import annotations

import random
from typing import Any

from blocktrail.fileio import FileHandle, FileLock
from blocktrail.simfileio import SimulatedFileIO


class PowerLoss(Exception):
    """The machine lost power."""


class PowerCutFileIO(SimulatedFileIO):
    """Loses power just before its ``cut_at``-th durability operation: what was not durable
    is gone at once (``torn``, a seed: of the file data written since the last sync, each
    sector and each file's size survives or not at random), and nothing more reaches the disk
    (every later change raises)."""

    def __init__(self, cut_at: int, torn: int | None = None) -> None:
        super().__init__()
        self.cut_at, self.count, self.dead = cut_at, 0, False
        if torn is not None:
            self.torn = random.Random(torn)

    def count_op(self, name: str) -> None:
        with self.mutex:
            self._alive()
            self.count += 1
            if self.count == self.cut_at:
                self.dead = True
                self.power_loss()
                self._lock_freed.notify_all()  # no thread waits for a lock forever
                raise PowerLoss(f"power lost before durability operation {self.count}")
        super().count_op(name)

    def _alive(self) -> None:
        if self.dead:
            raise PowerLoss("the power is off")

    def tick(self, inode: Any) -> None:  # every write, hole punch and truncate
        self._alive()
        super().tick(inode)

    def open(self, path: str, *, create: bool = False) -> FileHandle:
        self._alive()
        return super().open(path, create=create)

    def create_unnamed(self, directory: str) -> FileHandle | None:
        self._alive()
        return super().create_unnamed(directory)

    def link_unnamed(self, handle: FileHandle, path: str) -> None:
        self._alive()
        super().link_unnamed(handle, path)

    def rename(self, src: str, dst: str) -> None:
        self._alive()
        super().rename(src, dst)

    def unlink(self, path: str) -> None:
        self._alive()
        super().unlink(path)

    def rmdir(self, path: str) -> None:
        self._alive()
        super().rmdir(path)

    def mkdir(self, path: str) -> None:
        self._alive()
        super().mkdir(path)

    def lock(self, path: str, *, exclusive: bool, wait: bool) -> FileLock | None:
        self._alive()
        return super().lock(path, exclusive=exclusive, wait=wait)

    def restart(self) -> None:
        """The machine is back: the disk holds what was durable."""
        self.dead = False
        self.cut_at = 0
