"""A disk import losing power at every durability point of it (CrashMonkey style).

`import_raw` builds the disk in a directory of its own next to the target and renames it into
place: the target holds a whole disk or nothing. The kill sweep (test_crash_points.py) kills
the process, and the kernel keeps what it was given; a power loss also takes what no fsync made
durable (file data, directory entries, a directory's rename). Here the import runs on the
simulated file system, once per durability operation, losing power just before the N-th; when
the machine is back:

- the target is absent, or a disk that opens with every byte of the image, its holes and
  all-zero chunks read as zeros, and every granule holding data reported as changed since the
  epoch's first change ID (the import counts as a change);
- the import can be run again: it makes the whole disk, or finds the one there;
- an import that returned is durable: a power loss right after it keeps the whole disk.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from blocktrail.disk import Disk
from blocktrail.disk.importer import IMPORT_CHUNK, import_raw
from blocktrail.errors import DiskExists
from faulty import reported_granules

sys.path.insert(0, str(Path(__file__).parent))
from powercut import PowerCutFileIO, PowerLoss

PARENT = "/sim/disks"
TARGET = f"{PARENT}/d0"
GRANULARITY = 4096
CLUSTER = 16 * 1024


def _image(tmp_path: Path) -> bytes:
    """An image with data, a hole, a chunk of written zeros and an odd tail."""
    size = 3 * IMPORT_CHUNK + 3 * GRANULARITY + 100
    raw = tmp_path / "image.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
        f.write(os.urandom(100_000))
        f.seek(IMPORT_CHUNK)
        f.write(bytes(IMPORT_CHUNK))  # zeros written: read back as zeros, stored as a hole
        f.seek(2 * IMPORT_CHUNK + 5000)
        f.write(b"text " * 14_000)
        f.seek(size - 7000)
        f.write(os.urandom(7000))
    return raw.read_bytes()


def _check_whole(disk: Disk, image: bytes) -> None:
    assert disk.size_bytes == len(image)
    assert disk.pread(len(image), 0) == image
    change_id = disk.tracker.epochs[-1].epoch + "/0"
    reported = reported_granules(disk, change_id, GRANULARITY)
    for g in range(-(-len(image) // GRANULARITY)):
        if any(image[g * GRANULARITY : (g + 1) * GRANULARITY]):
            assert g in reported, f"granule {g} holds imported data but is not reported"


def _fresh(cut_at: int, torn: bool) -> PowerCutFileIO:
    fs = PowerCutFileIO(0, cut_at if torn else None)
    fs.makedirs(PARENT)
    fs.count, fs.cut_at = 0, cut_at
    return fs


def _import(source: Path, fs: PowerCutFileIO) -> Disk:
    return import_raw(source, TARGET, GRANULARITY, cluster_size=CLUSTER, fileio=fs)


@pytest.mark.parametrize("torn", [False, True], ids=["unsynced lost", "unsynced torn"])
def test_an_import_losing_power_anywhere_leaves_a_whole_disk_or_none(tmp_path: Path,
                                                                     torn: bool) -> None:
    image = _image(tmp_path)
    source = tmp_path / "image.raw"
    cut_at, outcomes = 1, {"absent": 0, "whole": 0}
    while True:
        fs = _fresh(cut_at, torn)
        try:
            disk = _import(source, fs)
        except PowerLoss:
            fs.restart()
            if fs.exists(TARGET):
                with Disk.open(TARGET, fileio=fs) as found:
                    _check_whole(found, image)
                outcomes["whole"] += 1
                with pytest.raises(DiskExists):
                    _import(source, fs)
            else:
                outcomes["absent"] += 1
                with _import(source, fs) as again:
                    _check_whole(again, image)
            cut_at += 1
            continue
        fs.cut_at = 0  # it returned: the power lost now takes nothing it made
        disk.abandon()
        fs.power_loss()
        fs.restart()
        with Disk.open(TARGET, fileio=fs) as kept:
            _check_whole(kept, image)
        break
    assert cut_at > 10, "the import should pass through many durability points"
    assert outcomes["absent"] and outcomes["whole"], outcomes
