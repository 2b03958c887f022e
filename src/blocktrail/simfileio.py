"""An in-memory file system for tests that can lose power.

`SimulatedFileIO` implements `blocktrail.fileio.FileIO`. `power_loss()` drops every write,
create, mkdir, rename and unlink that was not made durable (file data by `fsync`, directory
entries, a new directory's too, by `fsync_dir` of the directory holding them; a directory's
rename by `fsync_dir` of either parent), as a machine that loses power would; with `torn` set,
the file data written since a sync survives sector by sector at random instead.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from blocktrail.extents import Extent, clip, merge
from blocktrail.fileio import FileHandle, FileLock, Seal, exclusive_or_busy

if TYPE_CHECKING:
    import random


_PAGE = 4096
_SECTOR = 512  # a torn power loss keeps or loses whole sectors


@dataclass
class _Inode:
    number: int
    pages: dict[int, bytes] = field(default_factory=dict)
    size: int = 0
    durable_pages: dict[int, bytes] = field(default_factory=dict)
    durable_size: int = 0
    mtime: int = 0
    ctime: int = 0

    def sync(self) -> None:
        self.durable_pages = dict(self.pages)
        self.durable_size = self.size

    def lose_unsynced(self, torn: random.Random | None = None) -> None:
        """Back to what was synced; ``torn``: each sector written since (512 bytes: what a disk
        writes whole or not at all), and the size, are the new ones or the old ones at random,
        as the disk took them before the power went."""
        pages, size = dict(self.durable_pages), self.durable_size
        if torn is not None:
            for page in self.pages.keys() | self.durable_pages.keys():
                new, old = self.pages.get(page), self.durable_pages.get(page)
                if new == old:
                    continue
                new_bytes, old_bytes = new or bytes(_PAGE), old or bytes(_PAGE)
                pages[page] = b"".join(
                    (new_bytes if torn.random() < 0.5 else old_bytes)[at : at + _SECTOR]
                    for at in range(0, _PAGE, _SECTOR))
            size = torn.choice((size, self.size))
            last, keep = divmod(size, _PAGE)
            for page in [p for p in pages if p > last or (p == last and not keep)]:
                del pages[page]  # past the end: never read back (a file grown later reads 0)
            if keep and last in pages:
                pages[last] = pages[last][:keep] + bytes(_PAGE - keep)
        self.pages, self.size = pages, size  # what the disk holds now: durable, torn or not
        self.durable_pages, self.durable_size = dict(pages), size


class SimulatedFileHandle:
    def __init__(self, fs: SimulatedFileIO, inode: _Inode) -> None:
        self._fs = fs
        self._inode = inode

    @property
    def inode(self) -> _Inode:
        return self._inode

    def pread(self, count: int, offset: int) -> bytes:
        with self._fs.mutex:
            ino, out = self._inode, bytearray(count)
            end = min(offset + count, ino.size)
            pos = offset
            while pos < end:
                page, within = divmod(pos, _PAGE)
                n = min(_PAGE - within, end - pos)
                data = ino.pages.get(page)
                if data is not None:
                    out[pos - offset : pos - offset + n] = data[within : within + n]
                pos += n
            return bytes(out)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        with self._fs.mutex:
            ino = self._inode
            self._fs.tick(ino)
            pos, src = offset, memoryview(data)
            while src:
                page, within = divmod(pos, _PAGE)
                n = min(_PAGE - within, len(src))
                old = ino.pages.get(page, bytes(_PAGE))
                ino.pages[page] = old[:within] + bytes(src[:n]) + old[within + n :]
                pos, src = pos + n, src[n:]
            ino.size = max(ino.size, offset + len(data))

    def pwrite_direct(self, data: memoryview, offset: int) -> None:
        self.pwrite(data, offset)  # as O_DIRECT: durable only after fsync (a device's cache)

    def punch_hole(self, offset: int, length: int) -> None:
        with self._fs.mutex:
            ino = self._inode
            self._fs.tick(ino)
            end = min(offset + length, ino.size)
            pos = offset
            while pos < end:
                page, within = divmod(pos, _PAGE)
                n = min(_PAGE - within, end - pos)
                if n == _PAGE:
                    ino.pages.pop(page, None)
                elif page in ino.pages:
                    old = ino.pages[page]
                    ino.pages[page] = old[:within] + bytes(n) + old[within + n :]
                pos += n

    def truncate(self, size: int) -> None:
        with self._fs.mutex:
            ino = self._inode
            self._fs.tick(ino)
            if size < ino.size:
                last = size // _PAGE
                for page in [p for p in ino.pages if p > last or (p == last and size % _PAGE == 0)]:
                    del ino.pages[page]
                if size % _PAGE and last in ino.pages:
                    keep = size % _PAGE
                    ino.pages[last] = ino.pages[last][:keep] + bytes(_PAGE - keep)
            ino.size = size

    def size(self) -> int:
        with self._fs.mutex:
            return self._inode.size

    def fsync(self) -> None:
        with self._fs.mutex:
            self._fs.count_op("fsync")
            self._inode.sync()

    def data_extents(self, start: int = 0, end: int | None = None) -> list[Extent]:
        with self._fs.mutex:
            ino = self._inode
            end = ino.size if end is None else min(end, ino.size)
            pages = sorted(ino.pages)
            return clip(merge(Extent(p * _PAGE, min(_PAGE, ino.size - p * _PAGE))
                              for p in pages if p * _PAGE < ino.size), start, end)

    def dup(self) -> int | None:
        return None

    def close(self) -> None:
        pass


class _SimLock:
    def __init__(self, fs: SimulatedFileIO, path: str, exclusive: bool) -> None:
        self._fs, self._path, self._exclusive = fs, path, exclusive
        self._boot = fs.boots  # a lock of a process that lost the power is no lock any more
        self._held = True

    def release(self) -> None:
        with self._fs.mutex:
            if self._held and self._boot == self._fs.boots:
                self._fs.unlock(self._path, self._exclusive)
            self._held = False


class SimulatedFileIO:
    """An in-memory file system that can lose power. Paths are plain strings."""

    def __init__(self) -> None:
        self.mutex = threading.RLock()
        self.entries: dict[str, _Inode] = {}
        self.durable_entries: dict[str, _Inode] = {}
        self.dirs: set[str] = set()
        self.durable_dirs: set[str] = set()  # whose entry in their parent was fsynced
        # directories renamed since their parents were fsynced: (old, new), oldest first
        self.dir_renames: list[tuple[str, str]] = []
        self.locks: dict[str, int] = {}  # path -> holders: -1 exclusive, else how many share
        self.boots = 0  # power losses so far
        self._lock_freed = threading.Condition(self.mutex)
        self.op_counts: dict[str, int] = {}
        # None: a power loss drops every write not synced; else each of their sectors, and each
        # file's size, survives or not at random (as a disk that took some of them)
        self.torn: random.Random | None = None
        self._next_inode = 1
        self._clock = 1

    def tick(self, inode: _Inode) -> None:
        """A change of ``inode``: its times move on (nanoseconds of the real clock, each change
        later than the one before)."""
        self._clock = max(self._clock + 1, time.time_ns())
        inode.mtime = inode.ctime = self._clock

    def count_op(self, name: str) -> None:
        self.op_counts[name] = self.op_counts.get(name, 0) + 1

    def _inode(self, path: str) -> _Inode:
        try:
            return self.entries[path]
        except KeyError:
            raise FileNotFoundError(errno.ENOENT, "no such file", path) from None

    def _new_inode(self) -> _Inode:
        self._next_inode += 1
        return _Inode(self._next_inode)

    def open(self, path: str, *, create: bool = False) -> FileHandle:
        with self.mutex:
            if path not in self.entries:
                if not create:
                    raise FileNotFoundError(errno.ENOENT, "no such file", path)
                self._check_dir(path)
                self.entries[path] = self._new_inode()
            return SimulatedFileHandle(self, self.entries[path])

    def open_read(self, path: str) -> FileHandle:
        return self.open(path)

    def create_unnamed(self, directory: str) -> FileHandle | None:
        with self.mutex:
            self._check_dir(os.path.join(directory, "x"))
            return SimulatedFileHandle(self, self._new_inode())

    def take_access(self, handle: FileHandle, path: str) -> None:
        """Files here have no permissions or owners."""

    def link_unnamed(self, handle: FileHandle, path: str) -> None:
        assert isinstance(handle, SimulatedFileHandle)
        with self.mutex:
            self._check_dir(path)
            if path in self.entries:
                raise FileExistsError(errno.EEXIST, "file exists", path)
            self.entries[path] = handle.inode

    def _check_dir(self, path: str) -> None:
        if not self.isdir(os.path.dirname(path)):
            raise FileNotFoundError(errno.ENOENT, "no such directory", os.path.dirname(path))

    def exists(self, path: str) -> bool:
        with self.mutex:
            return path in self.entries or path in self.dirs

    def read_file(self, path: str) -> bytes:
        with self.mutex:
            ino = self._inode(path)
            return SimulatedFileHandle(self, ino).pread(ino.size, 0)

    def replace_atomic(self, path: str, data: bytes | bytearray | memoryview) -> None:
        with self.mutex:
            self._check_dir(path)
            ino = self._new_inode()
            handle = SimulatedFileHandle(self, ino)
            handle.pwrite(bytes(data), 0)
            handle.fsync()
            self.entries[path] = ino
            self.fsync_dir(os.path.dirname(path))

    def rename(self, src: str, dst: str) -> None:
        with self.mutex:
            self._check_dir(dst)
            if src in self.dirs:
                self._rename_dir(src, dst)
                return
            self.entries[dst] = self._inode(src)
            del self.entries[src]

    def _rename_dir(self, src: str, dst: str) -> None:
        """A directory moves with all in it, onto nothing or an empty directory. With the
        power it moves back, all at once, until the parent of either name is fsynced (one
        journal commit): its entries synced meanwhile are kept under the old name."""
        if dst in self.entries:
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", dst)
        if dst == src or dst.startswith(src + "/"):
            raise OSError(errno.EINVAL, "cannot move a directory into itself", dst)
        if dst in self.dirs:
            if self.listdir(dst):
                raise OSError(errno.ENOTEMPTY, "directory not empty", dst)
            self.dirs.discard(dst)
        self.entries = {_moved(p, src, dst): ino for p, ino in self.entries.items()}
        self.dirs = {_moved(d, src, dst) for d in self.dirs}
        self.dir_renames.append((src, dst))

    def unlink(self, path: str) -> None:
        with self.mutex:
            self._inode(path)
            del self.entries[path]

    def rmdir(self, path: str) -> None:
        with self.mutex:
            if path not in self.dirs:
                raise FileNotFoundError(errno.ENOENT, "no such directory", path)
            if any(os.path.dirname(p) == path for p in self.entries) or any(
                    os.path.dirname(d) == path for d in self.dirs):
                raise OSError(errno.ENOTEMPTY, "directory not empty", path)
            self.dirs.discard(path)

    def listdir(self, path: str) -> list[str]:
        with self.mutex:
            path = path.rstrip("/") or "/"
            if not self.isdir(path):
                raise FileNotFoundError(errno.ENOENT, "no such directory", path)
            return sorted(os.path.basename(name) for name in (*self.entries, *self.dirs)
                          if os.path.dirname(name) == path)

    def isdir(self, path: str) -> bool:
        with self.mutex:
            return path in self.dirs or path in ("/", "")

    def mkdir(self, path: str) -> None:
        """The system call: the new entry is lost with the power until its parent is
        fsynced (`makedirs` does that)."""
        with self.mutex:
            self._check_dir(path)
            if path in self.dirs or path in self.entries:
                raise FileExistsError(errno.EEXIST, "file exists", path)
            self.dirs.add(path)

    def makedirs(self, path: str) -> None:
        with self.mutex:
            missing = []
            while path not in ("/", "", ".") and path not in self.dirs:
                missing.append(path)
                path = os.path.dirname(path)
            for directory in reversed(missing):
                self.mkdir(directory)
            for directory in missing:
                self.fsync_dir(os.path.dirname(directory) or "/")

    def fsync_dir(self, path: str) -> None:
        with self.mutex:
            self.count_op("fsync_dir")
            path = path.rstrip("/") or "/"
            if not self.isdir(path):
                raise FileNotFoundError(errno.ENOENT, "no such directory", path)
            self._commit_dir_renames(path)
            durable = self._durable_name(path)  # where the power leaves this directory
            for name in [p for p in self.durable_entries if os.path.dirname(p) == durable]:
                del self.durable_entries[name]
            for name, ino in self.entries.items():
                if os.path.dirname(name) == path:
                    self.durable_entries[os.path.join(durable, os.path.basename(name))] = ino
            self.durable_dirs = {d for d in self.durable_dirs if os.path.dirname(d) != durable}
            self.durable_dirs.update(os.path.join(durable, os.path.basename(d))
                                     for d in self.dirs if os.path.dirname(d) == path)

    def _commit_dir_renames(self, parent: str) -> None:
        """The directory renames into or out of ``parent`` become durable (and, in order,
        those before them)."""
        touching = [i for i, (src, dst) in enumerate(self.dir_renames)
                    if parent in (os.path.dirname(src), os.path.dirname(dst))]
        if not touching:
            return
        done, self.dir_renames = (self.dir_renames[: touching[-1] + 1],
                                  self.dir_renames[touching[-1] + 1 :])
        for src, dst in done:
            self.durable_entries = {_moved(p, src, dst): ino
                                    for p, ino in self.durable_entries.items()
                                    if p != dst and not p.startswith(dst + "/")}
            self.durable_dirs = {_moved(d, src, dst) for d in self.durable_dirs
                                 if d != dst and not d.startswith(dst + "/")}

    def _durable_name(self, path: str) -> str:
        """The name ``path`` has on the disk: before the renames not yet durable."""
        for src, dst in reversed(self.dir_renames):
            path = _moved(path, dst, src)
        return path

    def seal(self, path: str) -> Seal:
        with self.mutex:
            ino = self._inode(path)
            return (ino.size, ino.mtime, ino.ctime, ino.number)

    def lock_exclusive(self, path: str) -> FileLock:
        return exclusive_or_busy(self.lock(path, exclusive=True, wait=False), path)

    def lock(self, path: str, *, exclusive: bool, wait: bool) -> FileLock | None:
        with self.mutex:
            if path not in self.entries and not self.isdir(path):  # created, not made durable
                self._check_dir(path)
                self.entries[path] = self._new_inode()
            while (self.locks.get(path, 0) != 0 if exclusive
                   else self.locks.get(path, 0) < 0):
                if not wait:
                    return None
                self._lock_freed.wait()
            self.locks[path] = -1 if exclusive else self.locks.get(path, 0) + 1
            return _SimLock(self, path, exclusive)

    def unlock(self, path: str, exclusive: bool) -> None:
        with self.mutex:
            held = self.locks.get(path, 0)
            if held == -1 or held == 1:
                del self.locks[path]
            elif held > 1 and not exclusive:
                self.locks[path] = held - 1
            self._lock_freed.notify_all()

    def _on_disk(self) -> tuple[set[str], dict[str, _Inode]]:
        """What a power loss leaves: the directories whose entry, and whose parents' entries,
        were synced, and the synced entries in them."""
        kept: set[str] = set()
        for directory in sorted(self.durable_dirs, key=len):  # parents first
            if os.path.dirname(directory) in kept or os.path.dirname(directory) in ("/", ""):
                kept.add(directory)
        return kept, {path: ino for path, ino in self.durable_entries.items()
                      if os.path.dirname(path) in kept or os.path.dirname(path) in ("/", "")}

    def power_loss(self) -> None:
        """Forget everything that was not made durable (file data: as `torn` says): a
        directory whose entry was not fsynced is gone with all in it; release every lock (the
        process died)."""
        with self.mutex:
            kept, self.entries = self._on_disk()
            self.dirs, self.durable_dirs = kept, set(kept)
            self.dir_renames = []
            self.durable_entries = dict(self.entries)
            for ino in self.entries.values():
                ino.lose_unsynced(self.torn)
            self.locks.clear()
            self.boots += 1

    def copy_disk_from(self, other: SimulatedFileIO) -> None:
        """Hold what ``other`` holds durably (a copy of its disk), and nothing else."""
        with self.mutex, other.mutex:
            kept, entries = other._on_disk()
            copies = {id(ino): _Inode(ino.number, dict(ino.durable_pages), ino.durable_size,
                                      dict(ino.durable_pages), ino.durable_size, ino.mtime,
                                      ino.ctime) for ino in entries.values()}
            self.entries = {p: copies[id(ino)] for p, ino in entries.items()}
            self.durable_entries = dict(self.entries)
            self.dirs, self.durable_dirs = set(kept), set(kept)
            self._next_inode = max(self._next_inode, other._next_inode)
            self.locks.clear()

    def tamper(self, path: str, data: bytes, offset: int, *, keep_mtime: bool = False) -> None:
        """Write to a file as a program other than blocktrail would (tests); ``keep_mtime``:
        then put its modification time back, as `touch -d` does (the change time moves on)."""
        with self.mutex:
            ino = self._inode(path)
            mtime = ino.mtime
            SimulatedFileHandle(self, ino).pwrite(data, offset)
            if keep_mtime:
                ino.mtime = mtime


def _moved(path: str, src: str, dst: str) -> str:
    """``path`` once the directory ``src`` is renamed ``dst``."""
    if path == src:
        return dst
    return dst + path[len(src):] if path.startswith(src + "/") else path
