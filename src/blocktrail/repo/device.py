"""A block device as the target of a restore: a logical volume, a disk, a loop device.

A device is written in place. There is no file to build beside it and rename over it, so a
restore that fails part way leaves the device holding part of the image; the error says so.
What can be checked first is checked before the first write: the device is opened exclusively
(O_EXCL: the kernel refuses a device that is mounted, or held by device mapper, RAID or another
program that opened it exclusively), one that another process holds a lock on (QEMU locks the
devices of a running VM) is refused, and so is one smaller than the image. What the image
leaves as holes is zeroed on the device (discarded where the device then reads zeros, else
zeroed by the kernel, else written), so the device reads as the point, not as what it held.
Devices are the system's: they are opened here, not through a `FileIO` (a simulated file
system has none).
"""

from __future__ import annotations

import errno
import fcntl
import os

from blocktrail.errors import FileInUse, InvalidArgument
from blocktrail.fileio import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    OsFileHandle,
    fallocate,
    lock_held,
)

# Discard (the device reads zeros after it, and a thin volume gives the space back), then have
# the kernel zero the range (WRITE ZEROES, or zero pages it writes itself).
ZERO_MODES = (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
               FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
_BLKROGET = 0x125E  # linux/fs.h: _IO(0x12, 94), whether the device is read-only (an int)


class DeviceHandle(OsFileHandle):
    """An open block device: its size is the device's, fixed; `punch_hole` zeroes a range."""

    def __init__(self, fd: int, path: str) -> None:
        super().__init__(fd)
        self.path = path
        self._size = os.lseek(fd, 0, os.SEEK_END)
        self._modes = list(ZERO_MODES)
        self.changed = False  # anything was written, or zeroed

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        self.changed = True
        super().pwrite(data, offset)

    def pwrite_direct(self, data: memoryview, offset: int) -> None:
        self.changed = True
        super().pwrite_direct(data, offset)

    def size(self) -> int:
        return self._size

    def truncate(self, size: int) -> None:
        raise OSError(errno.EINVAL, f"{self.path} is a device: its size is fixed")

    def punch_hole(self, offset: int, length: int) -> None:
        """Make ``[offset, offset + length)`` read as zeros."""
        end = min(offset + length, self._size)
        if end <= offset:
            return
        for mode in list(self._modes):
            err = fallocate(self._fd, mode, offset, end - offset)
            if err == 0:
                self.changed = True
                return
            if err == errno.EINVAL:  # a range not of whole logical blocks: written below
                break
            if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.ENODEV):
                raise OSError(err, f"{os.strerror(err)}: zeroing {self.path}")
            self._modes.remove(mode)  # this device cannot: not asked again
        self.write_zeros(offset, end)


def open_device(path: str, image_bytes: int) -> DeviceHandle:
    """The block device ``path``, opened to have an image of ``image_bytes`` written onto it
    (exclusively, while it is open). `FileInUse` where it is mounted, held or locked;
    `InvalidArgument` where it is smaller than the image."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise FileInUse(f"restore target {path} is in use: it is mounted, or held by "
                            "device mapper (LVM), RAID or another program that opened it "
                            "exclusively. Unmount it, or stop what holds it, first") from None
        if exc.errno in (errno.ENXIO, errno.ENODEV):
            raise InvalidArgument(f"restore target {path} is a device node with no device "
                                  "behind it (a disk gone, or a driver not loaded): nothing "
                                  "was written") from None
        raise
    try:
        if fcntl.ioctl(fd, _BLKROGET, b"\0" * 4) != b"\0" * 4:
            raise InvalidArgument(f"restore target {path} is a read-only device: nothing was "
                                  "written")
        if lock_held(fd):
            raise FileInUse(f"restore target {path} is in use: another process holds a lock "
                            "on it (QEMU locks the devices of a running VM, which would go on "
                            "using it). Stop it first, or restore to another device")
        handle = DeviceHandle(fd, path)
        if handle.size() < image_bytes:
            raise InvalidArgument(f"restore target {path} holds {handle.size()} bytes, and the "
                                  f"image {image_bytes}: nothing was written (grow the "
                                  "device, or restore to a larger one)")
        return handle
    except BaseException:
        os.close(fd)
        raise
