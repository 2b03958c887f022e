"""Bring an existing raw image under tracking, whole or not at all.

The source must be a regular file or a block device whose size is where its data ends: a FIFO,
a directory, a character device or a socket is refused before it is opened (and it is opened
with O_NONBLOCK, so a file swapped for a FIFO meanwhile cannot block the caller), and so is a
file whose size lies (``/proc/self/environ``: 0 bytes by its size, yet readable), also when it
grows while it is read. The disk is built in a directory next to the target and renamed into
place at the end: the target holds a whole disk or nothing.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

from blocktrail.disk.disk import LOCK_FILE, Disk, SourceOpener
from blocktrail.errors import (
    BlocktrailError,
    DiskExists,
    DiskIOFailure,
    FileInUse,
    InvalidArgument,
    io_error,
)
from blocktrail.extents import Extent
from blocktrail.fileio import (
    FileIO,
    OsFileHandle,
    OsFileIO,
    file_kind,
    is_zeros,
    lock_held,
)

IMPORT_CHUNK = 1 << 20
# A disk being built: DIR/.creating-NAME-RANDOM (never a disk name: those start with a letter or
# digit). What a killed process leaves behind; the host removes such directories at its start,
# and the next build of the same name removes those of its name (remove_stale_builds).
BUILDING_PREFIX = ".creating-"
STALE_BUILD_S = 60.0  # a build directory unchanged this long and unlocked was left by a kill


def import_raw(source: str | os.PathLike[str], path: str | os.PathLike[str],
               granularity: int = 64 * 1024, *, cluster_size: int = 64 * 1024,
               progress: Callable[[int, int], None] | None = None,
               fileio: FileIO | None = None) -> Disk:
    """Create a disk at ``path`` holding the raw image ``source`` (a regular file or a block
    device), and return it open.

    Every byte goes through the disk's write path, so the imported data counts as changed since
    the epoch's first change ID; holes and all-zero chunks are skipped (they stay holes)."""
    image = RawImage.open(source)
    try:
        def build(building: str) -> Disk:
            disk = Disk.create(building, image.size_bytes, granularity,
                               cluster_size=cluster_size, fileio=fileio)
            try:
                _copy(image, disk, progress)
                image.check_whole()
            except BaseException:
                with contextlib.suppress(BlocktrailError, OSError):
                    disk.close()
                raise
            return disk

        return build_disk(path, build, fileio=fileio)
    finally:
        image.close()


def _copy(image: RawImage, disk: Disk, progress: Callable[[int, int], None] | None) -> None:
    copied = 0
    for extent in image.data_extents():
        pos = extent.offset
        while pos < extent.end:
            n = min(IMPORT_CHUNK, extent.end - pos)
            data = image.pread(n, pos)
            if not is_zeros(data):
                disk.pwrite(data, pos)
            pos += n
            copied += n
            if progress is not None:
                progress(copied, image.size_bytes)
    disk.flush()


def build_disk(path: str | os.PathLike[str], make: Callable[[str], Disk], *,
               fileio: FileIO | None = None, chunk_sources: SourceOpener | None = None) -> Disk:
    """The disk ``make`` creates in a new directory next to ``path``
    (``.creating-NAME-RANDOM``), closed, renamed to ``path`` and opened again (a restoring
    base with its source from ``chunk_sources``): ``path`` holds a whole disk or nothing. A
    failure, also of that last open, removes what was built; a killed process leaves the
    directory being built behind (a name no disk has; the host removes such directories at its
    start, and the next build of ``path`` those of its name)."""
    fileio = fileio or OsFileIO()
    path = os.path.abspath(os.fspath(path))
    parent, base = os.path.split(path)
    _check_free(fileio, path)
    remove_stale_builds(fileio, parent, base)
    building = os.path.join(parent, f"{BUILDING_PREFIX}{base}-{secrets.token_hex(4)}")
    try:
        fileio.makedirs(building)
        make(building).close()
        try:
            fileio.rename(building, path)
        except OSError:
            if fileio.exists(path):
                raise DiskExists(f"{path} already exists") from None
            raise
        fileio.fsync_dir(parent)
    except OSError as exc:
        remove_building(fileio, building)
        raise io_error(f"cannot create disk {path} (nothing was created)", exc) from exc
    except BaseException:
        remove_building(fileio, building)
        raise
    try:
        return Disk.open(path, fileio=fileio, chunk_sources=chunk_sources)
    except BaseException as exc:  # nobody has seen it yet: take it back
        with contextlib.suppress(OSError):
            fileio.rename(path, building)
            fileio.fsync_dir(parent)
            remove_building(fileio, building)
        if isinstance(exc, OSError):
            raise io_error(f"cannot create disk {path} (nothing was created)", exc) from exc
        raise


def _check_free(fileio: FileIO, path: str) -> None:
    """``path`` is missing or an empty directory (which the rename replaces)."""
    if not fileio.exists(path):
        return
    try:
        empty = not fileio.listdir(path)
    except NotADirectoryError:
        empty = False
    if not empty:
        raise DiskExists(f"{path} already exists")


