"""The write-intent bitmap: a coarse, durable record of regions that may hold unrecorded writes.

Like md's write-intent bitmap: before a write's data may reach a layer, the bit of every region it
touches is durable. After a crash every granule of a set region counts as changed, so the tracker
over-reports a little and never misses. Bits are cleared only after a checkpoint made the fine
marks durable.
"""

from __future__ import annotations

import errno
import struct
import threading

from blocktrail.errors import CorruptMetadata, UnsupportedFormat
from blocktrail.fileio import FileHandle, FileIO

MAGIC = b"BTINTENT"
VERSION = 1
HEADER_BYTES = 4096
_HEADER = struct.Struct("<8sII Q")
MAX_REGIONS = 16384
FEW_REGIONS = 64  # a small disk gets about this many regions...
REGION_BYTES = 64 << 20  # ...of at most md's default bitmap chunk, before MAX_REGIONS applies
# The bitmap's bytes are written (allocated) when the file is made: setting a bit later changes
# no file size or block map, so its fdatasync commits no file system metadata. (On ext4 such a
# commit would also write back every data block newly allocated to a layer file: ms, not µs.)
FULL_BYTES = HEADER_BYTES + MAX_REGIONS // 8
# A sync for a region also sets the bits of the regions after it (inside the disk): a writer
# going on in order finds them durable and does not wait, so a sequential write of 4 GiB costs 16
# syncs, not 64. After a crash those regions count as changed too (written or not).
AHEAD_REGIONS = 3


def region_bytes_for(size_bytes: int, granularity: int) -> int:
    """A power of two ≥ granularity: about size/64 on a small disk, 64 MiB from 4 GiB on, and
    coarser still where MAX_REGIONS would not cover the disk. Coarse regions cost few
    fdatasyncs (one per region first written since a checkpoint, which sets the next
    `AHEAD_REGIONS` too: 16 per 4 GiB written in a row); after a crash every granule of a set
    region counts as changed."""
    region = granularity
    while region < REGION_BYTES and region * FEW_REGIONS < size_bytes:
        region *= 2
    while region * MAX_REGIONS < size_bytes:
        region *= 2
    return region


class IntentLog:
    """Thread-safe: concurrent writers share the syncs (group commit). A writer whose region is
    being synced by another waits for that sync instead of starting its own."""

    def __init__(self, handle: FileHandle, region_bytes: int, set_regions: set[int]) -> None:
        self._handle = handle
        self.region_bytes = region_bytes
        self._durable = set(set_regions)  # regions whose bit is durable on disk
        self._syncing: set[int] = set()  # written, their fsync under way
        self._cond = threading.Condition(threading.Lock())
        self.fsync_count = 0

    @classmethod
    def create(cls, fileio: FileIO, path: str, region_bytes: int) -> IntentLog:
        header = _HEADER.pack(MAGIC, VERSION, 0, region_bytes).ljust(FULL_BYTES, b"\0")
        fileio.replace_atomic(path, header)
        return cls(fileio.open(path), region_bytes, set())

    @classmethod
    def load(cls, fileio: FileIO, path: str, region_bytes: int) -> IntentLog:
        """Open an existing log; `CorruptMetadata` if it cannot be trusted."""
        data = fileio.read_file(path)
        if len(data) < HEADER_BYTES:
            raise CorruptMetadata(f"{path}: truncated write-intent bitmap")
        magic, version, _zero, stored_region = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise CorruptMetadata(f"{path}: not a write-intent bitmap")
        if version != VERSION:
            raise UnsupportedFormat(f"{path}: write-intent bitmap version {version}")
        if stored_region != region_bytes:
            raise CorruptMetadata(f"{path}: region size {stored_region} != {region_bytes}")
        regions: set[int] = set()
        for index, byte in enumerate(data[HEADER_BYTES:]):
            if byte:
                regions.update(index * 8 + bit for bit in range(8) if byte >> bit & 1)
        handle = fileio.open(path)
        if len(data) < FULL_BYTES:  # written before the bitmap was preallocated
            handle.pwrite(bytes(FULL_BYTES - len(data)), len(data))
            handle.fsync()
        return cls(handle, region_bytes, regions)

    @property
    def set_regions(self) -> frozenset[int]:
        return frozenset(self._durable)

    def covers(self, offset: int, length: int) -> bool:
        """Whether every region the range touches is durable already (`ensure` would not sync)."""
        first = offset // self.region_bytes
        last = (offset + max(length, 1) - 1) // self.region_bytes
        durable = self._durable
        if first == last:  # nearly every write
            return first in durable
        return all(r in durable for r in range(first, last + 1))

    def ensure(self, offset: int, length: int, disk_bytes: int | None = None) -> None:
        """Make the bits of every region touched by the range durable (one fsync at most, and
        none when another writer's sync already covers them). A sync this call makes sets the
        bits of the `AHEAD_REGIONS` regions after the range too, those before ``disk_bytes``."""
        first = offset // self.region_bytes
        last = (offset + max(length, 1) - 1) // self.region_bytes
        durable = self._durable  # bits are only added while writers run (clear is exclusive)
        if first == last and first in durable:
            return
        regions = range(first, last + 1)
        with self._cond:
            missing = [r for r in regions if r not in self._durable]
            if not missing:
                return
            mine = [r for r in missing if r not in self._syncing]
            if mine:
                end = min(MAX_REGIONS, last + 1 + AHEAD_REGIONS)
                if disk_bytes is not None:
                    end = min(end, -(-disk_bytes // self.region_bytes))
                mine += [r for r in range(last + 1, end)
                         if r not in self._durable and r not in self._syncing]
                # Written under the lock, so a byte on disk only ever gains bits; synced outside
                # it, so writers in other regions do not wait for this fsync.
                self._syncing.update(mine)
                try:
                    for byte_index in sorted({r // 8 for r in mine}):
                        value = 0
                        for bit in range(8):
                            region = byte_index * 8 + bit
                            if region in self._durable or region in self._syncing:
                                value |= 1 << bit
                        self._handle.pwrite(bytes([value]), HEADER_BYTES + byte_index)
                except BaseException:
                    self._syncing.difference_update(mine)
                    self._cond.notify_all()
                    raise
        if mine:
            synced = False
            try:
                self._handle.fsync()
                synced = True
            finally:
                with self._cond:
                    self._syncing.difference_update(mine)
                    if synced:
                        self._durable.update(mine)
                        self.fsync_count += 1
                    self._cond.notify_all()
        with self._cond:
            while True:
                if all(r in self._durable for r in missing):
                    return
                if not any(r in self._syncing for r in missing if r not in self._durable):
                    raise OSError(errno.EIO, "another writer's sync of the write-intent "
                                             "bitmap failed")
                self._cond.wait()

    def clear(self) -> None:
        """Clear every bit; call only once the fine marks are durable elsewhere, with no writer
        marking (the disk holds its lock exclusively)."""
        with self._cond:
            if not self._durable:
                return
            top = max(self._durable) // 8 + 1
            self._handle.pwrite(bytes(top), HEADER_BYTES)
            self._handle.fsync()
            self._durable.clear()

    def close(self) -> None:
        self._handle.close()
