"""The host's data directory: its layout, the lock of the host that serves it, and the upgrade
of an older layout (docs/operations.md, "The host's data directory").

    DATA/host.json       {"format": "blocktrail-host-data", "version": 2}; written last
    DATA/host.lock       flock'ed by the host serving DATA: its pid, API endpoint, start time
    DATA/api-token       the API's bearer token (an API on TCP)
    DATA/vms.json        the VMs
    DATA/vm-journal.json a VM snapshot being taken or removed (undone or finished at start)
    DATA/disks/NAME/     the disk NAME
    DATA/disks/.creating-NAME-RANDOM/   a disk being built (what a killed create leaves)

Version 1 (no host.json) kept each disk directly in ``DATA/NAME/``, next to the host's own
files, so a disk could be named like one of them. At start, under the host lock, every such disk
is moved into ``DATA/disks/`` (its own lock taken first: a disk still open elsewhere stops the
start), the directories are made durable, and host.json is written last: a start killed midway
is finished by the next one. Moving keeps the disks' files as they are, so tracking goes on.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from blocktrail.disk.importer import BUILDING_PREFIX, remove_building
from blocktrail.errors import (
    CorruptMetadata,
    DiskBusy,
    DiskExists,
    HostBusy,
    UnsupportedFormat,
    io_error,
)
from blocktrail.fileio import FileIO, FileLock
from blocktrail.host.endpoint import TOKEN_FILE
from blocktrail.names import is_valid_disk_name

FORMAT = "blocktrail-host-data"
VERSION = 2
FORMAT_FILE = "host.json"
LOCK_FILE = "host.lock"
VMS_FILE = "vms.json"
VM_JOURNAL_FILE = "vm-journal.json"  # a VM snapshot being taken or removed on its disks
DISKS_DIR = "disks"
DISK_META = "disk.json"  # what makes a directory a disk (disk-format.md)
DISK_LOCK = "lock"
# Version 1 disks whose names the host's own entries take, moved aside before the upgrade.
_ASIDE = ".v1-disk."


@dataclass(frozen=True, slots=True)
class DataDir:
    """Where everything is in the data directory ``root`` (an absolute path)."""

    root: str

    @property
    def disks(self) -> str:
        return os.path.join(self.root, DISKS_DIR)

    @property
    def format_file(self) -> str:
        return os.path.join(self.root, FORMAT_FILE)

    @property
    def lock_file(self) -> str:
        return os.path.join(self.root, LOCK_FILE)

    @property
    def token_file(self) -> str:
        return os.path.join(self.root, TOKEN_FILE)

    @property
    def vms_file(self) -> str:
        return os.path.join(self.root, VMS_FILE)

    @property
    def vm_journal(self) -> str:
        return os.path.join(self.root, VM_JOURNAL_FILE)

    def disk(self, name: str) -> str:
        return os.path.join(self.disks, name)


class HostLock:
    """The flock on DATA/host.lock that makes one host the owner of DATA. The file holds the
    owner's pid, API endpoint and start time, so a second host can say who serves DATA."""

    def __init__(self, lock: FileLock) -> None:
        self._lock: FileLock | None = lock

    @classmethod
    def acquire(cls, data: DataDir, fileio: FileIO, api: str) -> HostLock:
        try:
            lock = fileio.lock_exclusive(data.lock_file)
        except BlockingIOError:
            raise HostBusy(f"{data.root} is served by another blocktrail host "
                           f"({_holder(fileio, data)}); stop it first, or give this host "
                           "another --data directory") from None
        except OSError as exc:
            raise io_error(f"cannot lock {data.lock_file}", exc) from exc
        held = cls(lock)
        try:
            holder = {"pid": os.getpid(), "api": api,
                      "since": datetime.now(UTC).isoformat(timespec="seconds")}
            handle = fileio.open(data.lock_file)  # in place: the lock is on this inode
            try:
                handle.truncate(0)
                handle.pwrite(json.dumps(holder).encode() + b"\n", 0)
                handle.fsync()
            finally:
                handle.close()
        except OSError as exc:
            held.release()
            raise io_error(f"cannot write {data.lock_file}", exc) from exc
        except BaseException:
            held.release()
            raise
        return held

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _holder(fileio: FileIO, data: DataDir) -> str:
    try:
        info: Any = json.loads(fileio.read_file(data.lock_file))
        return f"pid {int(info['pid'])}, API {info['api']}, since {info['since']}"
    except (OSError, ValueError, TypeError, KeyError):  # the holder is still writing it
        return "pid unknown: it has just started"