def remove_stale_builds(fileio: FileIO, parent: str, base: str, *,
                        older_than_s: float = STALE_BUILD_S) -> list[str]:
    """Remove what killed builds of ``base`` left in ``parent``: a ``.creating-BASE-*``
    directory whose disk lock nobody holds (a build holds it while it writes) and that has not
    changed for ``older_than_s``. -> the directories removed."""
    prefix = f"{BUILDING_PREFIX}{base}-"
    removed: list[str] = []
    try:
        names = [n for n in fileio.listdir(parent) if n.startswith(prefix)]
    except OSError:
        return removed
    for name in names:
        building = os.path.join(parent, name)
        try:
            if time.time() - os.stat(building).st_mtime < older_than_s:
                continue
            lock = fileio.lock_exclusive(os.path.join(building, LOCK_FILE))
        except OSError:  # held (BlockingIOError), or gone meanwhile
            continue
        try:
            remove_building(fileio, building)
        finally:
            with contextlib.suppress(OSError):
                lock.release()
        removed.append(building)
    return removed


def remove_building(fileio: FileIO, building: str) -> None:
    """Remove a directory a disk was being built in (its files, then itself); what cannot be
    removed now is left for the next start of the host. A symbolic link of that name is left
    alone: no build makes one, and following it would delete the files where it points."""
    if os.path.islink(building):
        return
    with contextlib.suppress(OSError):
        for name in fileio.listdir(building):
            fileio.unlink(os.path.join(building, name))
        fileio.rmdir(building)


@dataclass(slots=True)
class RawImage:
    """An open raw image: a regular file or a block device, checked to be what it says."""

    path: str
    fd: int
    size_bytes: int
    block_device: bool

    @classmethod
    def open(cls, source: str | os.PathLike[str]) -> RawImage:
        path = os.fspath(source)
        try:
            before = os.stat(path)
        except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
            raise InvalidArgument(f"cannot import {path!r}: {_why(exc)}") from None
        _check_kind(path, before.st_mode)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as exc:
            raise InvalidArgument(f"cannot import {path!r}: {_why(exc)}") from None
        try:
            after = os.fstat(fd)
            if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
                raise InvalidArgument(f"cannot import {path!r}: it was replaced while it was "
                                      "opened; try again")
            _check_kind(path, after.st_mode)
            if lock_held(fd):
                raise FileInUse(f"cannot import {path!r}: it is in use: another process holds "
                                "a lock on it (QEMU locks the image of a running VM, which "
                                "changes it while it is read: the copy would mix its states). "
                                "Stop it first, or import a copy made while it was stopped")
            block = stat.S_ISBLK(after.st_mode)
            size = os.lseek(fd, 0, os.SEEK_END) if block else after.st_size  # a device's
            # st_size is 0
            image = cls(path, fd, size, block)
            try:
                image.check_whole()
                kind = container_format(image.pread(min(size, 512), 0))
            except DiskIOFailure as exc:  # not even its end can be read: no raw image
                raise InvalidArgument(f"cannot import {path!r}: {exc.message}") from exc
            if kind is not None:
                raise InvalidArgument(
                    f"cannot import {path!r}: it is a {kind} image, not a raw one (its data "
                    f"would be taken for the disk's); convert it first (`qemu-img convert -O "
                    f"raw {path} IMAGE.raw`) and import that")
        except BaseException:
            os.close(fd)
            raise
        return image

    def check_whole(self) -> None:
        """The image ends where its size says: nothing can be read there (a /proc file says 0
        bytes and has more; a file that grew while it was imported has more now)."""
        try:
            size = os.lseek(self.fd, 0, os.SEEK_END) if self.block_device \
                else os.fstat(self.fd).st_size
            beyond = os.pread(self.fd, 1, self.size_bytes)
        except OSError as exc:
            raise self._read_error(exc) from exc
        if size != self.size_bytes or beyond:
            raise InvalidArgument(
                f"cannot import {self.path!r}: its size ({self.size_bytes} bytes) is not where "
                "its data ends (a file that changed during the import, or a /proc or /sys "
                "file); import a stable raw image")

    def data_extents(self) -> list[Extent]:
        if self.block_device:
            return [Extent(0, self.size_bytes)] if self.size_bytes else []
        return OsFileHandle(self.fd).data_extents(0, self.size_bytes)

    def pread(self, count: int, offset: int) -> bytes:
        try:
            data = os.pread(self.fd, count, offset)
        except OSError as exc:
            raise self._read_error(exc) from exc
        if len(data) != count:
            raise InvalidArgument(
                f"cannot import {self.path!r}: {count} bytes at {offset} could not be read "
                f"(got {len(data)}): it changed during the import, or its size "
                f"({self.size_bytes} bytes) is not where its data ends")
        return data

    def _read_error(self, exc: OSError) -> DiskIOFailure:
        return DiskIOFailure(f"cannot read {self.path!r}: {exc.strerror or exc}")

    def close(self) -> None:
        os.close(self.fd)


# The headers of the image formats QEMU also reads (qemu's block drivers probe them so).
_CONTAINERS = ((0, b"QFI\xfb", "qcow2"), (0, b"QED\x00", "QED"), (0, b"KDMV", "VMDK"),
               (0, b"# Disk DescriptorFile", "VMDK descriptor"), (0, b"vhdxfile", "VHDX"),
               (0, b"conectix", "VHD"), (64, b"\x7f\x10\xda\xbe", "VDI"))


def container_format(head: bytes) -> str | None:
    """The image format whose header ``head`` (an image's first bytes) is, if any: a disk's
    first sector is a boot record or a partition table, never one of these."""
    return next((name for at, magic, name in _CONTAINERS
                 if head[at : at + len(magic)] == magic), None)


def _check_kind(path: str, mode: int) -> None:
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise InvalidArgument(f"cannot import {path!r}: it is {file_kind(mode)}, not a raw "
                              "image (a regular file or a block device)")


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)
