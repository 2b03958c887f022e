"""A disk file changed by a program other than blocktrail restarts tracking, however the edit
tried to hide: frozen layers are sealed with their change time, and checked at every open, also
after a crash. Nothing else restarts it (moving the directory, a clean or crashed reopen)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from blocktrail.disk import Disk
from blocktrail.errors import StaleChangeId

SIZE = 1 << 20
G = 4096


def _layer_files(disk: Disk, snapshot: str) -> list[Path]:
    layer = next(la for la in disk._layers if la.snapshot == snapshot)
    return [Path(disk.path) / name for name in layer.file_names()]


def _edit_and_hide(path: Path) -> None:
    """`dd conv=notrunc` of a few bytes, then `touch -d` back to the old mtime: size, mtime and
    inode are as before; only the change time moved."""
    before = path.stat()
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\xee" * 16)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == \
        (before.st_size, before.st_mtime_ns, before.st_ino)


def _disk_with_snapshot(path: Path) -> tuple[str, str]:
    with Disk.create(path, SIZE, G) as disk:
        start = disk.current_change_id
        disk.pwrite(b"a" * 10000, 0)
        snap = disk.create_snapshot("s1")
        disk.pwrite(b"b" * 5000, 200000)
        return start, snap.change_id


@pytest.mark.parametrize("crashed", [False, True], ids=["closed", "crashed"])
def test_hidden_edit_of_a_frozen_layer_restarts_tracking(tmp_path: Path, crashed: bool) -> None:
    path = tmp_path / "d"
    start, snap_id = _disk_with_snapshot(path)
    disk = Disk.open(path)
    base = _layer_files(disk, "s1")[0]
    if crashed:
        disk.pwrite(b"c" * 10, 300000)
        disk.flush()
        disk.abandon()  # as a killed process leaves it: disk.json says "open"
    else:
        disk.close()
    _edit_and_hide(base)
    with Disk.open(path) as disk:
        for old in (start, snap_id):
            with pytest.raises(StaleChangeId, match="changed outside blocktrail"):
                disk.query_changed_areas(old)
        assert "frozen layer" in disk.tracker.epochs[-1].reason or not crashed
    with Disk.open(path) as disk:  # the new epoch is the baseline: no restart again
        assert len(disk.tracker.epochs) == 2


@pytest.mark.parametrize("crashed", [False, True], ids=["closed", "crashed"])
def test_no_restart_without_an_edit(tmp_path: Path, crashed: bool) -> None:
    path = tmp_path / "d"
    start, snap_id = _disk_with_snapshot(path)
    moved = tmp_path / "moved"
    shutil.move(path, moved)  # a rename keeps inodes, times and change times
    disk = Disk.open(moved)
    disk.pwrite(b"c" * 10, 300000)
    disk.flush()
    if crashed:
        disk.abandon()
    else:
        disk.close()
    with Disk.open(moved) as disk:
        assert len(disk.tracker.epochs) == 1
        assert disk.query_changed_areas(snap_id).changed_areas
        disk.query_changed_areas(start)


def test_crashed_disk_checks_frozen_layers_but_not_the_top(tmp_path: Path) -> None:
    """What docs/disk-format.md promises: after a crash every frozen layer is checked; the
    writable top is not (the crashed process itself may have changed it)."""
    path = tmp_path / "d"
    _, snap_id = _disk_with_snapshot(path)
    disk = Disk.open(path)
    top = [Path(disk.path) / n for n in disk._layers[-1].file_names()]
    disk.abandon()
    _edit_and_hide(top[0])
    with Disk.open(path) as disk:
        assert len(disk.tracker.epochs) == 1
        disk.query_changed_areas(snap_id)
