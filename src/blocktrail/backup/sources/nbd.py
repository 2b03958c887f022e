"""Any NBD export as a backup source, with an optional QEMU dirty bitmap for incrementals.

    source = NbdExportSource("nbd+unix:///disk0?socket=/run/qemu-nbd.sock", bitmap="bm0")

The export itself is the point in time that is backed up: qemu-nbd serving an image that
nothing writes to, or qemu-storage-daemon / a VM exporting a frozen node (a snapshot overlay's
backing image, or a fleecing node). blocktrail cannot freeze an export it does not own, so
`create_snapshot` returns the export as it is and `remove_snapshot` does nothing: the caller
guarantees that the export does not change while the backup reads it.

Changed areas come from the meta context ``qemu:dirty-bitmap:BITMAP`` (flag 1: dirty). A QEMU
bitmap records every write since it was created (or last cleared); ``bitmap=NAME`` promises
that NAME has recorded every write since the previous backup of this disk (the libvirt
checkpoint / virtnbdbackup model). The change ID stored with a restore point is only a label:
``qemu:dirty-bitmap:NAME`` when the server agreed to that context (the bitmap existed when the
point was taken), else ``nbd:no-dirty-bitmap``; an incremental reads the bitmap named now
(which may be another than the base's: bitmaps rotated at each backup), but never against a
base labelled ``nbd:no-dirty-bitmap``: nothing says a bitmap recorded the writes since then
(one added after that backup did not). When no bitmap is named, the server did not agree to the
context, answers it with an error, or the base has no bitmap label, the query raises
`DirtyBitmapUnavailable` (a ChangeIdError): the engine then reads everything, and says why.

Areas that are dirty but now read as zeros (trimmed, zeroed) are read like any other changed
area: the reply is a hole, the data zeros, and the new restore point holds zeros there.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from blocktrail.backup.source import DirtyBitmapUnavailable, SourceSnapshot
from blocktrail.errors import OutOfRange
from blocktrail.extents import Extent, merge
from blocktrail.nbd.blocking import BlockingNbdClient
from blocktrail.nbd.proto.constants import (
    BASE_ALLOCATION,
    DIRTY_BITMAP_PREFIX,
    STATE_DIRTY,
    STATE_ZERO,
)
from blocktrail.nbd.proto.errors import RequestFailed
from blocktrail.nbd.uri import NbdEndpoint, NbdUri
from blocktrail.tracking import DiskChangeInfo

GRANULARITY = 64 * 1024  # not told over NBD; QEMU's default bitmap granularity for qcow2
NO_BITMAP_LABEL = "nbd:no-dirty-bitmap"
CONNECTIONS = 4  # used only when the server advertises multi-conn


class NbdExportSource:
    """Back up the NBD export ``uri``; incrementals from the dirty bitmap ``bitmap``."""

    def __init__(self, uri: str | NbdUri, *, bitmap: str | None = None,
                 disk_id: str | None = None, connections: int = CONNECTIONS) -> None:
        self._uri = uri if isinstance(uri, NbdUri) else NbdUri.parse(uri)
        self._bitmap = bitmap
        self._context = DIRTY_BITMAP_PREFIX + bitmap if bitmap else None
        self._disk_id = disk_id or default_disk_id(self._uri)
        contexts = [BASE_ALLOCATION] + ([self._context] if self._context else [])
        self._nbd = BlockingNbdClient.connect(self._uri, contexts=contexts,
                                              connections=connections)

    @property
    def disk_id(self) -> str:
        return self._disk_id

    @property
    def granularity(self) -> int:
        return GRANULARITY

    @property
    def change_label(self) -> str:
        """What restore points record as their change ID: the bitmap's context name when the
        server agreed to it, else a label no incremental builds on."""
        if self._context is not None and self._nbd.can_meta_context(self._context):
            return self._context
        return NO_BITMAP_LABEL

    def _snapshot(self, name: str) -> SourceSnapshot:
        return SourceSnapshot(name, self.change_label, self._nbd.size_bytes)

    def create_snapshot(self, name: str) -> SourceSnapshot:
        """The export as it is (see the module's note: the caller keeps it unchanged)."""
        return self._snapshot(name)

    def existing_snapshot(self, name: str) -> SourceSnapshot:
        return self._snapshot(name)

    def remove_snapshot(self, name: str) -> None:
        """Nothing to remove: no snapshot was taken."""

    def query_changed_areas(self, change_id: str, start_offset: int,
                            snapshot: str) -> DiskChangeInfo:
        """Dirty areas of the bitmap named now, from ``start_offset`` (``change_id`` is the base
        point's label: the bitmap's promise covers the time since that point)."""
        if self._context is None:
            raise DirtyBitmapUnavailable(
                "no dirty bitmap was named (--bitmap NAME): an NBD export alone cannot tell what "
                "changed since the last backup")
        if not self._nbd.can_meta_context(self._context):
            raise self._refusal(self._context, "")
        if not change_id.startswith(DIRTY_BITMAP_PREFIX):
            raise DirtyBitmapUnavailable(
                f"the base restore point was backed up without a dirty bitmap (its change "
                f"label is {change_id}): nothing says {self._context} recorded every write "
                "since then")
        return dirty_page(self._nbd, self._context, start_offset, self._refusal)

    def _refusal(self, context: str, why: str) -> DirtyBitmapUnavailable:
        if why:
            return DirtyBitmapUnavailable(f"reading {context} from {self._uri} failed: {why}")
        return DirtyBitmapUnavailable(
            f"the NBD server at {self._uri} did not agree to {context}: the export has no "
            f"bitmap named {self._bitmap!r} (export it with qemu-nbd -B {self._bitmap}, or "
            f"bitmaps.0={self._bitmap} in qemu-storage-daemon's --export)")

    def allocated_areas(self, snapshot: str) -> list[Extent]:
        return allocated_areas(self._nbd)

    def pread(self, snapshot: str, count: int, offset: int) -> bytes:
        return self._nbd.pread(count, offset)

    def snapshot_size(self, snapshot: str) -> int:
        return self._nbd.size_bytes

    def close(self) -> None:
        self._nbd.close()


def default_disk_id(uri: NbdUri) -> str:
    """The export's identity in a repository: its URI in normal form, with an absolute socket
    path and without TLS parameters (the same export over TLS is the same disk)."""
    endpoint = uri.endpoint
    if endpoint.unix_path is not None:
        endpoint = NbdEndpoint(unix_path=os.path.abspath(endpoint.unix_path))
    elif endpoint.host is not None:
        endpoint = NbdEndpoint(host=endpoint.host.lower(), port=endpoint.port)
    return str(NbdUri(endpoint, uri.export))


# (context, why) -> the error for a dirty context that cannot be read; why "": not agreed to
Refusal = Callable[[str, str], DirtyBitmapUnavailable]


def dirty_page(nbd: BlockingNbdClient, context: str, start_offset: int,
               refusal: Refusal) -> DiskChangeInfo:
    """One page of a dirty-bitmap context from ``start_offset``: as much of the export as one
    BLOCK_STATUS answer covers (the caller continues from its end)."""
    if not nbd.can_meta_context(context):
        raise refusal(context, "")
    size = nbd.size_bytes
    if not 0 <= start_offset < size:
        raise OutOfRange(f"offset {start_offset} lies outside the export ({size} bytes)")
    try:
        descriptors = nbd.block_status(size - start_offset, start_offset, context)
    except RequestFailed as exc:
        raise refusal(context, exc.server_message or exc.message) from exc
    dirty: list[Extent] = []
    offset = start_offset
    for length, flags in descriptors:
        if flags & STATE_DIRTY:
            dirty.append(Extent(offset, length))
        offset += length
    return DiskChangeInfo(start_offset, offset - start_offset, merge(dirty))


def allocated_areas(nbd: BlockingNbdClient) -> list[Extent]:
    """Areas ``base:allocation`` does not promise read as zeros (NBD_STATE_ZERO). A hole without
    the zero flag has undefined contents (NBD spec: make no assumption), so it is read like
    data. Without the context, or when it cannot be read, everything counts as allocated:
    reading too much is safe."""
    everything = [Extent(0, nbd.size_bytes)] if nbd.size_bytes else []
    if not nbd.can_meta_context(BASE_ALLOCATION):
        return everything
    try:
        extents = nbd.extents(BASE_ALLOCATION)
    except RequestFailed:
        return everything
    return merge(Extent(o, n) for o, n, flags in extents if not flags & STATE_ZERO)
