"""The disks a host owns: DIR/NAME is the disk NAME, opened once, exclusively; VMs are named
groups of disks whose snapshots are taken at one instant."""

from __future__ import annotations

import json
import os
import re
import stat
import threading
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

from blocktrail.disk import Disk, Snapshot
from blocktrail.disk.importer import import_raw
from blocktrail.errors import (
    DiskExists,
    DiskNotFound,
    InvalidArgument,
    SnapshotNotFound,
    VmNotFound,
)
from blocktrail.fileio import OsFileIO

NAME_PATTERN = "[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_NAME = re.compile(NAME_PATTERN)
VMS_FILE = "vms.json"
# Files of the registry's own in DIR, never disk names.
_RESERVED = frozenset({VMS_FILE, VMS_FILE + ".tmp"})


def check_name(kind: str, name: str) -> str:
    if not _NAME.fullmatch(name):
        raise InvalidArgument(f"invalid {kind} name {name!r}: 1-64 of A-Z a-z 0-9 . _ -, "
                              "starting with a letter or digit")
    return name


def check_disk_name(name: str) -> str:
    check_name("disk", name)
    if name in _RESERVED:
        raise InvalidArgument(f"{name!r} is reserved for the host's own files; "
                              "choose another disk name")
    return name


def check_import_source(path: str) -> str:
    """``path`` names a regular file: anything else (a directory, a device, a FIFO that would
    block the host) is refused before it is opened."""
    if "\0" in path or not os.path.isabs(path):
        raise InvalidArgument(f"import source {path!r} must be an absolute path on the host")
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise InvalidArgument(f"cannot import {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(mode):
        raise InvalidArgument(f"cannot import {path}: not a regular file (a raw image is one)")
    return path


@dataclass(frozen=True, slots=True)
class Vm:
    name: str
    disks: tuple[str, ...]


class DiskRegistry:
    """Thread-safe; every disk is opened at most once and stays open until `close`."""

    def __init__(self, data_dir: str) -> None:
        self.data_dir = os.path.abspath(data_dir)
        os.makedirs(self.data_dir, exist_ok=True)
        self._disks: dict[str, Disk] = {}
        self._lock = threading.RLock()

    def names(self) -> list[str]:
        return sorted(n for n in os.listdir(self.data_dir)
                      if _NAME.fullmatch(n) and os.path.exists(self._path(n, "disk.json")))

    def get(self, name: str) -> Disk:
        check_disk_name(name)
        with self._lock:
            disk = self._disks.get(name)
            if disk is None:
                if not os.path.exists(self._path(name, "disk.json")):
                    raise DiskNotFound(f"the host has no disk {name!r}")
                disk = self._disks[name] = Disk.open(self._path(name))
            return disk

    def create(self, name: str, size_bytes: int, granularity: int) -> Disk:
        return self._add(name, lambda path: Disk.create(path, size_bytes, granularity))

    def import_raw(self, name: str, source: str, granularity: int) -> Disk:
        check_import_source(source)
        return self._add(name, lambda path: import_raw(source, path, granularity))

    def _add(self, name: str, make: Callable[[str], Disk]) -> Disk:
        check_disk_name(name)
        with self._lock:
            if os.path.exists(self._path(name)):
                raise DiskExists(f"the host already has a disk {name!r}")
            disk = self._disks[name] = make(self._path(name))
            return disk

    # ------------------------------------------------------------------ VMs

    def vms(self) -> list[Vm]:
        with self._lock:
            return [Vm(n, tuple(d)) for n, d in sorted(self._load_vms().items())]

    def vm(self, name: str) -> Vm:
        for vm in self.vms():
            if vm.name == name:
                return vm
        raise VmNotFound(f"the host has no VM {name!r}")

    def define_vm(self, name: str, disks: list[str]) -> Vm:
        check_name("VM", name)
        if not disks or len(set(disks)) != len(disks):
            raise InvalidArgument("a VM needs one or more distinct disks")
        with self._lock:
            for disk in disks:
                self.get(disk)
            vms = self._load_vms()
            vms[name] = list(disks)
            OsFileIO().replace_atomic(self._path(VMS_FILE), json.dumps(vms, indent=2).encode())
            return Vm(name, tuple(disks))

    def vm_snapshot(self, vm_name: str, snapshot: str) -> list[tuple[str, Snapshot]]:
        """Snapshot every disk of the VM at one instant: I/O to all of them is held off while
        the snapshots are taken; if one fails, the others are removed again."""
        vm = self.vm(vm_name)
        disks = [(name, self.get(name)) for name in sorted(vm.disks)]
        taken: list[tuple[str, Snapshot]] = []
        with ExitStack() as stack:
            for _, disk in disks:
                stack.enter_context(disk.io_paused())
            try:
                for name, disk in disks:
                    taken.append((name, disk.create_snapshot(snapshot)))
            except BaseException:
                for name, _snap in taken:
                    self.get(name).remove_snapshot(snapshot)
                raise
        return taken

    def vm_remove_snapshot(self, vm_name: str, snapshot: str) -> None:
        vm = self.vm(vm_name)
        missing = [d for d in vm.disks if all(s.name != snapshot for s in self.get(d).snapshots)]
        if len(missing) == len(vm.disks):
            raise SnapshotNotFound(f"VM {vm_name!r} has no snapshot {snapshot!r}")
        for name in vm.disks:
            if name not in missing:
                self.get(name).remove_snapshot(snapshot)

    def close(self) -> None:
        with self._lock:
            for disk in self._disks.values():
                disk.close()
            self._disks.clear()

    def _load_vms(self) -> dict[str, list[str]]:
        path = self._path(VMS_FILE)
        if not os.path.exists(path):
            return {}
        with open(path, "rb") as f:
            return {str(k): [str(d) for d in v] for k, v in json.load(f).items()}

    def _path(self, *parts: str) -> str:
        return os.path.join(self.data_dir, *parts)
