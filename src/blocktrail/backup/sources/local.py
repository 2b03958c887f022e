"""A local disk directory as a backup source, through Disk's public API only."""

from __future__ import annotations

import os

from blocktrail.backup.source import SourceSnapshot, all_pages
from blocktrail.disk import Disk
from blocktrail.errors import SnapshotNotFound
from blocktrail.extents import Extent
from blocktrail.fileio import DIRECT_MIN_BYTES
from blocktrail.tracking import ALL_ALLOCATED, DiskChangeInfo


class LocalDiskSource:
    """Back up a disk directory (opened here, or a `Disk` the caller already has open)."""

    def __init__(self, disk: Disk | str | os.PathLike[str]) -> None:
        self._owned = not isinstance(disk, Disk)
        self._disk = disk if isinstance(disk, Disk) else Disk.open(disk)

    @property
    def disk_id(self) -> str:
        return self._disk.disk_id

    @property
    def granularity(self) -> int:
        return self._disk.granularity

    @property
    def disk(self) -> Disk:
        return self._disk

    def create_snapshot(self, name: str) -> SourceSnapshot:
        snap = self._disk.create_snapshot(name)
        return SourceSnapshot(snap.name, snap.change_id, snap.size_bytes)

    def existing_snapshot(self, name: str) -> SourceSnapshot:
        snap = next((s for s in self._disk.snapshots if s.name == name), None)
        if snap is None:
            raise SnapshotNotFound(f"disk {self._disk.path} has no snapshot {name!r}")
        return SourceSnapshot(snap.name, snap.change_id, snap.size_bytes)

    def remove_snapshot(self, name: str) -> None:
        self._disk.remove_snapshot(name)

    def query_changed_areas(self, change_id: str, start_offset: int,
                            snapshot: str) -> DiskChangeInfo:
        return self._disk.query_changed_areas(change_id, start_offset, snapshot)

    def allocated_areas(self, snapshot: str) -> list[Extent]:
        size = self._disk.open_snapshot(snapshot).size_bytes
        return all_pages(
            lambda start: self._disk.query_changed_areas(ALL_ALLOCATED, start, snapshot), size)

    def pread(self, snapshot: str, count: int, offset: int) -> bytes | memoryview:
        """A big read (a full backup's runs) goes past the page cache; a small one (an
        incremental's changes, likely still cached as they were just written) through it."""
        view = self._disk.open_snapshot(snapshot)
        if count >= DIRECT_MIN_BYTES:
            return view.pread_direct(count, offset)
        return view.pread(count, offset)

    def snapshot_size(self, snapshot: str) -> int:
        return self._disk.open_snapshot(snapshot).size_bytes

    def close(self) -> None:
        if self._owned:
            self._disk.close()
