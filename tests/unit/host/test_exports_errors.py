"""How disk errors reach an NBD client: a full file system is ENOSPC (QEMU can pause the guest
with werror=enospc and resume once there is space), other I/O failures EIO."""

from __future__ import annotations

import errno

import pytest

from blocktrail.disk import Disk
from blocktrail.fileio import FileHandle
from blocktrail.host.exports import Target
from blocktrail.nbd.proto import Command, CommandFlag, Errno, Request
from blocktrail.nbd.proto.errors import RequestFailed
from blocktrail.simfileio import SimulatedFileIO


class FailingWrites(SimulatedFileIO):
    """Writes to layer data fail with ``error`` once armed."""

    def __init__(self, error: int) -> None:
        super().__init__()
        self.error = error
        self.armed = False

    def open(self, path: str, *, create: bool = False) -> FileHandle:
        handle = super().open(path, create=create)
        if path.endswith(".img"):
            real = handle.pwrite

            def pwrite(data: bytes | bytearray, offset: int) -> None:
                if self.armed:
                    raise OSError(self.error, "injected")
                real(data, offset)
            handle.pwrite = pwrite  # type: ignore[method-assign]
        return handle


@pytest.mark.parametrize(("error", "expected"), [(errno.ENOSPC, Errno.ENOSPC),
                                                 (errno.EDQUOT, Errno.ENOSPC),
                                                 (errno.EIO, Errno.EIO)])
def test_write_failures_reach_the_client_with_their_errno(error: int, expected: int) -> None:
    fs = FailingWrites(error)
    disk = Disk.create("/sim/d", 1 << 20, 4096, fileio=fs)
    fs.armed = True
    with pytest.raises(RequestFailed) as failed:
        Target(disk, None).perform(Request(1, Command.WRITE, CommandFlag(0), 0, 4, b"abcd"))
    assert failed.value.errno == expected
    disk.abandon()
