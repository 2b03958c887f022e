"""A shrink's drop of the data past the new end is durable before a later grow can commit a
larger size: shrink, grow, then power loss must read zeros in the grown range, never the bytes
the shrink cut away (disk-format.md, Resize)."""

from __future__ import annotations

import pytest

from blocktrail.disk import Disk
from blocktrail.fileio import FileHandle
from blocktrail.simfileio import SimulatedFileIO

PATH = "/sim/disk"
SIZE, SHRUNK = 16384, 1000


class KilledAtDrop(Exception):
    """The process died between the shrink's disk.json replace and its drop."""


class DropKillsFileIO(SimulatedFileIO):
    """While ``kill_at_drop`` is set, a truncate or hole punch kills the process instead."""

    def __init__(self) -> None:
        super().__init__()
        self.kill_at_drop = False

    def open(self, path: str, *, create: bool = False) -> FileHandle:
        handle = super().open(path, create=create)
        for name in ("truncate", "punch_hole"):
            original = getattr(handle, name)

            def killing(*args: int, _original: object = original) -> None:
                if self.kill_at_drop:
                    raise KilledAtDrop
                _original(*args)  # type: ignore[operator]

            setattr(handle, name, killing)
        return handle


def _filled(fs: SimulatedFileIO, delta_top: bool) -> Disk:
    disk = Disk.create(PATH, SIZE, 512, cluster_size=4096, fileio=fs)
    if delta_top:
        disk.create_snapshot("s1")
    disk.pwrite(b"\xaa" * SIZE, 0)
    disk.flush()
    return disk


def _grown_range_after_power_loss(fs: SimulatedFileIO, disk: Disk) -> bytes:
    disk.resize(SIZE)  # committed: [SHRUNK, SIZE) reads zeros from here on
    assert disk.pread(SIZE - SHRUNK, SHRUNK) == bytes(SIZE - SHRUNK)
    disk.abandon()
    fs.power_loss()  # no guest write or flush since the resizes
    with Disk.open(PATH, fileio=fs) as disk:
        assert disk.size_bytes == SIZE
        return disk.pread(SIZE - SHRUNK, SHRUNK)


@pytest.mark.parametrize("delta_top", [False, True], ids=["base-top", "delta-top"])
def test_shrink_then_grow_then_power_loss_reads_zeros(delta_top: bool) -> None:
    fs = SimulatedFileIO()
    disk = _filled(fs, delta_top)
    disk.resize(SHRUNK)
    assert _grown_range_after_power_loss(fs, disk) == bytes(SIZE - SHRUNK)


@pytest.mark.parametrize("delta_top", [False, True], ids=["base-top", "delta-top"])
def test_the_drop_an_open_repeats_is_durable_before_a_grow(delta_top: bool) -> None:
    fs = DropKillsFileIO()
    disk = _filled(fs, delta_top)
    fs.kill_at_drop = True
    with pytest.raises(KilledAtDrop):
        disk.resize(SHRUNK)  # disk.json says SHRUNK; nothing was cut
    fs.kill_at_drop = False
    disk.abandon()
    disk = Disk.open(PATH, fileio=fs)  # repeats the drop
    assert disk.size_bytes == SHRUNK
    assert _grown_range_after_power_loss(fs, disk) == bytes(SIZE - SHRUNK)
