"""The disks a host owns: DATA/disks/NAME is the disk NAME (datadir.py), opened once,
exclusively; VMs are named groups of disks whose snapshots are taken at one instant.

A registry is the one owner of its data directory (the host lock, taken at construction), and
every change it makes is whole or absent: a disk is built aside and renamed into place, a VM
file replaced atomically, a VM snapshot taken on every disk or on none.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from blocktrail.disk import Disk, Snapshot
from blocktrail.disk.disk import SourceOpener
from blocktrail.disk.importer import build_disk, import_raw
from blocktrail.disk.restoring import ChunkSource
from blocktrail.errors import (
    BlocktrailError,
    CorruptMetadata,
    DiskBusy,
    DiskExists,
    DiskNotFound,
    InvalidArgument,
    SnapshotExists,
    SnapshotNotFound,
    VmNotFound,
    io_error,
)
from blocktrail.fileio import FileIO, OsFileIO
from blocktrail.host.datadir import DISK_META, open_data_dir
from blocktrail.names import (
    check_disk_name,
    check_snapshot_name,
    check_vm_name,
    is_valid_disk_name,
)


def check_import_source(path: str) -> str:
    """The API's rule for an import source: an absolute path on the host (what kind of file it
    may be is the importer's business)."""
    if "\0" in path or not os.path.isabs(path):
        raise InvalidArgument(f"import source {path!r} must be an absolute path on the host")
    return path


@dataclass(frozen=True, slots=True)
class Vm:
    name: str
    disks: tuple[str, ...]


