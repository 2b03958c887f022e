"""Every crash point of what the host does to its data directory, swept (crashpoints.sweep):
creating and importing a disk, upgrading a version 1 data directory, defining a VM, taking and
removing a VM's snapshot. After each kill a new registry (what the restarted host makes) must
open the data directory, and it must be in the state before or after the operation: a disk whole
or absent (and its name free again), every disk of an upgrade present with its change IDs still
answered, a VM snapshot on every disk of the VM or on none.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from blocktrail.disk import Disk
from blocktrail.host.registry import DiskRegistry

sys.path.insert(0, str(Path(__file__).parent))
from crashpoints import Reporter, Trial, sweep

SIZE = 256 * 1024
G = 4096
SOURCE = random.Random(3).randbytes(40000) + bytes(30000) + random.Random(4).randbytes(9000)


@dataclass
class Ctx:
    reporter: Reporter
    root: Path
    registry: DiskRegistry | None = None

    @property
    def data(self) -> Path:
        return self.root / "data"


@dataclass
class HostCase:
    name: str
    prepare: Callable[[Ctx], None]
    operate: Callable[[Ctx], None]
    check: Callable[[DiskRegistry, Trial, Ctx], None]


def _registry(c: Ctx) -> None:
    c.registry = DiskRegistry(str(c.data))


def _two_disks(c: Ctx) -> None:
    _registry(c)
    assert c.registry is not None
    for name in ("a", "b"):
        disk = c.registry.create(name, SIZE, G)
        disk.pwrite(name.encode() * 5000, 1000)
        disk.flush()
    c.registry.define_vm("vm", ["a", "b"])


def _v1_layout(c: Ctx) -> None:
    """A version 1 data directory: disks straight in DATA/, one named like a host file."""
    c.data.mkdir(parents=True)
    ids = {}
    for name in ("d0", "api-token", "disks"):
        with Disk.create(c.data / name, SIZE, G) as disk:
            disk.pwrite(name.encode() * 100, 0)
            ids[name] = disk.create_snapshot("s").change_id
            disk.pwrite(b"after", 9000)
    (c.root / "ids.json").write_text(json.dumps(ids))


def _check_create(reg: DiskRegistry, trial: Trial, c: Ctx) -> None:
    names = reg.names()
    assert names in ([], ["d0"]), names
    if names:
        disk = reg.get("d0")
        assert disk.size_bytes == SIZE and disk.pread(SIZE, 0) == bytes(SIZE)
    else:
        assert trial.killed, "the create completed but the disk is missing"
        reg.create("d0", SIZE, G)  # the name is free again
    assert not [n for n in os.listdir(c.data / "disks") if n != "d0"], \
        "a killed create left files the restarted host did not remove"


def _check_import(reg: DiskRegistry, trial: Trial, c: Ctx) -> None:
    names = reg.names()
    assert names in ([], ["d0"]), names
    if names:
        assert reg.get("d0").pread(len(SOURCE), 0) == SOURCE
    else:
        assert trial.killed
        reg.import_raw("d0", str(c.root / "source.raw"), G)
    assert os.listdir(c.data / "disks") == ["d0"]


def _check_upgrade(reg: DiskRegistry, trial: Trial, c: Ctx) -> None:
    ids = json.loads((c.root / "ids.json").read_text())
    assert sorted(reg.names()) == sorted(ids)
    for name, change_id in ids.items():
        disk = reg.get(name)
        assert disk.pread(len(name) * 100, 0) == name.encode() * 100
        assert disk.pread(5, 9000) == b"after"
        areas = disk.query_changed_areas(change_id).changed_areas  # not refused: no new epoch
        assert [(e.offset, e.length) for e in areas] == [(8192, 4096)], (name, areas)
    assert json.loads((c.data / "host.json").read_text())["version"] == 2


def _check_vm_snapshot(reg: DiskRegistry, trial: Trial, c: Ctx) -> None:
    having = [d for d in ("a", "b") if "s1" in {s.name for s in reg.get(d).snapshots}]
    assert having in ([], ["a", "b"]), f"the VM snapshot is on {having} only"
    if not trial.killed:
        assert having == ["a", "b"]


def _check_vm_remove(reg: DiskRegistry, trial: Trial, c: Ctx) -> None:
    having = [d for d in ("a", "b") if "s1" in {s.name for s in reg.get(d).snapshots}]
    assert having in ([], ["a", "b"]), f"the VM snapshot is on {having} only"
    if not trial.killed:
        assert having == []


def _check_vm(reg: DiskRegistry, trial: Trial, c: Ctx) -> None:
    vms = {vm.name: vm.disks for vm in reg.vms()}
    assert vms in ({}, {"vm": ("a", "b")}), vms


def _create(c: Ctx) -> None:
    assert c.registry is not None
    c.registry.create("d0", SIZE, G)


def _import(c: Ctx) -> None:
    assert c.registry is not None
    c.registry.import_raw("d0", str(c.root / "source.raw"), G)


def _vm_snapshot(c: Ctx) -> None:
    assert c.registry is not None
    c.registry.vm_snapshot("vm", "s1")


def _with_vm_snapshot(c: Ctx) -> None:
    _two_disks(c)
    _vm_snapshot(c)


def _vm_remove(c: Ctx) -> None:
    assert c.registry is not None
    c.registry.vm_remove_snapshot("vm", "s1")


def _two_disks_only(c: Ctx) -> None:
    _registry(c)
    assert c.registry is not None
    for name in ("a", "b"):
        c.registry.create(name, SIZE, G)


def _define_vm(c: Ctx) -> None:
    assert c.registry is not None
    c.registry.define_vm("vm", ["a", "b"])


CASES = [
    HostCase("create-disk", _registry, _create, _check_create),
    HostCase("import-disk", _registry, _import, _check_import),
    HostCase("upgrade-v1-data-dir", _v1_layout, _registry, _check_upgrade),
    HostCase("define-vm", _two_disks_only, _define_vm, _check_vm),
    HostCase("vm-snapshot", _two_disks, _vm_snapshot, _check_vm_snapshot),
    HostCase("vm-remove-snapshot", _with_vm_snapshot, _vm_remove, _check_vm_remove),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kill_at_every_crash_point_of_the_host(case: HostCase, tmp_path: Path) -> None:
    root = tmp_path / "trial"

    def prepare(reporter: Reporter) -> Ctx:
        root.mkdir(parents=True, exist_ok=True)
        (root / "source.raw").write_bytes(SOURCE)
        c = Ctx(reporter, root)
        case.prepare(c)
        return c

    def check(trial: Trial) -> None:
        try:
            reg = DiskRegistry(str(root / "data"))  # what the host does when it starts again
            try:
                case.check(reg, trial, Ctx(Reporter(-1), root))
            finally:
                reg.close()
        except AssertionError as exc:
            raise AssertionError(f"{case.name}, killed at mutation {trial.kill_at}: "
                                 f"{exc}") from exc
        finally:
            shutil.rmtree(root, ignore_errors=True)

    result = sweep(prepare, case.operate, check)
    print(f"{case.name}: {result.crash_points} crash points")
    assert result.crash_points >= 2

