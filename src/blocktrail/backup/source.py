"""What the backup engine needs from a disk: the Source protocol.

The engine talks to a disk only the way it would talk to a remote hypervisor: snapshot, changed
areas, allocation, read. A local disk directory, an NBD export plus control API (our host), or a
QEMU export with a dirty bitmap can each stand behind it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from blocktrail.errors import ChangeIdError, DiskIOFailure, InvalidArgument
from blocktrail.extents import Extent
from blocktrail.tracking import DiskChangeInfo


class DirtyBitmapUnavailable(ChangeIdError):
    """The changed areas cannot be read from an NBD dirty bitmap (none was named, the server did
    not agree to the context, or answered it with an error): the backup must read everything."""


@dataclass(frozen=True, slots=True)
class SourceSnapshot:
    """A frozen point of the source disk the backup reads from."""

    name: str
    change_id: str | None  # None: the source has no change tracking
    size_bytes: int


class Source(Protocol):
    """A disk to back up."""

    @property
    def disk_id(self) -> str: ...

    @property
    def granularity(self) -> int: ...

    def create_snapshot(self, name: str) -> SourceSnapshot: ...

    def remove_snapshot(self, name: str) -> None: ...

    def existing_snapshot(self, name: str) -> SourceSnapshot:
        """A snapshot someone else took (a VM snapshot, say), to back up as it is."""
        ...

    def query_changed_areas(self, change_id: str, start_offset: int,
                            snapshot: str) -> DiskChangeInfo:
        """Areas changed after ``change_id`` up to ``snapshot``; raises `ChangeIdError` when
        the change ID cannot be answered (the engine then reads everything)."""
        ...

    def allocated_areas(self, snapshot: str) -> list[Extent]:
        """Areas that may hold anything but zeros (over-reporting is fine; an area left out
        must read as zeros, and is restored as zeros)."""
        ...

    def pread(self, snapshot: str, count: int, offset: int) -> bytes | memoryview: ...

    def snapshot_size(self, snapshot: str) -> int: ...

    def close(self) -> None: ...


def read_exact(source: Source, snapshot: str, count: int, offset: int) -> bytes | memoryview:
    """``source.pread``, all ``count`` bytes or `DiskIOFailure`: a read that came back short
    would have a backup store, or a verify compare, less than the disk holds (the chunks it
    left out would count as holes)."""
    data = source.pread(snapshot, count, offset)
    if len(data) != count:
        raise DiskIOFailure(f"the source returned {len(data)} bytes of the {count} asked at "
                            f"offset {offset} of snapshot {snapshot!r}: nothing of this read "
                            "is used")
    return data


def all_pages(query: Callable[[int], DiskChangeInfo], size_bytes: int) -> list[Extent]:
    """Follow a paged QueryChangedDiskAreas-style answer to the end of the disk. Each answer
    must start where the previous one ended: one that does not would leave a gap of areas never
    asked about (or ask twice), so it fails the backup."""
    out: list[Extent] = []
    start = 0
    while start < size_bytes:
        info = query(start)
        if info.start_offset != start:
            raise InvalidArgument(f"the source answered a page from offset {info.start_offset} "
                                  f"to a query from offset {start}")
        if info.length <= 0:
            raise InvalidArgument(f"the source answered an empty page at offset {start}")
        out.extend(info.changed_areas)
        start = info.end
    return out
