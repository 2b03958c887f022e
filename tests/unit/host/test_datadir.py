"""The host's data directory: disks in DATA/disks/NAME apart from the host's own files, one
host at a time (DATA/host.lock names the holder), creates that are whole or absent (also when
the file system fills up at any step), and the upgrade of a version 1 directory (disks in
DATA/NAME), which keeps every disk's change IDs and finishes after an interruption."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from blocktrail.disk import Disk
from blocktrail.disk.importer import BUILDING_PREFIX
from blocktrail.errors import (
    DiskBusy,
    DiskExists,
    DiskIOFailure,
    HostBusy,
    NoSpace,
    StaleChangeId,
    UnsupportedFormat,
)
from blocktrail.fileio import FileHandle, FileLock, OsFileIO
from blocktrail.host.datadir import FORMAT, VERSION
from blocktrail.host.registry import DiskRegistry
from upgradekit import Before, check_disks_kept

MiB = 1 << 20
# Names a disk may have that the host's own entries had (or have) in DATA.
OWN_FILE_NAMES = ("api-token", "lock", "x.tmp", "host.lock", "host.json", "disks", "vms.json",
                  "vms.json.tmp", "disk.json")


def test_disks_live_apart_from_the_hosts_files(tmp_path: Path) -> None:
    data = tmp_path / "data"
    registry = DiskRegistry(str(data))
    try:
        for name in OWN_FILE_NAMES:
            registry.create(name, MiB, 4096).pwrite(name.encode(), 0)
        assert sorted(registry.names()) == sorted(OWN_FILE_NAMES)
        registry.define_vm("vm1", ["api-token", "lock"])
    finally:
        registry.close()
    assert sorted(p.name for p in data.iterdir()) == ["disks", "host.json", "host.lock",
                                                      "vms.json"]
    assert json.loads((data / "host.json").read_text()) == {"format": FORMAT,
                                                            "version": VERSION}
    registry = DiskRegistry(str(data))
    try:
        for name in OWN_FILE_NAMES:
            assert registry.get(name).pread(len(name), 0) == name.encode()
        assert registry.vm("vm1").disks == ("api-token", "lock")
    finally:
        registry.close()


def test_a_second_registry_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    first = DiskRegistry(str(tmp_path / "data"), api="unix:/run/first.sock")
    try:
        with pytest.raises(HostBusy) as refused:
            DiskRegistry(str(tmp_path / "data"), api="unix:/run/second.sock")
        message = refused.value.message
        assert f"pid {os.getpid()}" in message and "API unix:/run/first.sock" in message
        assert "since 20" in message
    finally:
        first.close()
    DiskRegistry(str(tmp_path / "data")).close()  # free again


def test_a_host_in_another_process_is_named(tmp_path: Path) -> None:
    data = tmp_path / "data"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from blocktrail.host.registry import DiskRegistry\n"
         f"r = DiskRegistry({str(data)!r}, api='tcp:elsewhere:1')\n"
         "print('ready', flush=True)\n"
         "sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        with pytest.raises(HostBusy, match=f"pid {holder.pid}, API tcp:elsewhere:1"):
            DiskRegistry(str(data))
    finally:
        holder.communicate("")
    DiskRegistry(str(data)).close()


# ---------------------------------------------------------------- whole or absent: creates

class FullAt(OsFileIO):
    """The file system fills up at the ``at``-th change (a create, write, rename, ...)."""

    def __init__(self, at: int) -> None:
        self.at, self.count = at, 0

    def tick(self) -> None:
        self.count += 1
        if self.count == self.at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def open(self, path: str, *, create: bool = False) -> FileHandle:
        if create:
            self.tick()
        return _FullHandle(super().open(path, create=create), self)

    def replace_atomic(self, path: str, data: bytes | bytearray) -> None:
        self.tick()
        super().replace_atomic(path, data)

    def rename(self, src: str, dst: str) -> None:
        self.tick()
        super().rename(src, dst)

    def makedirs(self, path: str) -> None:
        self.tick()
        super().makedirs(path)

    def lock_exclusive(self, path: str) -> FileLock:
        self.tick()
        return super().lock_exclusive(path)


class _FullHandle:
    def __init__(self, inner: FileHandle, fs: FullAt) -> None:
        self._inner, self._fs = inner, fs

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def pwrite(self, data: bytes | bytearray, offset: int) -> None:
        self._fs.tick()
        self._inner.pwrite(data, offset)

    def truncate(self, size: int) -> None:
        self._fs.tick()
        self._inner.truncate(size)


def test_a_create_is_whole_or_absent_wherever_the_file_system_fills_up(
        tmp_path: Path) -> None:
    raw = tmp_path / "image.raw"
    raw.write_bytes(os.urandom(3 * MiB))
    for kind in ("create", "import"):
        at = 0
        while True:
            at += 1
            data = tmp_path / f"{kind}-{at}"
            DiskRegistry(str(data)).close()
            fileio = FullAt(at=10**9)
            registry = DiskRegistry(str(data), fileio=fileio)
            fileio.at = fileio.count + at
            try:
                if kind == "create":
                    registry.create("d0", 2 * MiB, 4096)
                else:
                    registry.import_raw("d0", str(raw), 4096)
            except (NoSpace, DiskIOFailure) as exc:
                # Disk.create reports ENOSPC while taking its lock as an I/O failure
                assert "full" in exc.message or "No space left" in exc.message
                assert registry.names() == [], at
                assert sorted(os.listdir(data / "disks")) == [], at
                registry.close()
                continue
            fileio.at = 0  # the create got through: the file system has room again
            registry.close()
            break
        assert at > 5, f"{kind}: the sweep reached only {at} steps"
        with Disk.open(data / "disks" / "d0") as disk:  # the one that got through is whole
            if kind == "import":
                assert disk.pread(3 * MiB, 0) == raw.read_bytes()


def test_leftovers_of_a_killed_create_are_removed_at_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    DiskRegistry(str(data)).close()
    leftover = data / "disks" / f"{BUILDING_PREFIX}d0-12345678"
    Disk.create(leftover, MiB).abandon()  # as a killed create leaves it
    registry = DiskRegistry(str(data))
    try:
        assert not leftover.exists()
        assert registry.names() == []
        registry.create("d0", MiB, 4096)
        with pytest.raises(DiskExists):
            registry.create("d0", MiB, 4096)
    finally:
        registry.close()


# ---------------------------------------------------------------- the upgrade from version 1

V1_DISKS = ("d0", "api-token", "disks", "host.json", "host.lock", "x.tmp")


def _version1(data: Path) -> Before:
    """A version 1 data directory: disks in DATA/NAME, with writes and snapshots; -> per disk
    (the change ID of its snapshot, its current change ID, its content)."""
    data.mkdir()
    out = {}
    for name in V1_DISKS:
        with Disk.create(data / name, 2 * MiB, 4096) as disk:
            disk.pwrite(name.encode() * 100, 0)
            snap = disk.create_snapshot("s1")
            disk.pwrite(b"after", MiB)
            out[name] = (snap.change_id, disk.current_change_id, disk.pread(2 * MiB, 0))
    (data / "vms.json").write_text(json.dumps({"vm1": ["d0", "api-token"]}))
    (data / "api-token").with_name("notes.txt").write_text("not a disk")
    return out


def _check_upgraded(data: Path, before: Before) -> None:
    registry = DiskRegistry(str(data))
    try:
        check_disks_kept(registry, before, (MiB, 4096))
        assert registry.vm("vm1").disks == ("d0", "api-token")
    finally:
        registry.close()
    assert sorted(p.name for p in data.iterdir()) == [
        "disks", "host.json", "host.lock", "notes.txt", "vms.json"]


def test_a_version_1_directory_is_upgraded_and_keeps_its_change_ids(tmp_path: Path) -> None:
    data = tmp_path / "data"
    before = _version1(data)
    _check_upgraded(data, before)
    _check_upgraded(data, before)  # and once is enough


class KilledAfter(OsFileIO):
    """A process killed after its ``renames``-th rename (the rest of the upgrade not done)."""

    def __init__(self, renames: int) -> None:
        self.left = renames

    def rename(self, src: str, dst: str) -> None:
        if self.left == 0:
            raise KeyboardInterrupt("killed")
        self.left -= 1
        super().rename(src, dst)


@pytest.mark.parametrize("renames", range(len(V1_DISKS) + 3))
def test_an_interrupted_upgrade_is_finished_by_the_next_start(tmp_path: Path,
                                                              renames: int) -> None:
    data = tmp_path / "data"
    before = _version1(data)
    try:
        DiskRegistry(str(data), fileio=KilledAfter(renames)).close()
    except KeyboardInterrupt:
        assert not (data / "host.json").is_file()  # written last
    _check_upgraded(data, before)


def test_an_upgrade_stops_at_a_disk_open_elsewhere(tmp_path: Path) -> None:
    data = tmp_path / "data"
    before = _version1(data)
    holder = Disk.open(data / "x.tmp")  # an older host still serving it
    try:
        with pytest.raises(DiskBusy, match=r"x\.tmp"):
            DiskRegistry(str(data))
        assert (data / "x.tmp" / "disk.json").exists()
        assert not (data / "host.json").exists()
    finally:
        holder.close()
    _check_upgraded(data, before)


def test_a_newer_or_foreign_directory_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    DiskRegistry(str(data)).close()
    (data / "host.json").write_text(json.dumps({"format": FORMAT, "version": VERSION + 1}))
    with pytest.raises(UnsupportedFormat, match="newer blocktrail"):
        DiskRegistry(str(data))
    (data / "host.json").write_text(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(UnsupportedFormat, match="not a blocktrail host"):
        DiskRegistry(str(data))


def test_a_copied_disk_still_restarts_its_epoch(tmp_path: Path) -> None:
    """The upgrade moves disks (their files keep their identity); a copy would not (the seal
    still catches that: the move is not what keeps change IDs, the unchanged files are)."""
    data = tmp_path / "data"
    before = _version1(data)
    _check_upgraded(data, before)
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(data / "disks" / "d0"), str(copy)], check=True)
    with Disk.open(copy) as disk, pytest.raises(StaleChangeId):
        disk.query_changed_areas(before["d0"][0])