class DiskRegistry:
    """Thread-safe; every disk is opened at most once and stays open until `close`.

    Constructing one locks the data directory for this process (HostBusy if another host
    serves it), upgrades an older layout and clears what killed creates left; ``api`` is what
    the lock tells a second host about this one. ``chunk_sources`` opens the source of a disk
    restored instantly (what its disk.json records), when the disk is opened."""

    def __init__(self, data_dir: str, *, fileio: FileIO | None = None,
                 api: str = "in-process", chunk_sources: SourceOpener | None = None) -> None:
        self._fileio = fileio or OsFileIO()
        self._chunk_sources = chunk_sources
        self._data, self._host_lock = open_data_dir(data_dir, self._fileio, api)
        self.data_dir = self._data.root
        self._disks: dict[str, Disk] = {}
        self._creating: set[str] = set()
        self._restoring_ids: set[str] = set()  # the disk IDs of restores under way
        self._lock = threading.RLock()
        self._vm_lock = threading.Lock()  # one VM snapshot or removal at a time: one journal
        try:
            self._finish_vm_journal()
        except BaseException:
            self.close()
            raise

    def names(self) -> list[str]:
        with self._lock:
            creating = set(self._creating)
        try:
            entries = self._fileio.listdir(self._data.disks)
        except OSError as exc:
            raise io_error(f"cannot list {self._data.disks}", exc) from exc
        return [n for n in entries if n not in creating and is_valid_disk_name(n)
                and self._fileio.exists(os.path.join(self._data.disk(n), DISK_META))]

    def get(self, name: str) -> Disk:
        check_disk_name(name)
        with self._lock:
            disk = self._disks.get(name)
            if disk is None:
                if name in self._creating:
                    raise DiskBusy(f"the disk {name!r} is being created")
                path = self._data.disk(name)
                if not self._fileio.exists(os.path.join(path, DISK_META)):
                    raise DiskNotFound(f"the host has no disk {name!r}")
                disk = self._disks[name] = Disk.open(path, fileio=self._fileio,
                                                     chunk_sources=self._chunk_sources)
            return disk

    def create(self, name: str, size_bytes: int, granularity: int) -> Disk:
        """A new empty disk: all of it, or (on any failure) nothing."""
        return self._add(name, lambda path: build_disk(
            path, lambda building: Disk.create(building, size_bytes, granularity,
                                               fileio=self._fileio), fileio=self._fileio))

    def import_raw(self, name: str, source: str, granularity: int) -> Disk:
        """A new disk holding the raw image ``source``: all of it, or nothing."""
        check_import_source(source)
        return self._add(name, lambda path: import_raw(source, path, granularity,
                                                       fileio=self._fileio))

    def restore(self, name: str, source: ChunkSource, continues: str | None, *,
                disk_id: str | None, granularity: int,
                successor: Callable[[], ChunkSource] | None = None) -> Disk:
        """A new disk whose content is at once the restore point behind ``source`` (its base
        reads from the source until filled; `Disk.create_restored`): all of it, or nothing.
        It keeps the point's ``disk_id`` and ``continues`` its change ID, unless another disk
        of the host (or one being restored) has that disk ID: then it gets a fresh one and a
        new tracking epoch (its first backup is full), for restore points, their retention
        and leases are per disk ID, and two disks must never share them.
        The disk is opened with ``chunk_sources`` (``source`` serves the build only), or with
        what ``successor`` gives: a source of the same point that goes on with ``source``'s
        open repository (its key derived and its index read once, not again at the guest's
        first read); it is taken before the build closes ``source``."""
        def make(path: str) -> Disk:
            taken: list[ChunkSource] = []

            def create(building: str) -> Disk:
                disk = Disk.create_restored(building, source, continues, disk_id=disk_id,
                                            granularity=granularity, fileio=self._fileio)
                if successor is not None:
                    taken.append(successor())
                return disk

            opened = self._chunk_sources

            def opener(info: dict[str, Any]) -> ChunkSource:
                if (taken and taken[0].describe() == info) or opened is None:
                    return taken.pop()
                return opened(info)

            try:  # opened once, with its source: not opened, closed and opened again
                return build_disk(path, create, fileio=self._fileio,
                                  chunk_sources=opener if successor or opened else None)
            finally:
                for unused in taken:
                    unused.close()

        with self._lock:
            if disk_id is not None and (disk_id in self._restoring_ids
                                        or disk_id in self._disk_ids()):
                disk_id = continues = None
            if disk_id is not None:
                self._restoring_ids.add(disk_id)
        try:
            return self._add(name, make)
        finally:
            if disk_id is not None:
                with self._lock:
                    self._restoring_ids.discard(disk_id)

    def _disk_ids(self) -> set[str]:
        """The disk IDs of the host's disks (a disk that cannot be opened: as its disk.json
        says, if it says)."""
        ids = set()
        for name in self.names():
            try:
                ids.add(self.get(name).disk_id)
            except BlocktrailError:
                try:
                    meta = json.loads(self._fileio.read_file(
                        os.path.join(self._data.disk(name), DISK_META)))
                    ids.add(str(meta["disk_id"]))
                except (OSError, ValueError, KeyError, TypeError):
                    continue
        return ids

    def _add(self, name: str, make: Callable[[str], Disk]) -> Disk:
        check_disk_name(name)
        with self._reserved(name):
            disk = make(self._data.disk(name))
            with self._lock:
                self._disks[name] = disk
            return disk

    @contextmanager
    def _reserved(self, name: str) -> Iterator[None]:
        """The name is taken for a create (which runs without the registry's lock)."""
        with self._lock:
            if name in self._creating or name in self._disks or self._fileio.exists(
                    self._data.disk(name)):
                raise DiskExists(f"the host already has a disk {name!r}")
            self._creating.add(name)
        try:
            yield
        finally:
            with self._lock:
                self._creating.discard(name)

    # ------------------------------------------------------------------ VMs

    def vms(self) -> list[Vm]:
        with self._lock:
            return [Vm(n, tuple(d)) for n, d in sorted(self._load_vms().items())]

    def vm(self, name: str) -> Vm:
        check_vm_name(name)
        for vm in self.vms():
            if vm.name == name:
                return vm
        raise VmNotFound(f"the host has no VM {name!r}")

    def define_vm(self, name: str, disks: list[str]) -> Vm:
        check_vm_name(name)
        for disk in disks:
            check_disk_name(disk)
        if not disks or len(set(disks)) != len(disks):
            raise InvalidArgument("a VM needs one or more distinct disks")
        with self._lock:
            for disk in disks:
                self.get(disk)
            vms = self._load_vms()
            vms[name] = list(disks)
            try:
                self._fileio.replace_atomic(self._data.vms_file,
                                            json.dumps(vms, indent=2).encode())
            except OSError as exc:
                raise io_error(f"cannot write {self._data.vms_file}", exc) from exc
            return Vm(name, tuple(disks))

    def vm_snapshot(self, vm_name: str, snapshot: str) -> list[tuple[str, Snapshot]]:
        """Snapshot every disk of the VM at one instant: I/O to all of them is held off while
        the snapshots are taken; on every disk or on none, also across a crash (a journal names
        the snapshot first; a start finding it removes what was taken)."""
        check_snapshot_name(snapshot)
        vm = self.vm(vm_name)
        disks = [(name, self.get(name)) for name in sorted(vm.disks)]
        taken: list[tuple[str, Snapshot]] = []
        with self._vm_lock, ExitStack() as stack:
            for _, disk in disks:
                stack.enter_context(disk.io_paused())
            for name, disk in disks:  # checked before anything is written
                if any(s.name == snapshot for s in disk.snapshots):
                    raise SnapshotExists(f"disk {name!r} of VM {vm_name!r} already has a "
                                         f"snapshot {snapshot!r}")
            self._write_vm_journal(snapshot, [name for name, _ in disks])
            try:
                for name, disk in disks:
                    taken.append((name, disk.create_snapshot(snapshot)))
            except BaseException:
                for name, _snap in taken:
                    self.get(name).remove_snapshot(snapshot)
                self._clear_vm_journal()
                raise
            self._clear_vm_journal()
        return taken

    def vm_remove_snapshot(self, vm_name: str, snapshot: str) -> None:
        """Remove the VM's snapshot from every disk that has it; a removal cut short by a crash
        is finished at the next start (a journal names it first)."""
        check_snapshot_name(snapshot)
        vm = self.vm(vm_name)
        with self._vm_lock:
            having = [d for d in sorted(vm.disks)
                      if any(s.name == snapshot for s in self.get(d).snapshots)]
            if not having:
                raise SnapshotNotFound(f"VM {vm_name!r} has no snapshot {snapshot!r}")
            self._write_vm_journal(snapshot, having)
            for name in having:
                self.get(name).remove_snapshot(snapshot)
            self._clear_vm_journal()

    # ------------------------------------------------------------------ the VM journal

    def _write_vm_journal(self, snapshot: str, disks: list[str]) -> None:
        """Before a VM snapshot is taken or removed: which snapshot, on which disks. Whichever
        it was, a start that finds the journal removes that snapshot from those disks (taking
        it is undone, removing it is finished), so it ends on all of them or on none."""
        doc = {"remove_snapshot": snapshot, "from_disks": disks}
        try:
            self._fileio.replace_atomic(self._data.vm_journal, json.dumps(doc).encode())
        except OSError as exc:
            raise io_error(f"cannot write {self._data.vm_journal}", exc) from exc

    def _clear_vm_journal(self) -> None:
        try:
            self._fileio.unlink(self._data.vm_journal)
            self._fileio.fsync_dir(self._data.root)
        except OSError as exc:
            raise io_error(f"cannot remove {self._data.vm_journal}", exc) from exc

    def _finish_vm_journal(self) -> None:
        path = self._data.vm_journal
        if not self._fileio.exists(path):
            return
        try:
            doc = json.loads(self._fileio.read_file(path))
            snapshot, disks = str(doc["remove_snapshot"]), [str(d) for d in doc["from_disks"]]
        except OSError as exc:
            raise io_error(f"cannot read {path}", exc) from exc
        except (ValueError, TypeError, KeyError) as exc:
            raise CorruptMetadata(f"{path} is damaged ({exc}): it names a VM snapshot that "
                                  "was being taken or removed; remove the file and check the "
                                  "VM's disks' snapshots by hand") from None
        present = set(self.names())
        for name in disks:
            if name in present:
                disk = self.get(name)
                if any(s.name == snapshot for s in disk.snapshots):
                    disk.remove_snapshot(snapshot)
        self._clear_vm_journal()

    def close(self) -> None:
        """Close every disk cleanly, then give up the data directory."""
        with self._lock:
            failed: BaseException | None = None
            for disk in self._disks.values():
                try:
                    disk.close()
                except BaseException as exc:  # the others are still closed
                    failed = failed or exc
            self._disks.clear()
            self._host_lock.release()
            if failed is not None:
                raise failed

    def _load_vms(self) -> dict[str, list[str]]:
        path = self._data.vms_file
        if not self._fileio.exists(path):
            return {}
        try:
            doc = json.loads(self._fileio.read_file(path))
            return {str(k): [str(d) for d in v] for k, v in doc.items()}
        except OSError as exc:
            raise io_error(f"cannot read {path}", exc) from exc
        except (ValueError, TypeError, AttributeError) as exc:
            raise CorruptMetadata(f"{path} is damaged ({exc}); define the VMs again") from None
