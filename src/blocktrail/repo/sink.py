"""Storing new objects: packs written on background threads, then one index file naming them.

On a local directory one pack is written at a time while the next one waits, filled (so a
moment of slow storage does not stop the backup), and a sink closed before its index file
exists deletes the packs it wrote: no index file names them, so no other writer can know them,
and leaving them would only fill the disk (a full file system is the usual reason a backup
fails there).

On object storage several packs are uploaded at once, and each is followed by a small
**checkpoint** index file naming only it: a backup cut off by a lost connection leaves packs
that an index file names, so the next backup of the disk deduplicates against them instead of
uploading them again. The last pack has none: the index file that names everything the sink
stored follows it at once (`publish`, or the caller's own). Then the checkpoints are deleted,
several at once (each is a round trip). Whatever no restore point comes to use is collected by
`prune`.

With a lease, nothing is uploaded or published once it is lost (repo/leases.py).
"""

from __future__ import annotations

import contextlib
import mmap
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from blocktrail.repo import index as index_file
from blocktrail.repo.backend import BackendError
from blocktrail.repo.leases import Lease
from blocktrail.repo.packs import PACK_TARGET_BYTES, Location, PackBuilder
from blocktrail.repo.store import Store, new_index_name

REMOTE_PACKS_IN_FLIGHT = 4
LOCAL_PACKS_IN_FLIGHT = 2  # one being written, one waiting for it (the objects lock orders them)


class PackSink:
    """Objects in, packs and (at `publish`) one index file out. ``known(name)``: the object
    is stored already (deduplicated, not packed again)."""

    def __init__(self, store: Store, known: Callable[[bytes], bool], *,
                 consequence: str = "nothing was published", lease: Lease | None = None,
                 checkpoint: bool | None = None) -> None:
        self._store = store
        self._known = known
        self._consequence = consequence
        self._lease = lease
        self._checkpoint = store.backend.remote if checkpoint is None else checkpoint
        self._in_flight = REMOTE_PACKS_IN_FLIGHT if store.backend.remote \
            else LOCAL_PACKS_IN_FLIGHT
        self._pack = PackBuilder(store.codec.trailer_key)
        self._new: dict[bytes, Location] = {}  # in packs handed to the pack writers
        self._in_pack: set[bytes] = set()
        self._written: list[str] = []  # pack ids handed to the pack writers
        self._checkpoints: list[str] = []  # index files naming one pack each
        self._checkpointed: set[str] = set()  # packs one of them names
        self._mutex = threading.Lock()
        self._writer = ThreadPoolExecutor(max_workers=self._in_flight,
                                          thread_name_prefix="pack-writer")
        self._writes: deque[tuple[Future[None], mmap.mmap]] = deque()  # with its buffer
        self._spare: list[mmap.mmap] = []  # buffers of packs written: the next packs reuse them
        self._index_name: str | None = None
        self._published = False
        self.bytes_stored = 0

    def holds(self, name: bytes) -> bool:
        return name in self._new or name in self._in_pack

    def stored(self, name: bytes) -> bool:
        """``add`` would not pack it: this sink holds it, or it is stored already. Safe to ask
        from other threads (a chunk sealed meanwhile is packed once all the same: `add`)."""
        return self.holds(name) or self._known(name)

    def add(self, name: bytes, envelope: bytes | bytearray, plain_length: int) -> bool:
        """Pack an object unless it is stored already; -> True if packed."""
        if self.holds(name) or self._known(name):
            return False
        self._pack.add(name, envelope, plain_length)
        self._in_pack.add(name)
        self.bytes_stored += len(envelope)
        if self._pack.size >= PACK_TARGET_BYTES:
            self._hand_over()
        return True

    def _hand_over(self, *, last: bool = False) -> None:
        """Give the full pack to a pack-writing thread (a bounded number in flight), so
        reading, hashing and compressing go on while it is written. The ``last`` pack gets
        no checkpoint: an index file naming it follows at once."""
        if not self._pack.entries:
            return
        while len(self._writes) >= self._in_flight:
            self._wait_one()
        pack, self._pack = self._pack, PackBuilder(
            self._store.codec.trailer_key, self._spare.pop() if self._spare else None)
        locations = pack.locations()
        self._written.append(pack.pack_id)
        self._writes.append((self._writer.submit(self._write, pack.pack_id, pack.finish(),
                                                 locations, self._checkpoint and not last),
                             pack.buffer))
        self._new.update(locations)
        self._in_pack.clear()

    def _wait_one(self) -> None:
        future, data = self._writes.popleft()
        future.result()  # a failed write surfaces here
        self._spare.append(data)

    def _write(self, pack_id: str, data: memoryview, locations: dict[bytes, Location],
               checkpoint: bool) -> None:
        if self._lease is not None:
            self._lease.check(f"upload pack {pack_id}")
        self._store.write_pack(pack_id, data, self._consequence)
        if checkpoint:
            name = new_index_name()
            if self._lease is not None:
                self._lease.check(f"upload index file {name}")
            self._store.write_index(name, index_file.encode(locations), self._consequence)
            with self._mutex:
                self._checkpoints.append(name)
                self._checkpointed.add(pack_id)

    def _wait(self) -> None:
        while self._writes:
            self._wait_one()
        self._spare.clear()

    def finish_packs(self) -> dict[bytes, Location]:
        """Write the last pack and wait until every pack is durable; -> where each object is.
        The caller names them all in an index file next (`publish` does)."""
        self._hand_over(last=True)
        self._wait()
        return dict(self._new)

    def named_elsewhere(self) -> None:
        """The caller wrote an index file naming this sink's packs itself (repair)."""
        self._published = True

    def publish(self) -> dict[bytes, Location]:
        """Every pack durable, then one index file naming their objects (none if no object
        was new); the repository's chunk index learns them. -> the new locations."""
        locations = self.finish_packs()
        if locations:
            self._index_name = new_index_name()
            if self._lease is not None:
                self._lease.check(f"publish index file {self._index_name}")
            self._store.write_index(self._index_name, index_file.encode(locations),
                                    self._consequence)
            self._store.add_locations(locations)
        self._published = True
        # the index file just written names it all; a checkpoint left (a delete failed) only
        # names objects twice, and the next prune merges it away
        for _ in self._store.io_pool.map(self._drop_checkpoint, self._checkpoints):
            pass
        return locations

    def _drop_checkpoint(self, name: str) -> None:
        with contextlib.suppress(BackendError, OSError):
            self._store.delete_index(name)

    def close(self) -> None:
        """Done, or given up: packs being written finish; unless an index file names them
        now, the packs written are deleted again (a checkpointed pack is kept: the next backup
        deduplicates against it)."""
        for future, _ in self._writes:
            future.cancel()
        self._writer.shutdown(wait=True)
        if self._published or not self._written:
            return
        if self._index_name is not None and self._store.index_file_exists(self._index_name):
            # The index file became visible although writing it failed (its directory's fsync
            # did): another writer may already deduplicate against these packs. Keep them;
            # prune collects them if no restore point comes to need them.
            return
        for pack_id in [p for p in self._written if p not in self._checkpointed]:
            with contextlib.suppress(OSError, BackendError):
                self._store.delete_pack(pack_id)
