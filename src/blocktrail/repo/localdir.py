"""The local-directory backend: one file per object under the repository directory.

Every write goes through the `FileIO` layer (blocktrail.fileio): ``name.tmp``, fsync, rename,
fsync the directory. Create-only and conditional writes are made atomic among the processes of
this machine by a short exclusive flock on ``locks/objects.lock``, held for the check and the
write together; so no ``*.tmp`` file is ever being written while a process holds it, and
`delete_leftovers` (under it) can delete every one it finds. A version (etag) of a file is its
size, modification time, change time and inode: a rewrite makes a new inode.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import threading
import time
from collections.abc import Iterator

from blocktrail.fileio import (
    DIRECT_MIN_BYTES,
    FileHandle,
    FileIO,
    FileLock,
    OsFileIO,
    pread_direct,
)
from blocktrail.repo.backend import (
    BackendReadOnly,
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    PreconditionFailed,
    check_name,
)
from blocktrail.repo.layout import VERIFY

LOCK_NAME = "locks/objects.lock"
HOST_LOCK_NAME = "locks/repo.lock"  # the repository lock of blocktrail before leases
_HANDLES = 64  # open pack files kept for reads
_READ_ONLY = frozenset((errno.EROFS, errno.EACCES, errno.EPERM))  # what a refused write says


class _Cached:
    """An open pack file in the cache, and how many reads use it now."""

    __slots__ = ("handle", "readers", "retired")

    def __init__(self, handle: FileHandle) -> None:
        self.handle = handle
        self.readers = 0
        self.retired = False  # out of the cache: the last reader closes it


class LocalBackend:
    remote = False
    host_locks = True

    def __init__(self, root: str, fileio: FileIO | None = None) -> None:
        self.root = root
        self.url = root
        self.fio = fileio or OsFileIO()
        self._handles: dict[str, _Cached] = {}
        self._handles_lock = threading.Lock()
        self._root_seen = self.fio.isdir(root)
        self._durable_dirs: set[str] = set()  # made or synced in their parent by this process

    def path(self, name: str) -> str:
        return os.path.join(self.root, *check_name(name).split("/"))

    def file_in_the_way(self) -> str | None:
        """The file that stands where the repository's directory, or a directory above it,
        must be (a mistyped path: a VM image, say), else None."""
        at = os.path.abspath(self.root)
        while True:
            if self.fio.isdir(at):
                return None
            try:
                self.fio.seal(at)
            except OSError:  # nothing there (or a file above it): look above
                pass
            else:
                return at
            parent = os.path.dirname(at)
            if parent == at:
                return None
            at = parent

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A write the file system refuses (read-only, or not this user's to write) becomes
        `BackendReadOnly`: every command that only reads still works on such a repository."""
        try:
            yield
        except OSError as exc:
            if exc.errno not in _READ_ONLY:
                raise
            where = f": {os.fsdecode(exc.filename)}" if exc.filename is not None else ""
            raise BackendReadOnly(
                f"the repository {self.root} cannot be written ({exc.strerror or exc}{where});"
                " reading it works (points, check, restore, serve, verify)") from exc

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """The objects lock: one create, replace or leftover sweep at a time on this machine."""
        with self._writing():
            taken = self._lock(LOCK_NAME, exclusive=True, wait=True)
        assert taken is not None  # waited for
        try:
            with self._writing():
                yield
        finally:
            taken.release()

    def _lock(self, name: str, *, exclusive: bool, wait: bool) -> FileLock | None:
        path = os.path.join(self.root, name)
        self._make_parent(path, durable=False)  # a lock needs no file that outlives a crash
        return self.fio.lock(path, exclusive=exclusive, wait=wait)

    def _make_parent(self, path: str, *, durable: bool = True) -> None:
        """Make the directory ``path`` goes in, durably, but never the repository's own once
        it was there: a repository moved away or unmounted is not made again, empty, where it
        was (FileNotFoundError). One found there already is synced in its parent, once per
        process: a process killed between its mkdir and that fsync left it unsynced, and a
        file written into it would be lost with it at a power loss. ``durable``: False for a
        lock file's directory (nothing in it must outlive a crash), which is not synced."""
        parent = os.path.dirname(path)
        if self.fio.isdir(parent):
            if durable and parent not in self._durable_dirs:
                if os.path.normpath(parent) != os.path.normpath(self.root):  # init synced it
                    self.fio.fsync_dir(os.path.dirname(parent))
                self._durable_dirs.add(parent)
            return
        if self._root_seen and not self.fio.isdir(self.root):
            raise FileNotFoundError(errno.ENOENT, "the repository directory is gone (moved "
                                    "away or unmounted?)", self.root)
        self.fio.makedirs(parent)
        self._root_seen = True
        self._durable_dirs.add(parent)

    def _info(self, name: str, path: str) -> ObjectInfo:
        try:
            size, mtime_ns, ctime_ns, inode = self.fio.seal(path)
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.url}: no object {name}") from None
        return ObjectInfo(name, size, mtime_ns / 1e9, f"{size:x}-{mtime_ns:x}-{ctime_ns:x}-"
                          f"{inode:x}", time.time())

    def _write(self, name: str, path: str, data: bytes | bytearray | memoryview) -> ObjectInfo:
        self._make_parent(path)
        self.fio.replace_atomic(path, data)
        self._forget_handle(name)
        return self._info(name, path)

    def create(self, name: str, data: bytes | bytearray | memoryview) -> ObjectInfo:
        path = self.path(name)
        with self._exclusive():
            if self.fio.exists(path):
                raise ObjectExists(f"{self.url}: object {name} exists already")
            return self._write(name, path, data)

    def replace(self, name: str, data: bytes, etag: str) -> ObjectInfo:
        path = self.path(name)
        with self._exclusive():
            try:
                current = self._info(name, path)
            except ObjectNotFound:
                raise PreconditionFailed(f"{self.url}: object {name} is gone") from None
            if current.etag != etag:
                raise PreconditionFailed(f"{self.url}: object {name} was changed by another "
                                         "process")
            return self._write(name, path, data)

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self.path(name)
        if not name.startswith("packs/"):
            try:
                data = self.fio.read_file(path)
            except FileNotFoundError:
                raise ObjectNotFound(f"{self.url}: no object {name}") from None
            return data[offset:] if length is None else data[offset : offset + length]
        cached = self._handle(name, path)
        try:
            size = cached.handle.size()
            if offset >= size:
                return b""  # past the end (as a ranged read of object storage answers)
            if length is None:
                length = size - offset
            count = max(0, min(length, size - offset))
            if count < DIRECT_MIN_BYTES:
                return cached.handle.pread(count, offset)
            # A big range (a restore's run of chunks, a whole pack checked) is read once: past
            # the page cache, which would cost more CPU than the rest of restoring it. Copied
            # out of the view it comes in: every reader of an object takes bytes.
            once = pread_direct(cached.handle, count, offset)
            return once if isinstance(once, bytes) else once.tobytes()
        finally:
            self._release(cached)

    def _handle(self, name: str, path: str) -> _Cached:
        """The open pack file, for one reader (who calls `_release`). A handle pushed out of
        the cache meanwhile is closed by its last reader: closed under a reader, its number
        could be reused by the next file opened, and the read would return another pack's
        bytes (which then fail their check and go to quarantine, intact)."""
        with self._handles_lock:  # reads run on several threads
            cached = self._handles.get(name)
            if cached is None:
                try:
                    cached = _Cached(self.fio.open_read(path))
                except FileNotFoundError:
                    raise ObjectNotFound(f"{self.url}: no object {name}") from None
                if len(self._handles) >= _HANDLES:
                    self._retire(self._handles.pop(next(iter(self._handles))))
                self._handles[name] = cached
            cached.readers += 1
            return cached

    def _release(self, cached: _Cached) -> None:
        with self._handles_lock:
            cached.readers -= 1
            close = cached.retired and cached.readers == 0
        if close:
            cached.handle.close()

    @staticmethod
    def _retire(cached: _Cached) -> None:
        """Out of the cache (under the lock): closed now, or by its last reader."""
        cached.retired = True
        if cached.readers == 0:
            cached.handle.close()

    def _forget_handle(self, name: str) -> None:
        with self._handles_lock:
            cached = self._handles.pop(name, None)
            if cached is not None:
                self._retire(cached)

    def info(self, name: str) -> ObjectInfo:
        return self._info(name, self.path(name))

    def list(self, prefix: str) -> list[ObjectInfo]:
        directory = prefix.rpartition("/")[0]
        top = os.path.join(self.root, *directory.split("/")) if directory else self.root
        found: builtins.list[ObjectInfo] = []
        for rel in self._walk(top, directory):
            if rel.startswith(prefix) and not rel.endswith(".tmp") \
                    and rel not in (LOCK_NAME, HOST_LOCK_NAME):
                with contextlib.suppress(ObjectNotFound):  # deleted since the listing
                    found.append(self._info(rel, os.path.join(self.root, rel)))
        return sorted(found, key=lambda i: i.name)

    def _walk(self, top: str, rel_top: str) -> Iterator[str]:
        try:
            names = self.fio.listdir(top)
        except FileNotFoundError:
            return
        for entry in names:
            path = os.path.join(top, entry)
            rel = f"{rel_top}/{entry}" if rel_top else entry
            if self.fio.isdir(path):
                yield from self._walk(path, rel)
            else:
                yield rel

    def delete(self, name: str, etag: str | None = None) -> None:
        path = self.path(name)
        self._forget_handle(name)
        if etag is None:
            try:
                with self._writing():
                    self.fio.unlink(path)
            except FileNotFoundError:
                return
        else:
            with self._exclusive():
                try:
                    if self._info(name, path).etag != etag:
                        raise PreconditionFailed(f"{self.url}: object {name} was changed by "
                                                 "another process")
                except ObjectNotFound:
                    return
                self.fio.unlink(path)
        self.fio.fsync_dir(os.path.dirname(path))
        if name.startswith(VERIFY):  # a point's own directory goes with its last record
            with contextlib.suppress(OSError):  # (else forgotten points leave one each)
                self.fio.rmdir(os.path.dirname(path))

    def now(self) -> float:
        return time.time()

    def host_lock(self, *, exclusive: bool, wait: bool) -> FileLock | None:
        """The machine-wide repository lock (flock on ``locks/repo.lock``): shared by every
        writer, exclusive for a prune or repair that runs with no writer at all. None when
        ``wait`` is false and it is held the other way."""
        with self._writing():  # taken to write: a repository that refuses writes says so now
            return self._lock(HOST_LOCK_NAME, exclusive=exclusive, wait=wait)

    def leftovers(self) -> builtins.list[str]:
        return sorted(rel for rel in self._walk(self.root, "") if rel.endswith(".tmp"))

    def delete_leftovers(self) -> int:
        deleted = 0
        with self._exclusive():  # no write is under way while it is held
            for rel in self.leftovers():
                with contextlib.suppress(FileNotFoundError):
                    self.fio.unlink(os.path.join(self.root, rel))
                    deleted += 1
        return deleted

    def close(self) -> None:
        with self._handles_lock:
            for cached in self._handles.values():
                self._retire(cached)
            self._handles.clear()
