"""An open cut short, right after it began, is an unclean shutdown, not an edit of a closed
disk: the next open keeps the tracking epoch (no needless full backup)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from blocktrail.disk import Disk

sys.path.insert(0, str(Path(__file__).parents[2] / "crash"))
from powercut import PowerCutFileIO, PowerLoss

PATH = "/sim/d0"


@pytest.mark.parametrize("size", [64 * 1024, 64 * 1024 + 1000],
                         ids=["whole clusters", "a cluster cut by the end"])
def test_an_open_cut_at_its_first_durability_operation_keeps_the_epoch(size: int) -> None:
    """A disk whose end falls inside a cluster has that cluster's tail cut again at every open
    (it changes the top layer's times even where it frees nothing): done before the open is
    committed, a crash in between made the disk look edited while closed."""
    fs = PowerCutFileIO(0)
    fs.makedirs("/sim")
    with Disk.create(PATH, size, 4096, cluster_size=16 * 1024, fileio=fs) as disk:
        disk.pwrite(b"x" * 5000, 0)
        change_id = disk.create_snapshot("s").change_id
        disk.pwrite(b"y" * 100, size - 200)  # into the last cluster, in the top layer
    fs.count, fs.cut_at = 0, 1
    with pytest.raises(PowerLoss):
        Disk.open(PATH, fileio=fs)
    fs.restart()
    with Disk.open(PATH, fileio=fs) as disk:
        assert len(disk.tracker.epochs) == 1, disk.tracker.epochs[-1].reason
        areas = disk.query_changed_areas(change_id).changed_areas
        granule = (size - 200) // 4096 * 4096
        assert [(e.offset, e.length) for e in areas] == [(granule, min(4096, size - granule))]
        assert disk.pread(100, size - 200) == b"y" * 100
