"""Writing one restore point: hash and compress chunks on a thread pool, pack them, publish."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from blocktrail import __version__
from blocktrail.errors import InvalidArgument
from blocktrail.fileio import is_zeros
from blocktrail.repo.leases import Lease
from blocktrail.repo.manifest import TABLE_PAGES, RestorePoint
from blocktrail.repo.objects import KIND_CHUNK, KIND_PAGE, KIND_TABLE, ZERO_DIGEST, Buffer, Codec
from blocktrail.repo.sink import PackSink
from blocktrail.repo.store import Store, stamp

BATCH_BYTES = 1 << 20  # chunks sealed per task on the pool: fewer futures, less GIL traffic
MAX_IN_FLIGHT = 8  # batches handed to the pool and not yet packed
Sealed = tuple[bytes, bytes | bytearray | None, int]  # name, envelope (None: nothing to store),
#                                                        plain length


def _seal_chunks(codec: Codec, batch: list[Buffer],
                 stored: Callable[[bytes], bool]) -> list[Sealed]:
    """Name each chunk, then compress and encrypt only what is new: a hole (all zeros: found
    by a compare, three times cheaper than the hash, and not named) and a chunk stored
    already (or earlier in the batch) are not sealed. The pack sink still checks each
    envelope it is given, so a chunk that two batches seal at once is packed once."""
    out: list[Sealed] = []
    new: set[bytes] = set()
    for data in batch:
        if is_zeros(data):
            out.append((ZERO_DIGEST, None, len(data)))
            continue
        name = codec.name(KIND_CHUNK, data)
        if name in new or stored(name):
            out.append((name, None, len(data)))
        else:
            new.add(name)
            out.append((name, codec.seal_named(KIND_CHUNK, name, data), len(data)))
    return out


def check_parent(store: Store, disk_id: str, size_bytes: int,
                 parent: RestorePoint | None) -> None:
    """An incremental inherits its parent's pages for the chunks it does not put: the parent
    must have the same disk, size and page layout, or the point would have holes."""
    if parent is None:
        return
    layout = (parent.disk_id, parent.size_bytes, parent.chunk_size, parent.page_chunks)
    if layout != (disk_id, size_bytes, store.chunk_size, store.page_chunks):
        raise InvalidArgument(
            f"restore point {parent.id} (disk {parent.disk_id}, {parent.size_bytes} bytes, "
            f"{parent.chunk_size}-byte chunks, {parent.page_chunks} per page) cannot be the "
            f"parent of a point of disk {disk_id}, {size_bytes} bytes, {store.chunk_size}-byte "
            f"chunks, {store.page_chunks} per page: take a full backup")


class PointWriter:
    """Collects the chunks of a new restore point; `commit` publishes it.

    Chunks not put come from the parent point (an incremental) or are holes (a full). A writer
    closed without a commit leaves nothing behind but what an index file already names.

    It writes under ``lease`` (the disk's): nothing is uploaded or published once that is lost.
    The new point refers only to objects a new point may refer to (`Store.has_chunk`: not lost,
    not in a pack a garbage collection condemned); a page or table of the parent that is not
    is stored again."""

    def __init__(self, store: Store, disk_id: str, size_bytes: int,
                 parent: RestorePoint | None, lease: Lease, pool: ThreadPoolExecutor, *,
                 release_lease: bool = True) -> None:
        self._repo = store
        self.disk_id = disk_id
        self.size_bytes = size_bytes
        self.parent = parent
        self.lease = lease
        self._release_lease = release_lease
        self._released = False
        self._pool = pool
        self._entries: dict[int, bytes] = {}
        self._batch_indexes: list[int] = []
        self._batch: list[Buffer] = []
        self._batch_bytes = 0
        self._pending: deque[tuple[list[int], Future[list[Sealed]]]] = deque()
        self._sink = PackSink(store, store.has_chunk, lease=lease)
        self._parent_pages: list[str] | None = None
        self.chunks_put = 0
        self.new_chunks = 0

    @property
    def bytes_stored(self) -> int:
        return self._sink.bytes_stored

    def put_chunk(self, index: int, data: Buffer) -> None:
        """Store chunk ``index`` of the disk (all zeros: a hole, nothing stored). ``data`` is
        not copied: it must not change until the commit."""
        self.chunks_put += 1
        self._batch_indexes.append(index)
        self._batch.append(data)
        self._batch_bytes += len(data)
        if self._batch_bytes >= BATCH_BYTES:
            self._submit_batch()

    def put_chunks(self, first: int, data: Buffer) -> None:
        """Store the chunks ``first``, ``first + 1``, ... that ``data`` holds back to back (as
        one read returned them; the last may be short), as one batch of views of it."""
        cs = self._repo.chunk_size
        view = memoryview(data)
        for offset in range(0, len(data), cs):
            self._batch_indexes.append(first + offset // cs)
            self._batch.append(view[offset : offset + cs])
        self.chunks_put += -(-len(data) // cs)
        self._batch_bytes += len(data)
        if self._batch_bytes >= BATCH_BYTES:
            self._submit_batch()

    def _submit_batch(self) -> None:
        if not self._batch:
            return
        self._pending.append((self._batch_indexes, self._pool.submit(
            _seal_chunks, self._repo.codec, self._batch, self._sink.stored)))
        self._batch_indexes, self._batch, self._batch_bytes = [], [], 0
        if len(self._pending) >= MAX_IN_FLIGHT:
            self._drain(MAX_IN_FLIGHT // 2)

    def _drain(self, keep: int) -> None:
        if keep == 0:
            self._submit_batch()
        while len(self._pending) > keep:
            indexes, future = self._pending.popleft()
            for index, (name, envelope, plain_length) in zip(indexes, future.result(),
                                                            strict=True):
                self._entries[index] = name
                if envelope is not None:
                    self.new_chunks += self._sink.add(name, envelope, plain_length)

    def _store(self, kind: int, plain: bytes) -> str:
        """Pack a page or page table; -> its name in hex."""
        name, envelope = self._repo.codec.seal(kind, plain)
        self._sink.add(name, envelope, len(plain))
        return name.hex()

    def commit(self, *, kind: str, change_id: str | None, fallback_reason: str | None = None,
               tracker_trusted: bool = True, audit: dict[str, Any] | None = None,
               stats: dict[str, Any] | None = None) -> RestorePoint:
        """Publish: the last pack (with the new pages and page tables), then the index file,
        then the manifest."""
        try:
            return self._commit(kind=kind, change_id=change_id, fallback_reason=fallback_reason,
                                tracker_trusted=tracker_trusted, audit=audit, stats=stats)
        finally:
            self.close()

    def _commit(self, *, kind: str, change_id: str | None, fallback_reason: str | None,
                tracker_trusted: bool, audit: dict[str, Any] | None,
                stats: dict[str, Any] | None) -> RestorePoint:
        self._drain(0)
        tables = self._build_tables(self._build_pages())  # pages and tables go into packs too
        self._sink.publish()  # every pack is durable before the index file names it
        repo = self._repo
        now = datetime.now(UTC)
        point = RestorePoint(
            id=stamp(),
            disk_id=self.disk_id, size_bytes=self.size_bytes, chunk_size=repo.chunk_size,
            page_chunks=repo.page_chunks, tables=tuple(tables), kind=kind,
            parent=self.parent.id if self.parent else None, change_id=change_id,
            fallback_reason=fallback_reason, created_at=now.isoformat(),
            tool=f"blocktrail {__version__}", tracker_trusted=tracker_trusted,
            audit=audit or {},
            stats={"chunks_put": self.chunks_put, "new_chunks": self.new_chunks,
                   "bytes_stored": self.bytes_stored, **(stats or {})})
        # If this fails, the packs and the index file stay: once the index file exists another
        # backup may already deduplicate against its objects. Nothing references them unless
        # a later point does; prune collects them.
        repo.write_manifest(point, self.lease)
        return point

    def _build_pages(self) -> list[str]:
        repo = self._repo
        cs, pc = repo.chunk_size, repo.page_chunks
        chunks = -(-self.size_bytes // cs)
        count = -(-chunks // pc)
        parent = self.parent  # its layout is this point's (check_parent)
        by_page: dict[int, dict[int, bytes]] = {}
        for index, name in self._entries.items():
            by_page.setdefault(index // pc, {})[index % pc] = name
        parent_pages = self._parent_pages = repo.pages_of(parent) if parent is not None else None
        kept: dict[int, str] = {}  # the parent's pages that stay as they are
        if parent_pages is not None:
            kept = {n: parent_pages[n] for n in range(count) if n not in by_page
                    and repo.has_chunk(bytes.fromhex(parent_pages[n]))}
        # the parent's other pages (changed, or lost), several read at once
        read = repo.point_pages(parent, (n for n in range(count) if n not in kept)) \
            if parent is not None else None
        out: list[str] = []
        for page_no in range(count):
            if page_no in kept:
                out.append(kept[page_no])
                continue
            plain = bytearray(next(read)[1] if read is not None
                              else 32 * min(pc, chunks - page_no * pc))
            changes = by_page.get(page_no)
            for slot, name in (changes or {}).items():
                plain[slot * 32 : slot * 32 + 32] = name
            out.append(self._store(KIND_PAGE, bytes(plain)))
        return out

    def _build_tables(self, pages: list[str]) -> list[str]:
        """Group page digests into tables; a table whose pages all stayed is the parent's."""
        per = TABLE_PAGES
        parent, parent_pages = self.parent, self._parent_pages
        out: list[str] = []
        for t in range(0, len(pages), per):
            group = pages[t : t + per]
            if parent is not None and parent_pages is not None \
                    and parent_pages[t : t + per] == group \
                    and self._repo.has_chunk(bytes.fromhex(parent.tables[t // per])):
                out.append(parent.tables[t // per])
            else:
                out.append(self._store(KIND_TABLE, b"".join(bytes.fromhex(h) for h in group)))
        return out

    def close(self) -> None:
        """Give up (or finish): pending work is dropped, packs no index file names are
        deleted, the lease released (when the writer took it)."""
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()
        self._batch_indexes, self._batch, self._batch_bytes = [], [], 0
        try:
            self._sink.close()
        finally:
            if self._release_lease and not self._released:
                self._released = True
                self.lease.release()
