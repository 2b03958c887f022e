"""The host's data directory losing power at every durability point (CrashMonkey style): its
creation with a first disk, the upgrade of a version 1 directory, which moves every disk
from DATA/NAME to DATA/disks/NAME and writes host.json last, and a VM snapshot taken and
removed.

Each runs on the simulated file system, once per durability operation, losing power just
before the N-th; when the machine is back, the next start of the host finds:

- a created disk whole or absent, and absent ones can be created again;
- after an upgrade cut anywhere, every disk (each one once) with its content, its snapshot and
  its change IDs (the same tracking epoch: the moves are no reason for a full backup);
- a VM snapshot on both disks of the VM or on neither;
- what a start or a VM snapshot that returned did is durable: a power loss right after it loses
  nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from blocktrail.disk import Disk
from blocktrail.errors import DiskExists
from blocktrail.host.registry import DiskRegistry
from upgradekit import Before, check_disks_kept

sys.path.insert(0, str(Path(__file__).parent))
from powercut import PowerCutFileIO, PowerLoss

ROOT = "/sim/data"
KiB = 1024
SIZE = 256 * KiB
GRANULARITY = 4096
# version 1 disks, among them names of the host's own entries
V1_DISKS = ("d0", "disks", "host.json", "host.lock", "x.tmp")


def _after_cut(base: PowerCutFileIO | None, cut_at: int, torn: bool) -> PowerCutFileIO:
    fs = PowerCutFileIO(0, cut_at if torn else None)
    if base is None:
        fs.makedirs("/sim")
    else:
        fs.copy_disk_from(base)
    fs.count, fs.cut_at = 0, cut_at
    return fs


def _start(fs: PowerCutFileIO) -> DiskRegistry:
    return DiskRegistry(ROOT, fileio=fs)


@pytest.mark.parametrize("torn", [False, True], ids=["unsynced lost", "unsynced torn"])
def test_a_created_disk_is_whole_or_absent_wherever_the_power_goes(tmp_path: Path,
                                                                   torn: bool) -> None:
    cut_at, outcomes = 1, {"absent": 0, "whole": 0}
    while True:
        fs = _after_cut(None, cut_at, torn)
        try:
            registry = _start(fs)
            registry.create("d0", SIZE, GRANULARITY).pwrite(b"first", 0)
            registry.get("d0").flush()
        except PowerLoss:
            fs.restart()
            registry = _start(fs)
            try:
                if "d0" in registry.names():
                    outcomes["whole"] += 1
                    disk = registry.get("d0")
                    assert disk.size_bytes == SIZE
                    assert disk.pread(5, 0) in (b"first", bytes(5))
                    try:
                        registry.create("d0", SIZE, GRANULARITY)
                    except DiskExists:
                        pass
                    else:
                        raise AssertionError("d0 was created twice")
                else:
                    outcomes["absent"] += 1
                    assert registry.create("d0", SIZE, GRANULARITY).size_bytes == SIZE
            finally:
                registry.close()
            cut_at += 1
            continue
        fs.cut_at = 0  # it returned: the power lost now (the host never closed) takes nothing
        fs.power_loss()
        fs.restart()
        registry = _start(fs)
        try:
            assert registry.get("d0").pread(5, 0) == b"first"
        finally:
            registry.close()
        break
    assert outcomes["absent"] and outcomes["whole"], outcomes


def _version1() -> tuple[PowerCutFileIO, Before]:
    fs = PowerCutFileIO(0)
    fs.makedirs(ROOT)
    before = {}
    for name in V1_DISKS:
        with Disk.create(f"{ROOT}/{name}", SIZE, GRANULARITY, fileio=fs) as disk:
            disk.pwrite(name.encode() * 10, 0)
            snap = disk.create_snapshot("s1")
            disk.pwrite(b"after", SIZE // 2)
            before[name] = (snap.change_id, disk.current_change_id, disk.pread(SIZE, 0))
    fs.replace_atomic(f"{ROOT}/vms.json", json.dumps({"vm1": ["d0"]}).encode())
    return fs, before


def _check_upgraded(fs: PowerCutFileIO, before: Before) -> None:
    registry = _start(fs)
    try:
        check_disks_kept(registry, before, (SIZE // 2, GRANULARITY))
        assert registry.vm("vm1").disks == ("d0",)
    finally:
        registry.close()
    assert sorted(fs.listdir(ROOT)) == ["disks", "host.json", "host.lock", "vms.json"]


@pytest.mark.parametrize("torn", [False, True], ids=["unsynced lost", "unsynced torn"])
def test_an_upgrade_cut_anywhere_keeps_every_disk_and_its_change_ids(torn: bool) -> None:
    base, before = _version1()
    cut_at = 1
    while True:
        fs = _after_cut(base, cut_at, torn)
        try:
            _start(fs)  # left open: the power goes before it would close
        except PowerLoss:
            fs.restart()
            _check_upgraded(fs, before)
            cut_at += 1
            continue
        fs.cut_at = 0  # it returned: the power lost now (the host never closed) takes nothing
        fs.power_loss()
        fs.restart()
        _check_upgraded(fs, before)
        break
    assert cut_at > len(V1_DISKS), "the upgrade should pass through many durability points"


def _vm_with_disks(snapshot: bool) -> PowerCutFileIO:
    """A host's data directory: disks a and b with data, the VM vm of both (and its snapshot
    s1), all durable."""
    fs = PowerCutFileIO(0)
    fs.makedirs("/sim")
    registry = _start(fs)
    for name in ("a", "b"):
        disk = registry.create(name, SIZE, GRANULARITY)
        disk.pwrite(name.encode() * 5000, 1000)
        disk.flush()
    registry.define_vm("vm", ["a", "b"])
    if snapshot:
        registry.vm_snapshot("vm", "s1")
    registry.close()
    return fs


@pytest.mark.parametrize("torn", [False, True], ids=["unsynced lost", "unsynced torn"])
@pytest.mark.parametrize("removing", [False, True], ids=["take", "remove"])
def test_a_vm_snapshot_cut_anywhere_is_on_every_disk_or_on_none(removing: bool,
                                                               torn: bool) -> None:
    """A VM snapshot taken, or removed, while the power goes: after the restart the snapshot
    is on both disks of the VM or on neither (the kill sweep checks the same for a killed
    host), and each disk holds what was written."""
    base = _vm_with_disks(snapshot=removing)
    cut_at = 1
    while True:
        fs = _after_cut(base, cut_at, torn)
        try:
            registry = _start(fs)
            if removing:
                registry.vm_remove_snapshot("vm", "s1")
            else:
                registry.vm_snapshot("vm", "s1")
        except PowerLoss:
            fs.restart()
            done = False
        else:
            fs.cut_at = 0
            fs.power_loss()  # the host never closed: what returned must be durable
            fs.restart()
            done = True
        registry = _start(fs)
        try:
            having = [d for d in ("a", "b")
                      if "s1" in {s.name for s in registry.get(d).snapshots}]
            assert having in ([], ["a", "b"]), f"cut {cut_at}: the VM snapshot is on {having}"
            if done:
                assert having == ([] if removing else ["a", "b"]), f"cut {cut_at}"
            for name in ("a", "b"):
                assert registry.get(name).pread(5000, 1000) == name.encode() * 5000
        finally:
            registry.close()
        if done:
            break
        cut_at += 1
    assert cut_at > 3, f"only {cut_at - 1} durability operations"
