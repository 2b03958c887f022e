"""The one small layer every disk, tracker and local repository file operation goes through.

`OsFileIO` is the real thing; `blocktrail.simfileio.SimulatedFileIO`, an in-memory file system
that can lose power, stands in for it in the tests.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import mmap
import os
import stat
import struct
import threading
from typing import Protocol

from blocktrail.extents import Extent

# (size, mtime_ns, ctime_ns, inode): what is remembered of a file that nothing may change. The
# change time is set by the kernel on every change (a write, `touch -d`, chmod) and cannot be
# set back by a program, so an edit whose size and mtime were put back still shows.
Seal = tuple[int, int, int, int]


class FileHandle(Protocol):
    def pread(self, count: int, offset: int) -> bytes: ...
    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None: ...
    def pwrite_direct(self, data: memoryview, offset: int) -> None:
        """`pwrite`, past the page cache where the handle can (the whole aligned blocks of
        page-aligned memory written at an aligned offset: O_DIRECT), the rest through it. The
        same bytes either way; durable only after `fsync`, as any write."""
        ...
    def punch_hole(self, offset: int, length: int) -> None: ...
    def truncate(self, size: int) -> None: ...
    def size(self) -> int: ...
    def fsync(self) -> None: ...
    def data_extents(self, start: int = 0, end: int | None = None) -> list[Extent]:
        """The extents that may hold data inside ``[start, end)`` (clipped to it)."""
        ...
    def dup(self) -> int | None:
        """A new OS descriptor of the same open file, for zero-copy readers (the caller
        closes it); None when the file has none."""
        ...
    def close(self) -> None: ...


class FileLock(Protocol):
    def release(self) -> None: ...


class FileIO(Protocol):
    def open(self, path: str, *, create: bool = False) -> FileHandle: ...
    def open_read(self, path: str) -> FileHandle:
        """An existing file, for reading only: opens on a read-only file system, and a file
        this user may read but not write."""
        ...
    def exists(self, path: str) -> bool: ...
    def read_file(self, path: str) -> bytes: ...
    def replace_atomic(self, path: str, data: bytes | bytearray | memoryview) -> None:
        """Write ``path`` whole or not at all: ``path.tmp``, fsync, rename, fsync the
        directory. On failure the temporary file is removed."""
        ...
    def create_unnamed(self, directory: str) -> FileHandle | None:
        """A new empty file in ``directory`` that has no name yet (Linux's O_TMPFILE): if the
        process dies before `link_unnamed` names it, nothing is left. None where the file
        system cannot make one (the caller makes a named file instead)."""
        ...
    def link_unnamed(self, handle: FileHandle, path: str) -> None:
        """Give a file of `create_unnamed` the name ``path``, which must not exist."""
        ...
    def take_access(self, handle: FileHandle, path: str) -> None:
        """Give the file of ``handle`` the permissions, owner and group of the regular file
        ``path`` it is about to replace, as far as this user may (the owner where files may be
        given away, as by root; the group where this user is in it; what the file system cannot
        keep, it does not); nothing when ``path`` is missing or no regular file. Set-ID and
        sticky bits are not taken."""
        ...
    def rename(self, src: str, dst: str) -> None: ...
    def unlink(self, path: str) -> None: ...
    def rmdir(self, path: str) -> None:
        """Remove an empty directory."""
        ...
    def listdir(self, path: str) -> list[str]:
        """The names in directory ``path``, files and directories, sorted."""
        ...
    def isdir(self, path: str) -> bool: ...
    def makedirs(self, path: str) -> None:
        """Make directory ``path`` and its missing parents, durably: when it returns, each
        new directory's entry in its parent was fsynced (else a file made durable in a new
        directory could vanish with it at a power loss), but in an existing parent that this
        user may not read (which cannot be opened to be synced)."""
        ...
    def fsync_dir(self, path: str) -> None: ...
    def seal(self, path: str) -> Seal: ...
    def lock_exclusive(self, path: str) -> FileLock:
        """Lock ``path`` (created if missing); raises BlockingIOError if it is held."""
        ...
    def lock(self, path: str, *, exclusive: bool, wait: bool) -> FileLock | None:
        """A shared or exclusive lock on ``path`` (created if missing; its content is never
        used, nor made durable), against other holders on this machine, also threads of this
        process. ``wait``: until it is free; else None when it is held the other way."""
        ...


_KINDS = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISLNK, "a symbolic link"))


def file_kind(mode: int) -> str:
    """What a file of ``mode`` (`os.stat`'s ``st_mode``) is, for a message: "a FIFO"."""
    return next((kind for test, kind in _KINDS if test(mode)), "a file of an unknown kind")


_FLOCK = struct.Struct("@hhqqi4x")  # struct flock: type, whence, start, length, pid


def locked_by_another(path: str) -> bool:
    """Whether another open file holds a POSIX or OFD lock on any byte of the file ``path``
    (QEMU locks the image files of a running VM so); False where it cannot be asked (no read
    permission)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return lock_held(fd)
    finally:
        os.close(fd)


def lock_held(fd: int) -> bool:
    """`locked_by_another` of an open file (its own locks, on ``fd``, do not count)."""
    try:
        answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK,
                             _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
    except OSError:
        return False
    return bool(_FLOCK.unpack(answer)[0] != fcntl.F_UNLCK)


@functools.lru_cache(maxsize=16)  # a few lengths recur (a chunk, a read); others come and go
def _zeros(length: int) -> bytes:
    return bytes(length)


_ZERO_PREFIX = 64  # data whose first bytes are not all zero is compared (and copied) no further
_ZEROS_PREFIX = bytes(_ZERO_PREFIX)


def is_zeros(data: bytes | bytearray | memoryview) -> bool:
    """Whether ``data`` is all zero bytes: its first bytes first (most data is not zeros, and
    is told from them at once), then one memcmp against a cached zero buffer of its length
    (bytes.count(0) counts every byte: ~90 us per 64 KiB against ~5 us). A view is copied
    before that: comparing one with bytes goes byte by byte (~110 us per 64 KiB)."""
    if data[:_ZERO_PREFIX] != _ZEROS_PREFIX[: len(data)]:
        return False
    if isinstance(data, memoryview):
        data = data.tobytes()
    return data == _zeros(len(data))


# --------------------------------------------------------------------------------------------
# The real file system

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
# The C library the interpreter is linked with (dlopen(NULL)): ctypes.util.find_library runs
# ldconfig in a child process, a few milliseconds of every command's start.
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int
_ZERO_CHUNK = bytes(1 << 20)


def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """Linux's fallocate(2) with a ``mode`` (os.posix_fallocate has none): 0, or the errno."""
    if _fallocate(fd, mode, offset, length) == 0:
        return 0
    return ctypes.get_errno()


_SYNC_FILE_RANGE_WRITE = 2
# A file this big is written, and a read this big of data read once is read, past the page cache
DIRECT_MIN_BYTES = 1 << 20
_DIRECT_ALIGN = 4096  # what O_DIRECT asks of offsets, lengths and memory (any block size)
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    _sync_file_range.restype = ctypes.c_int


def start_writeback(handle: FileHandle) -> None:
    """Ask the kernel to start writing a file's dirty pages back now, without waiting: a later
    fsync then finds little left. Only a hint (a handle with no OS descriptor is left alone);
    durability still needs fsync."""
    if _sync_file_range is None:
        return
    fd = handle.dup()
    if fd is not None:
        try:
            _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
        finally:
            os.close(fd)


class OsFileHandle:
    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._can_punch = True
        self._direct: int | None = None  # a descriptor of its own, O_DIRECT (`pwrite_direct`)
        self._direct_refused = False

    def pread(self, count: int, offset: int) -> bytes:
        data = os.pread(self._fd, count, offset)
        if len(data) < count:  # past the end of the file: zeros
            data += bytes(count - len(data))
        return data

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written

    def pwrite_direct(self, data: memoryview, offset: int) -> None:
        done = 0
        if not offset % _DIRECT_ALIGN and _aligned_memory(data):
            bulk = len(data) - len(data) % _DIRECT_ALIGN
            direct = self._direct_descriptor() if bulk else None
            try:
                while direct is not None and done < bulk:
                    written = os.pwrite(direct, data[done:bulk], offset + done)
                    done += written
                    if not written or written % _DIRECT_ALIGN:  # the rest through the cache
                        break
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._direct_refused = True  # this file system: everything through the cache
        self.pwrite(data[done:], offset + done)

    def _direct_descriptor(self) -> int | None:
        """This file opened again for writing with O_DIRECT (a descriptor of its own: the
        handle's own descriptor keeps its flags), at first use; None where that is refused."""
        if self._direct is None and not self._direct_refused:
            try:
                self._direct = os.open(f"/proc/self/fd/{self._fd}",
                                       os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
            except OSError:
                self._direct_refused = True
        return None if self._direct_refused else self._direct

    def write_direct(self, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` as the whole of this new, empty file, its whole blocks with O_DIRECT
        (from an aligned copy, or as they are if the memory is page-aligned: a pack built in a
        mapped buffer): a big file (a pack) is then not copied into the page cache by the
        kernel, which on a busy machine costs more CPU than the rest of writing it. The tail
        that is not a whole block, and everything where the file system refuses O_DIRECT, is
        written through the cache. Durable only after `fsync`, as any write."""
        view = memoryview(data)
        bulk = len(view) - len(view) % _DIRECT_ALIGN
        if not bulk or self._direct_refused or _aligned_memory(view):  # no copy that no
            self.pwrite_direct(view, 0)                                # O_DIRECT write reads
            return
        bounce = _aligned_buffer(bulk)
        bounce[:bulk] = view[:bulk]
        self.pwrite_direct(bounce[:bulk], 0)
        self.pwrite(view[bulk:], bulk)  # the tail

    def punch_hole(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        if self._can_punch:
            err = fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset,
                            length)
            if err == 0:
                return
            if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise OSError(err, os.strerror(err))
            self._can_punch = False
        self.write_zeros(offset, min(offset + length, self.size()))

    def write_zeros(self, offset: int, end: int) -> None:
        """Write zero bytes over ``[offset, end)``, a megabyte at a time (where no hole can be
        punched, nor the range zeroed otherwise)."""
        while offset < end:
            n = min(len(_ZERO_CHUNK), end - offset)
            self.pwrite(_ZERO_CHUNK[:n], offset)
            offset += n

    def truncate(self, size: int) -> None:
        os.ftruncate(self._fd, size)

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def fsync(self) -> None:
        os.fdatasync(self._fd)

    def data_extents(self, start: int = 0, end: int | None = None) -> list[Extent]:
        size = self.size()
        end = size if end is None else min(end, size)
        out, pos = [], start
        while pos < end:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos
                    break
                return [Extent(start, end - start)]  # no SEEK_DATA: everything may be data
            if data >= end:
                break
            hole = min(end, os.lseek(self._fd, data, os.SEEK_HOLE))
            out.append(Extent(data, hole - data))
            pos = hole
        return out

    def dup(self) -> int | None:
        return os.dup(self._fd)

    def close(self) -> None:
        if self._direct is not None:
            direct, self._direct = self._direct, None
            with contextlib.suppress(OSError):
                os.close(direct)
        os.close(self._fd)


def exclusive_or_busy(taken: FileLock | None, path: str) -> FileLock:
    """`FileIO.lock_exclusive` from `FileIO.lock`: BlockingIOError where it is held."""
    if taken is None:
        raise BlockingIOError(errno.EWOULDBLOCK, f"{path} is locked")
    return taken


class _OsLock:
    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)  # also for a copy a fork may hold
            finally:
                os.close(fd)


def _aligned_memory(view: memoryview) -> bool:
    """``view`` starts on a page (writable memory only: ctypes cannot locate the rest)."""
    if view.readonly or not view.contiguous or not len(view):
        return False
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) % _DIRECT_ALIGN == 0


_bounce = threading.local()


def _aligned_buffer(size: int) -> memoryview:
    """This thread's page-aligned buffer of at least ``size`` bytes (kept and reused: fresh
    memory costs a page fault per page)."""
    buffer: mmap.mmap | None = getattr(_bounce, "buffer", None)
    if buffer is None or len(buffer) < size:
        buffer = _bounce.buffer = mmap.mmap(-1, -(-size // (1 << 20)) << 20)
    return memoryview(buffer)


def pread_direct(handle: FileHandle, count: int, offset: int) -> bytes | memoryview:
    """``handle.pread(count, offset)`` past the page cache (O_DIRECT, on a descriptor of its
    own), into memory of its own (a view of it; no copy): a backup reading a whole disk once
    neither makes the kernel cache (and zero, for holes) pages it will not read again, which
    costs more CPU than all the rest of a backup, nor pushes out of the cache what the guest
    uses. Data written through the cache and not yet on disk is written back by the kernel
    before the read: the bytes are the same. Where the file has no OS descriptor or its file
    system refuses O_DIRECT: ``handle.pread``."""
    import numpy as np  # only here: uninitialised memory (no page faults, no zeroing)

    fd = handle.dup()
    if fd is None:
        return handle.pread(count, offset)
    try:
        direct = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return handle.pread(count, offset)
    finally:
        os.close(fd)
    start = offset - offset % _DIRECT_ALIGN
    span = -(-(offset + count) // _DIRECT_ALIGN) * _DIRECT_ALIGN - start
    memory = np.empty(span + _DIRECT_ALIGN, dtype=np.uint8)  # freed with the last view
    skip = -memory.ctypes.data % _DIRECT_ALIGN
    view = memory.data[skip : skip + span]
    got = 0
    try:
        while got < span:
            n = os.preadv(direct, [view[got:]], start + got)
            got += n
            if n == 0 or n % _DIRECT_ALIGN:  # the end of the file
                break
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return handle.pread(count, offset)  # refused: through the cache
    finally:
        os.close(direct)
    first = offset - start
    if got >= first + count:
        return view[first : first + count]
    data = bytes(view[first : max(first, got)])  # past the end of the file: zeros
    return data + bytes(count - len(data))


class OsFileIO:
    """Plain POSIX files."""

    def open(self, path: str, *, create: bool = False) -> FileHandle:
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        return OsFileHandle(os.open(path, flags, 0o600))

    def open_read(self, path: str) -> FileHandle:
        return OsFileHandle(os.open(path, os.O_RDONLY | os.O_CLOEXEC))

    def create_empty(self, path: str) -> FileHandle:
        """``path`` created, or emptied if it exists."""
        return OsFileHandle(os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                                    0o600))

    def create_unnamed(self, directory: str) -> FileHandle | None:
        flag = getattr(os, "O_TMPFILE", None)
        if flag is None:
            return None
        try:
            fd = os.open(directory, flag | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as exc:  # a file system (or kernel) without it
            if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                return None
            raise
        if not os.path.exists(f"/proc/self/fd/{fd}"):  # linked through /proc: without it,
            os.close(fd)                               # a named file from the start
            return None
        return OsFileHandle(fd)

    def take_access(self, handle: FileHandle, path: str) -> None:
        try:
            replaced = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return
        fd = handle.dup()
        if not stat.S_ISREG(replaced.st_mode) or fd is None:
            if fd is not None:
                os.close(fd)
            return
        try:  # as far as permitted, and as the file system can (vfat, CIFS: a restore
            # that wrote a whole image does not fail over a file mode)
            for owner in (replaced.st_uid, -1):  # the owner and group, else the group alone
                with contextlib.suppress(OSError):
                    os.fchown(fd, owner, replaced.st_gid)
                    break
            with contextlib.suppress(OSError):
                os.fchmod(fd, stat.S_IMODE(replaced.st_mode) & 0o777)
        finally:
            os.close(fd)

    def link_unnamed(self, handle: FileHandle, path: str) -> None:
        fd = handle.dup()
        if fd is None:
            raise ValueError("not a file of create_unnamed")
        try:  # linkat(AT_SYMLINK_FOLLOW): os.link calls plain link() without a dir_fd
            dir_fd = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY
                             | os.O_CLOEXEC)
            try:
                os.link(f"/proc/self/fd/{fd}", os.path.basename(path), dst_dir_fd=dir_fd,
                        follow_symlinks=True)
            finally:
                os.close(dir_fd)
        finally:
            os.close(fd)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def read_file(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def replace_atomic(self, path: str, data: bytes | bytearray | memoryview) -> None:
        tmp = path + ".tmp"
        try:
            handle = self.create_empty(tmp)
            try:
                if isinstance(handle, OsFileHandle) and len(data) >= DIRECT_MIN_BYTES:
                    handle.write_direct(data)  # past the page cache
                else:  # small, or a handle wrapped by a FileIO that watches its writes
                    handle.pwrite(data, 0)
                handle.fsync()
            finally:
                handle.close()
            self.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                self.unlink(tmp)  # a full file system must not keep a half-written file
            raise
        self.fsync_dir(os.path.dirname(path) or ".")

    def rename(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def rmdir(self, path: str) -> None:
        os.rmdir(path)

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(path))

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def makedirs(self, path: str) -> None:
        missing = []
        while path and not os.path.isdir(path):
            missing.append(path)
            path = os.path.dirname(path)
        for directory in reversed(missing):
            try:
                os.mkdir(directory)
            except FileExistsError:  # made meanwhile by another process (its entry is synced
                if not os.path.isdir(directory):  # here too), or a file is in the way
                    raise
        for directory in missing:
            parent = os.path.dirname(directory) or "."
            try:
                self.fsync_dir(parent)
            except PermissionError:  # a parent this user may write but not read (a drop box
                if parent in missing:  # directory, mode 1733) cannot be opened to be synced:
                    raise              # the kernel writes its entry back in its own time

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def seal(self, path: str) -> Seal:
        st = os.stat(path)
        return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)

    def lock_exclusive(self, path: str) -> FileLock:
        return exclusive_or_busy(self.lock(path, exclusive=True, wait=False), path)

    def lock(self, path: str, *, exclusive: bool, wait: bool) -> FileLock | None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(fd, mode)
        except BaseException as exc:
            os.close(fd)
            if isinstance(exc, BlockingIOError):
                return None
            raise
        return _OsLock(fd)