def open_data_dir(root: str, fileio: FileIO, api: str) -> tuple[DataDir, HostLock]:
    """Lock the data directory ``root`` for this host (HostBusy if another host serves it),
    upgrade an older layout, and remove what killed creates left behind."""
    data = DataDir(os.path.abspath(root))
    try:
        fileio.makedirs(data.root)
    except OSError as exc:
        raise io_error(f"cannot create the data directory {data.root}", exc) from exc
    _move_aside(fileio, data, LOCK_FILE)  # a version 1 disk named host.lock
    lock = HostLock.acquire(data, fileio, api)
    try:
        if _version(fileio, data) < VERSION:
            _upgrade(fileio, data)
        _remove_leftovers(fileio, data)
    except OSError as exc:
        lock.release()
        raise io_error(f"cannot prepare the data directory {data.root}", exc) from exc
    except BaseException:
        lock.release()
        raise
    return data, lock


def _version(fileio: FileIO, data: DataDir) -> int:
    """1: no host.json (or a version 1 disk of that name)."""
    path = data.format_file
    if not fileio.exists(path) or _is_disk(fileio, path):
        return 1
    try:
        doc = json.loads(fileio.read_file(path))
        kind, version = doc["format"], doc["version"]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CorruptMetadata(f"{path} is damaged ({exc}); it should read "
                              f'{{"format": "{FORMAT}", "version": {VERSION}}}') from None
    if kind != FORMAT or not isinstance(version, int):
        raise UnsupportedFormat(f"{data.root} is not a blocktrail host's data directory "
                                f"({path} says {kind!r})")
    if version > VERSION:
        raise UnsupportedFormat(f"{data.root} was written by a newer blocktrail (host data "
                                f"version {version}; this one knows up to {VERSION})")
    return version


def _upgrade(fileio: FileIO, data: DataDir) -> None:
    """Version 1 -> 2: every disk from DATA/NAME to DATA/disks/NAME, host.json last."""
    for name in (DISKS_DIR, FORMAT_FILE):
        _move_aside(fileio, data, name)
    fileio.makedirs(data.disks)
    fileio.fsync_dir(data.root)
    for entry in fileio.listdir(data.root):
        name = entry.removeprefix(_ASIDE)
        if name != entry or (is_valid_disk_name(name)
                             and _is_disk(fileio, os.path.join(data.root, entry))):
            _move_disk(fileio, os.path.join(data.root, entry), data.disk(name))
    fileio.fsync_dir(data.disks)
    fileio.fsync_dir(data.root)
    doc = {"format": FORMAT, "version": VERSION}
    fileio.replace_atomic(data.format_file, (json.dumps(doc) + "\n").encode())


def _move_aside(fileio: FileIO, data: DataDir, name: str) -> None:
    """A version 1 disk named like one of the host's own entries goes to DATA/.v1-disk.NAME
    first (and from there into DATA/disks/NAME)."""
    path = os.path.join(data.root, name)
    if _is_disk(fileio, path):
        _move_disk(fileio, path, os.path.join(data.root, _ASIDE + name))
        fileio.fsync_dir(data.root)


def _move_disk(fileio: FileIO, source: str, target: str) -> None:
    """Rename a disk directory while holding its lock: a disk open in another process (an
    older host still running) is not moved from under it."""
    if fileio.exists(target):
        raise DiskExists(f"cannot upgrade the data directory: both {source} and {target} "
                         "exist; move one of them away, then start the host again")
    try:
        lock = fileio.lock_exclusive(os.path.join(source, DISK_LOCK))
    except BlockingIOError:
        raise DiskBusy(f"cannot upgrade the data directory: the disk {source} is open in "
                       "another process (an older blocktrail host?); stop it, then start the "
                       "host again") from None
    try:
        fileio.rename(source, target)
    finally:
        lock.release()


def _remove_leftovers(fileio: FileIO, data: DataDir) -> None:
    for name in fileio.listdir(data.disks):
        if name.startswith(BUILDING_PREFIX):
            remove_building(fileio, data.disk(name))


def _is_disk(fileio: FileIO, path: str) -> bool:
    return fileio.exists(os.path.join(path, DISK_META))
