"""Disk: a tracked virtual disk with snapshots. The ONE write path for its logical content."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self, TypeVar

import numpy as np

from blocktrail.disk import chain
from blocktrail.disk.consolidation import Consolidation
from blocktrail.disk.layers import BaseLayer, DeltaLayer, Layer
from blocktrail.disk.meta import (
    FORMAT_VERSION,
    MAX_GRANULES,
    META_FILE,
    DiskMeta,
    LayerRecord,
    Snapshot,
)
from blocktrail.disk.readmap import MappedRead
from blocktrail.disk.restoring import (
    ChunkSource,
    FillProgress,
    RestoringLayer,
    fill_name,
)
from blocktrail.disk.rwlock import DiskLock
from blocktrail.disk.stack import LayerStack, new_layer_id, unlink_unreferenced
from blocktrail.errors import (
    BlocktrailError,
    DiskBusy,
    DiskExists,
    DiskNotFound,
    InvalidArgument,
    OutOfRange,
    SnapshotExists,
    SnapshotNotFound,
    SnapshotReadsInFlight,
    SnapshotRemoved,
    StaleChangeId,
    io_error,
)
from blocktrail.fileio import FileIO, FileLock, OsFileIO
from blocktrail.names import check_snapshot_name, is_valid_snapshot_name, legacy_snapshot_name
from blocktrail.tracking import ALL_ALLOCATED, ChangeId, ChangeTracker, DiskChangeInfo
from blocktrail.tracking.tracker import MAX_EXTENTS_PER_ANSWER

SourceOpener = Callable[[dict[str, Any]], ChunkSource]
LOCK_FILE = "lock"
# What a create killed midway leaves in its directory (and nothing else): such a directory is
# taken over by the next create.
_CREATE_LEFTOVERS = ("lock", "intent.bin", "open.roar")

_Read = TypeVar("_Read", bytes, bytes | memoryview)  # what a read of a snapshot gives


def _check_power_of_two(name: str, value: int, minimum: int) -> None:
    if value < minimum or value & (value - 1):
        raise InvalidArgument(f"{name} must be a power of two of at least {minimum}, not {value}")


class Disk:
    """A virtual disk: a base layer, snapshot delta layers, and a change tracker.

    Thread-safety: every public method may be called from any thread. Guest I/O (`pread`,
    `pwrite`, `zero`, `trim`, `flush`, snapshot reads, `map_read`, `query_changed_areas`) runs in
    parallel, from any number of threads; only changes to the layer structure (snapshot create,
    each consolidation step, resize, revert, reset, checkpoint, close) take the disk alone, and
    wait for the I/O in flight. `remove_snapshot` takes the disk alone only for one short step at
    a time. See docs/disk-format.md, "Concurrency".
    """

    def __init__(self, path: str, fileio: FileIO, lock: FileLock, meta: DiskMeta,
                 layers: list[Layer], tracker: ChangeTracker) -> None:
        self.path = path
        self._fileio = fileio
        self._file_lock: FileLock | None = lock
        self._meta = meta
        self._tracker = tracker
        self._stack = LayerStack(path, fileio, layers, meta.cluster_size, self._commit,
                                 lambda: self._meta.size_bytes)
        self._consolidation: Consolidation | None = None
        self._by_change_id: dict[str, Snapshot] | None = None  # built when first needed
        self._io_requests = 0  # approximate: counted without a lock (see io_requests)
        self._io = _IoCounts()

    @property
    def _lock(self) -> DiskLock:
        return self._stack.lock

    @property
    def _layers(self) -> list[Layer]:
        return self._stack.layers

    # ------------------------------------------------------------------ create / open / close

    @classmethod
    def create(cls, path: str | os.PathLike[str], size_bytes: int, granularity: int = 64 * 1024,
               *, cluster_size: int = 64 * 1024, fileio: FileIO | None = None,
               tracker_class: type[ChangeTracker] = ChangeTracker,
               intent_region_bytes: int | None = None) -> Disk:
        """Create an empty disk in the directory ``path`` (created; must be empty).
        ``intent_region_bytes``: the write-intent bitmap's region (default: chosen by size)."""
        path, fileio = os.fspath(path), fileio or OsFileIO()
        _check_power_of_two("granularity", granularity, 512)
        _check_power_of_two("cluster size", cluster_size, 512)
        if size_bytes < 0:
            raise InvalidArgument(f"size must not be negative: {size_bytes}")
        if -(-size_bytes // granularity) > MAX_GRANULES:
            raise InvalidArgument(f"{size_bytes} bytes is more than 2^32 granules of {granularity}")
        if fileio.exists(path) and not fileio.isdir(path):
            raise DiskExists(f"{path} already exists and is not a directory")
        if fileio.exists(os.path.join(path, META_FILE)) or (
                fileio.exists(path) and not _only_create_leftovers(fileio.listdir(path))):
            raise DiskExists(f"{path} already exists and is not empty")
        try:
            fileio.makedirs(path)
            lock = _take_lock(fileio, path)
        except OSError as exc:
            raise io_error(f"cannot create disk {path}", exc) from exc
        try:
            if fileio.exists(os.path.join(path, META_FILE)):  # created meanwhile
                raise DiskExists(f"{path} already exists")
            for name in fileio.listdir(path):  # what a killed create left behind
                if name != LOCK_FILE:
                    fileio.unlink(os.path.join(path, name))
            base = BaseLayer.create(fileio, path, new_layer_id())
            tracker = tracker_class.start(fileio, path, granularity, size_bytes,
                                          "tracking started with the disk",
                                          intent_region_bytes=intent_region_bytes)
            fileio.fsync_dir(path)
            meta = DiskMeta(str(uuid.uuid4()), datetime.now(UTC).isoformat(), size_bytes,
                            granularity, cluster_size, "open", [], [], tracker.meta())
            disk = cls(path, fileio, lock, meta, [base], tracker)
            disk._commit()
        except OSError as exc:
            lock.release()
            raise io_error(f"cannot create disk {path}", exc) from exc
        except BaseException:
            lock.release()
            raise
        return disk

    @classmethod
    def create_restored(cls, path: str | os.PathLike[str], source: ChunkSource,
                        continues: str | None, *, disk_id: str | None = None,
                        granularity: int = 64 * 1024, cluster_size: int = 64 * 1024,
                        fileio: FileIO | None = None) -> Disk:
        """A disk whose content is at once the restore point behind ``source``: its base reads
        chunks from the source until a background `fill` made them all local; writes go to a
        delta above it and are tracked from the first one. ``continues``: the change ID of the
        point (on the disk it was taken of), which stays valid here, so the next backup of this
        disk is an incremental against that point (None: the point has no change ID of a
        blocktrail disk, e.g. it was taken of another NBD export; tracking starts a new epoch
        and the next backup is full). ``disk_id``: keep the point's disk identity (the restored
        disk goes on in the same chain of restore points)."""
        path, fileio = os.fspath(path), fileio or OsFileIO()
        _check_power_of_two("granularity", granularity, 512)
        _check_power_of_two("cluster size", cluster_size, 512)
        size_bytes = source.size_bytes
        if fileio.exists(os.path.join(path, META_FILE)) or (
                fileio.exists(path) and not _only_create_leftovers(fileio.listdir(path))):
            raise DiskExists(f"{path} already exists and is not empty")
        continued = None if continues is None else ChangeId.parse(continues)
        try:
            fileio.makedirs(path)
            lock = _take_lock(fileio, path)
        except OSError as exc:
            raise io_error(f"cannot create disk {path}", exc) from exc
        try:
            for name in fileio.listdir(path):
                if name != LOCK_FILE:
                    fileio.unlink(os.path.join(path, name))
            base = RestoringLayer.create(fileio, path, new_layer_id(), source)
            top = DeltaLayer.create(fileio, path, new_layer_id(), cluster_size, size_bytes)
            origin = ", ".join(f"{k} {v}" for k, v in sorted(base.source_info.items()))
            tracker = ChangeTracker.start(fileio, path, granularity, size_bytes,
                                          f"restored from {origin}", continues=continued)
            fileio.fsync_dir(path)
            meta = DiskMeta(disk_id or str(uuid.uuid4()), datetime.now(UTC).isoformat(),
                            size_bytes, granularity, cluster_size, "open", [], [],
                            tracker.meta())
            disk = cls(path, fileio, lock, meta, [base, top], tracker)
            disk._commit()
        except OSError as exc:
            lock.release()
            raise io_error(f"cannot create disk {path}", exc) from exc
        except BaseException:
            lock.release()
            raise
        return disk

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, fileio: FileIO | None = None,
             tracker_class: type[ChangeTracker] = ChangeTracker,
             chunk_sources: SourceOpener | None = None) -> Disk:
        """Open a disk; after a crash this recovers it (see docs/disk-format.md, Opening).
        ``chunk_sources`` opens the source of a restoring base layer from what disk.json
        records (without it, reads of what is not local yet fail with `ChunkUnavailable`)."""
        path, fileio = os.fspath(path), fileio or OsFileIO()
        meta_path = os.path.join(path, META_FILE)
        if not fileio.exists(meta_path):
            raise DiskNotFound(f"{path} is not a blocktrail disk (no {META_FILE})")
        lock = _take_lock(fileio, path)
        try:
            return cls._open_locked(path, fileio, lock, tracker_class, chunk_sources)
        except OSError as exc:
            lock.release()
            raise io_error(f"cannot open disk {path}", exc) from exc
        except BaseException:
            lock.release()
            raise

    @classmethod
    def _open_locked(cls, path: str, fileio: FileIO, lock: FileLock,
                     tracker_class: type[ChangeTracker],
                     chunk_sources: SourceOpener | None = None) -> Disk:
        meta = DiskMeta.from_bytes(fileio.read_file(os.path.join(path, META_FILE)), path)
        crashed = meta.state != "closed"
        restart = _seal_mismatch(fileio, path, meta, crashed=crashed)
        _rename_legacy_snapshots(meta)
        layers: list[Layer] = []
        try:
            for record in meta.layers:
                if record.kind == "base":
                    layer: Layer = BaseLayer.open(fileio, path, record.id)
                elif record.kind == "restoring":
                    info = record.source or {}
                    source = chunk_sources(info) if chunk_sources is not None else None
                    layer = RestoringLayer.open_restoring(fileio, path, record.id, source, info)
                else:
                    layer = DeltaLayer.open(fileio, path, record.id, meta.cluster_size,
                                            int(record.visible_below or 0))
                layer.snapshot, layer.seal = record.snapshot, record.seal
                layers.append(layer)
            tracker = tracker_class.load(fileio, path, meta.granularity, meta.size_bytes,
                                         meta.tracker, crashed=crashed, restart_reason=restart)
        except BaseException:
            for layer in layers:
                layer.close()
            raise
        meta.state, meta.legacy_seal, meta.format_version = "open", {}, FORMAT_VERSION
        disk = cls(path, fileio, lock, meta, layers, tracker)
        layers[-1].seal = None  # the top may be written from now on
        for layer in layers[:-1]:  # frozen: sealed as they are now (again, after a restart)
            if isinstance(layer, RestoringLayer) or layer.snapshot is None:
                layer.seal = None  # its filling writes it; a removed snapshot's is merged into
            elif layer.snapshot is not None and (layer.seal is None or restart is not None):
                layer.seal = disk._stack.seal_of(layer)
        # Open, durably, before any layer is touched: a crash from here on is an unclean
        # shutdown (else the cut below, which changes the top's times even where it frees
        # nothing, would look like an edit of a closed disk and restart tracking).
        disk._commit()
        # Repeat the cut a crash may have undone, durably: a later grow commits a larger size,
        # past which an undone cut would bring the old bytes back.
        chain.drop_beyond(layers[-1], meta.cluster_size, meta.size_bytes)
        layers[-1].flush()
        if tracker.new_epoch_pending:  # durable now: the old intent can go
            tracker.after_commit()
        disk._delete_unreferenced()
        for index in range(len(layers) - 1):  # finish removals a crash interrupted
            if disk._layers[index].snapshot is None \
                    and not isinstance(disk._layers[index], RestoringLayer):
                disk._tracker.consolidation_active = True
                disk._new_consolidation(disk._layers[index].id).run()
                break
        return disk

    def close(self) -> None:
        """Finish any consolidation, flush, checkpoint the tracker and mark the disk clean. (A
        merge that waits for reads of its removed snapshot still being sent is left to the next
        open, which finishes it.)"""
        with self._lock:
            if self._file_lock is None:
                return
            if self._stack.failed is not None:  # memory and files disagree: recover at open
                self._release()
                return
            try:
                self._finish_consolidation()
                self._flush_locked()
                self._stack.guard(self._tracker.checkpoint)
                self._meta.state = "closed"
                for layer in self._layers:
                    layer.seal = self._stack.guard(self._stack.seal_of, layer)
                self._stack.guard(self._commit)
            finally:
                self._release()

    def abandon(self) -> None:
        """Drop the disk as a killed process would: no flush, no checkpoint, no clean mark.

        For crash tests; the next `open` runs crash recovery."""
        with self._lock:
            if self._file_lock is not None:
                self._release()

    def _release(self) -> None:
        for layer in self._layers:
            layer.close()
        self._tracker.close()
        assert self._file_lock is not None
        self._file_lock.release()
        self._file_lock = None
        self._stack.closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------ properties

    @property
    def disk_id(self) -> str:
        return self._meta.disk_id

    @property
    def size_bytes(self) -> int:
        return self._meta.size_bytes

    @property
    def granularity(self) -> int:
        return self._meta.granularity

    @property
    def cluster_size(self) -> int:
        return self._meta.cluster_size

    @property
    def current_change_id(self) -> str:
        with self._lock.shared():
            return str(self._tracker.current_change_id)

    @property
    def snapshots(self) -> list[Snapshot]:
        with self._lock.shared():
            return list(self._meta.snapshots)

    @property
    def tracker(self) -> ChangeTracker:
        return self._tracker

    @property
    def io_bytes(self) -> tuple[int, int]:
        """(bytes read, bytes written, zeroed or trimmed) since the disk was opened, snapshot
        reads included: for metrics."""
        return self._io.read, self._io.written

    @property
    def closed(self) -> bool:
        return self._file_lock is None

    @property
    def io_requests(self) -> int:
        """How many reads (live disk and snapshots, mapped or not), writes, zeroes and trims
        were asked of this handle since it was opened: a cheap counter for pacing background
        work (a fill) behind a busy guest. Approximate: it is counted without a lock, and a
        mapped read that had to wait counts twice (asked once without waiting, then again)."""
        return self._io_requests

    # ------------------------------------------------------------------ guest I/O

    def pread(self, count: int, offset: int) -> bytes:
        self._io_requests += 1
        with self._lock.shared():
            layers = self._readable_view(count, offset, None)
            data = chain.read_view(layers, self.cluster_size, count, offset)
        self._io.add_read(count)
        return data

    def map_read(self, count: int, offset: int, snapshot: str | Snapshot | None = None, *,
                 wait: bool = True) -> MappedRead | None:
        """Where the bytes of a read of the live disk (or a snapshot, by name or by the record
        `snapshots` gave: `SnapshotRemoved` once that one is gone) are, for a zero-copy reader;
        the caller closes the result, always: a snapshot's mapped read pins its layer, and the
        merge that removes the snapshot waits for it (what it maps stays the snapshot's bytes
        until it is closed). With ``wait=False``, None instead of waiting (for a change of the
        layer structure, or for chunks a restoring base must fetch)."""
        self._io_requests += 1
        counted = self._lock.acquire_shared(blocking=wait)
        if counted is None:
            return None
        try:
            snap = self._resolve(snapshot)
            layers = self._readable_view(count, offset, snap)
            mapped = MappedRead.from_pieces(offset, count, chain.map_view(
                layers, self.cluster_size, count, offset), wait=wait)
            if mapped is not None and snap is not None:  # under the lock: before any removal
                self._stack.pin(snap.change_id)
                mapped.on_close(functools.partial(self._stack.unpin, snap.change_id))
        finally:
            self._lock.release_shared(counted)
        if mapped is not None:
            self._io.add_read(count)
        return mapped

    def pwrite(self, buf: bytes | bytearray | memoryview, offset: int) -> None:
        """Write ``buf`` at ``offset`` (it is not kept: the caller may reuse it afterwards)."""
        data = _readonly(buf)
        self._apply(offset, len(data), data)

    def try_pwrite(self, buf: bytes | bytearray | memoryview, offset: int) -> bool:
        """`pwrite` done at once when nothing would make it wait (a change of the layer
        structure, a write-intent sync, a copy-up from the layers below, a due checkpoint):
        -> True. False: nothing was done; call `pwrite` where waiting is fine. Errors are
        raised as by `pwrite`. (An event loop writes small guest writes this way.)"""
        data = _readonly(buf)
        return self._apply(offset, len(data), data, wait=False)

    def zero(self, count: int, offset: int) -> None:
        self._apply(offset, count, None)

    def try_zero(self, count: int, offset: int) -> bool:
        """`zero` (or `trim`: the same) done at once when nothing would make it wait, as
        `try_pwrite`: -> True; False: nothing was done."""
        return self._apply(offset, count, None, wait=False)

    def trim(self, count: int, offset: int) -> None:
        """Discard a range; it reads back as zeros and counts as changed."""
        self._apply(offset, count, None)

    def flush(self) -> None:
        """Every write that returned before this call is durable when it returns (whichever
        thread or connection made it)."""
        with self._lock.shared():
            self._stack.check_usable()
            self._flush_locked()

    def _apply(self, offset: int, length: int, data: bytes | memoryview | None, *,
               wait: bool = True) -> bool:
        """The one choke point: mark the tracker (durably), then write the top layer. Under
        the shared lock: writes run in parallel with each other and with reads, never with a
        change of the layer structure, so the layer they write is the top when they finish.
        ``wait=False``: -> False, having done nothing, instead of waiting for the lock, a
        write-intent sync or a copy-up. (Written out without helpers: it runs for every guest
        write.)"""
        stack = self._stack
        counted = stack.lock.acquire_shared(blocking=wait)
        if counted is None:
            return False
        self._io_requests += 1
        try:
            if stack.closed or stack.failed is not None:
                stack.check_usable()
            size = self._meta.size_bytes
            if length < 0 or offset < 0 or offset + length > size:
                raise OutOfRange(f"range {offset}+{length} is outside the disk (size {size})")
            if length == 0:
                return True
            cluster_size = self._meta.cluster_size
            if not wait and not chain.writes_in_place(stack.layers[-1], cluster_size, offset,
                                                      length):
                return False
            try:
                if wait:
                    self._tracker.mark(offset, length)
                elif not self._tracker.try_mark(offset, length):
                    return False  # nothing recorded, nothing written
                chain.write_top(stack.layers, cluster_size, offset, data, length)
            except BlocktrailError:
                raise
            except BaseException as exc:
                stack.guard(_reraise, exc)  # marks the disk failed, raises the typed error
        finally:
            stack.lock.release_shared(counted)
        self._io.add_written(length)
        if wait and self._tracker.checkpoint_due:
            with self._lock:
                if not self._stack.closed and self._stack.failed is None \
                        and self._tracker.checkpoint_due:
                    self._stack.guard(self._tracker.checkpoint)
        return True

    def _flush_locked(self) -> None:
        self._stack.guard(self._layers[-1].flush)

    # ------------------------------------------------------------------ snapshots

    def create_snapshot(self, name: str) -> Snapshot:
        """Freeze the disk's current content under ``name``; writes go on into a new layer."""
        check_snapshot_name(name)
        with self._lock:
            self._stack.check_usable()
            if any(s.name == name for s in self._meta.snapshots):
                raise SnapshotExists(f"snapshot {name!r} already exists")
            self._flush_locked()
            change_id = self._stack.guard(self._tracker.advance)
            snapshot = Snapshot(name, str(change_id), datetime.now(UTC), self.size_bytes)
            frozen = self._layers[-1]
            frozen.snapshot = name
            frozen.seal = self._stack.guard(self._stack.seal_of, frozen)
            self._meta.snapshots.append(snapshot)
            self._by_change_id = None
            self._stack.guard(self._stack.push_top)
            self._stack.guard(self._tracker.after_commit)
            return snapshot

    def open_snapshot(self, name: str) -> SnapshotView:
        with self._lock.shared():
            self._snapshot(name)
            return SnapshotView(self, name)

    def remove_snapshot(self, name: str) -> None:
        """Delete a snapshot, merging its layer online (consolidation). The snapshot is gone
        (durably) before the merge starts. A merge that waits longer than `READS_WAIT_SECONDS`
        for reads of the snapshot mapped before and still being sent is left pending: the next
        change of the layer structure finishes it first (or raises `SnapshotReadsInFlight` if
        it still cannot start), else the next open does."""
        consolidation = self.begin_remove_snapshot(name)
        with contextlib.suppress(SnapshotReadsInFlight):
            consolidation.run()

    def begin_remove_snapshot(self, name: str) -> Consolidation:
        """Start removing a snapshot; the returned consolidation merges it step by step.
        A removal still in progress is finished first."""
        with self._idle_lock():
            snapshot = self._snapshot(name)
            layer = next(la for la in self._layers if la.snapshot == name)
            self._meta.snapshots.remove(snapshot)
            self._by_change_id = None
            layer.snapshot = layer.seal = None  # the layers above are merged into it
            self._tracker.consolidation_active = True
            self._stack.guard(self._commit)
            self._consolidation = self._new_consolidation(layer.id, snapshot.change_id)
            return self._consolidation

    def revert_to_snapshot(self, name: str) -> None:
        """Make the live disk the snapshot's content again. Snapshots newer than it are
        discarded; change IDs after its point become stale."""
        with self._idle_lock():
            snapshot = self._snapshot(name)
            index = next(i for i, la in enumerate(self._layers) if la.snapshot == name)
            for layer in self._layers[index + 1 :]:
                layer.close()
            del self._layers[index + 1 :]
            keep = self._meta.snapshots.index(snapshot) + 1
            del self._meta.snapshots[keep:]
            self._by_change_id = None
            self._meta.size_bytes = snapshot.size_bytes
            self._tracker.size_bytes = snapshot.size_bytes
            self._stack.guard(self._tracker.revert_to, snapshot.change_id,
                              f"reverted to snapshot {name!r}")
            self._stack.guard(self._stack.push_top)
            self._stack.guard(self._tracker.after_commit)
            self._stack.guard(self._delete_unreferenced)

    def _snapshot(self, name: str) -> Snapshot:
        for snapshot in self._meta.snapshots:
            if snapshot.name == name:
                return snapshot
        raise SnapshotNotFound(f"disk {self.path} has no snapshot {name!r}")

    def _resolve(self, snapshot: str | Snapshot | None) -> Snapshot | None:
        """The disk's snapshot a read or query names (under the disk lock): by name, or the
        record itself, found by its change ID (a snapshot taken since under the same name is
        another: `SnapshotRemoved`)."""
        if snapshot is None:
            return None
        if isinstance(snapshot, str):
            return self._snapshot(snapshot)
        by_id = self._by_change_id
        if by_id is None:
            by_id = self._by_change_id = {s.change_id: s for s in self._meta.snapshots}
        found = by_id.get(snapshot.change_id)
        if found is None or (found is not snapshot and found != snapshot):
            raise SnapshotRemoved(f"snapshot {snapshot.name!r} (change ID "
                                  f"{snapshot.change_id}) of disk {self.path} was removed")
        return found

    @contextmanager
    def io_paused(self) -> Iterator[None]:
        """Hold off all I/O and metadata changes of this disk (other threads wait), e.g. to
        snapshot several disks at one instant. The holder may call any method."""
        with self._idle_lock():
            yield

    def _finish_consolidation(self) -> None:
        pending = self._consolidation
        if pending is not None:
            with contextlib.suppress(SnapshotReadsInFlight):  # the next open finishes it
                pending.run()

    @contextmanager
    def _idle_lock(self) -> Iterator[None]:
        """Hold the disk lock with no snapshot removal in progress (one is run to its end
        first, without holding the lock across its steps)."""
        while True:
            with self._lock:
                self._stack.check_usable()
                pending = self._consolidation
                if pending is None or pending.done:
                    self._consolidation = None
                    yield
                    return
            pending.run()

    # ------------------------------------------------------------------ resize

    def resize(self, size_bytes: int) -> None:
        """Grow or shrink. A grown range reads as zeros and counts as changed; a shrunk range is
        gone (growing again never brings old data back)."""
        if size_bytes < 0 or -(-size_bytes // self.granularity) > MAX_GRANULES:
            raise InvalidArgument(f"cannot resize to {size_bytes} bytes")
        with self._idle_lock():
            old = self._meta.size_bytes
            top = self._layers[-1]
            if size_bytes < old and isinstance(top, DeltaLayer):
                top.visible_below = min(top.visible_below, size_bytes)
            self._stack.guard(self._tracker.note_resize, old, size_bytes)
            self._meta.size_bytes = size_bytes
            self._stack.guard(self._commit)
            if size_bytes < old:
                # Durable before the lock goes: a grow commits a larger size next, and a cut a
                # crash undid then would bring the shrunk-away bytes back.
                self._stack.guard(chain.drop_beyond, top, self.cluster_size, size_bytes)
                self._stack.guard(top.flush)

    # ------------------------------------------------------------------ tracking

    def query_changed_areas(self, change_id: str, start_offset: int = 0,
                            snapshot: str | Snapshot | None = None, *,
                            end_offset: int | None = None,
                            max_extents: int | None = None) -> DiskChangeInfo:
        """Areas written after ``change_id`` up to the snapshot's point (or now); ``"*"``: all
        allocated areas. The answer covers ``[start_offset, end_offset)`` at most (default: to
        the end of the disk), and ends where its ``max_extents``-th area does when more follow
        (default: 65,536).
        ``snapshot``: by name, or the record `snapshots` gave (`SnapshotRemoved` once that one
        is gone). See docs/tracking.md."""
        _check_max_extents(max_extents)
        with self._lock.shared():
            snap = self._resolve(snapshot)
            end, until = self._query_bounds(change_id, start_offset, snap, end_offset)
            if change_id.strip() == ALL_ALLOCATED:
                return self._allocated_areas(snap, start_offset, end,
                                             max_extents or MAX_EXTENTS_PER_ANSWER)
            return self._tracker.query(change_id, until_seq=until, size_bytes=end,
                                       start_offset=start_offset, max_extents=max_extents)

    def try_query_changed_areas(self, change_id: str, start_offset: int = 0,
                                snapshot: str | Snapshot | None = None, *,
                                end_offset: int | None = None, max_granules: int,
                                max_extents: int | None = None) -> DiskChangeInfo | None:
        """`query_changed_areas` answered at once when nothing would make it wait (a change of
        the layer structure) and it joins at most ``max_granules`` marked granules (its cost
        grows with them); None otherwise. ``"*"`` is never answered here. Errors are raised
        as by `query_changed_areas`. (An event loop answers small dirty-map questions so.)"""
        _check_max_extents(max_extents)
        if change_id.strip() == ALL_ALLOCATED:
            return None
        with self._lock.shared_if_free() as held:
            if not held:
                return None
            end, until = self._query_bounds(change_id, start_offset, self._resolve(snapshot),
                                            end_offset)
            return self._tracker.try_query(change_id, until_seq=until, size_bytes=end,
                                           start_offset=start_offset, max_granules=max_granules,
                                           max_extents=max_extents)

    def try_first_changed_area(self, change_id: str, start_offset: int, snapshot: Snapshot, *,
                               end_offset: int | None = None) -> tuple[int, int] | None:
        """The first area changed after ``change_id`` up to ``snapshot`` that ends past
        ``start_offset``, clipped to [start_offset, end_offset): (offset, end), or (end, end)
        when there is none; what `query_changed_areas` answers with ``max_extents=1``. Only
        when the answer is kept whole (tracking/answers.py) and nothing makes it wait; None
        otherwise. Errors are raised as by `query_changed_areas`."""
        if change_id.strip() == ALL_ALLOCATED:
            return None
        with self._lock.shared_if_free() as held:
            if not held:
                return None
            snap = self._resolve(snapshot)
            end, until = self._query_bounds(change_id, start_offset, snap, end_offset)
            assert until is not None  # a snapshot's point
            return self._tracker.first_kept_area(change_id, until_seq=until, size_bytes=end,
                                                 start_offset=start_offset)

    def _query_bounds(self, change_id: str, start_offset: int, snap: Snapshot | None,
                      end_offset: int | None) -> tuple[int, int | None]:
        """A query's checks (the disk usable, the range); -> where its answer ends, and the
        tracker sequence of the snapshot's point (None: now, or ``"*"``)."""
        self._stack.check_usable()
        size = self.size_bytes if snap is None else snap.size_bytes
        end = size if end_offset is None else min(size, end_offset)
        if not 0 <= start_offset < end:
            raise OutOfRange(f"start offset {start_offset} is outside the disk (size {size})"
                             if start_offset >= size or start_offset < 0 else
                             f"end offset {end_offset} is not past start {start_offset}")
        if snap is None or change_id.strip() == ALL_ALLOCATED:
            return end, None
        try:
            return end, self._tracker.resolve(snap.change_id)
        except StaleChangeId as exc:
            raise StaleChangeId(f"snapshot {snap.name!r} was taken before the current "
                                f"tracking epoch: {exc.message}") from exc

    # ------------------------------------------------------------------ instant restore

    @property
    def restore_progress(self) -> FillProgress | None:
        """How much of a restoring base is local (None: the disk's base is all local)."""
        base = self._layers[0]
        return base.progress() if isinstance(base, RestoringLayer) else None

    @property
    def restore_source(self) -> ChunkSource | None:
        """The source a restoring base fetches from (None: the base is local, or no source
        was opened for it)."""
        base = self._layers[0]
        return base.source if isinstance(base, RestoringLayer) else None

    @property
    def restore_origin(self) -> dict[str, Any] | None:
        """What disk.json records of a restoring base's source (None: the base is local)."""
        base = self._layers[0]
        return dict(base.source_info) if isinstance(base, RestoringLayer) else None

    def fill(self, max_chunks: int = 64) -> FillProgress | None:
        """Fetch up to ``max_chunks`` chunks of a restoring base and make them durable; once
        all are local, the base becomes a plain one (atomically, in disk.json) and the layer
        above it is merged into it. -> the progress (None: nothing to fill)."""
        with self._lock.shared():
            self._stack.check_usable()
            base = self._layers[0]
            if not isinstance(base, RestoringLayer):
                return None
            progress = base.fill(max_chunks)
            self._stack.guard(base.flush)
        if progress.done:
            self._finish_restore()
        return progress

    def _finish_restore(self) -> None:
        with self._idle_lock():
            base = self._layers[0]
            if not isinstance(base, RestoringLayer) or not base.progress().done:
                return
            self._stack.guard(base.flush)
            plain = BaseLayer(base.id, base.detach_data())
            self._layers[0] = plain
            fill_file = os.path.join(self.path, fill_name(base.id))
            self._stack.guard(self._commit)  # from here on the base is an ordinary one
            self._stack.guard(self._fileio.unlink, fill_file)
            if len(self._layers) > 1 and plain.snapshot is None:
                self._tracker.consolidation_active = True
                self._consolidation = self._new_consolidation(plain.id)
        pending = self._consolidation
        if pending is not None:
            pending.run()  # the delta above merges into the now local base

    def checkpoint(self) -> None:
        """Make the tracker's marks since the last snapshot durable in its checkpoint (it also
        happens at close and every 30 s of writes), so fewer write-intent regions are set."""
        with self._lock:
            self._stack.check_usable()
            self._stack.guard(self._tracker.checkpoint)

    def reset_tracking(self) -> str:
        """Start a new tracking epoch: every earlier change ID is refused from now on.

        The new epoch is durable (disk.json) before anything of the old one is dropped: a crash
        in between reopens in the new epoch, with the old write-intent bits still set."""
        with self._lock:
            self._stack.check_usable()
            change_id = self._stack.guard(self._tracker.restart, "tracking reset by request")
            self._stack.guard(self._commit)
            self._stack.guard(self._tracker.after_commit)
            self._stack.guard(self._delete_unreferenced)
            return str(change_id)

    def _allocated_areas(self, snapshot: Snapshot | None, start: int, end: int,
                         max_extents: int) -> DiskChangeInfo:
        g = self.granularity
        lo, hi = start // g * g, -(-end // g) * g  # whole granules, as the tracker answers
        found = [layer.allocated(lo, hi) for layer in self._view_layers(snapshot)]
        starts = np.concatenate([f[0] for f in found])
        if not len(starts):
            return DiskChangeInfo(start, end - start)
        firsts = starts // g * g
        lasts = -(-np.concatenate([f[1] for f in found]) // g) * g
        order = np.argsort(firsts, kind="stable")
        firsts, lasts = firsts[order], np.maximum.accumulate(lasts[order])
        new_run = np.concatenate(([True], firsts[1:] > lasts[:-1]))  # not touching the last run
        run_ends = np.concatenate((np.flatnonzero(new_run)[1:] - 1, [len(firsts) - 1]))
        offsets = np.maximum(firsts[new_run], start)
        ends = np.minimum(lasts[run_ends], end)
        if len(offsets) > max_extents:
            offsets, ends = offsets[:max_extents], ends[:max_extents]
            end = int(ends[-1])
        return DiskChangeInfo.from_arrays(start, end - start, offsets, ends - offsets)

    # ------------------------------------------------------------------ internals

    def _view_layers(self, snapshot: Snapshot | None) -> list[Layer]:
        """The layers of the live disk or of one of its snapshots (`_resolve` found it)."""
        if snapshot is None:
            return self._layers
        name = snapshot.name
        index = next(i for i, la in enumerate(self._layers) if la.snapshot == name)
        return self._layers[: index + 1]

    def _read_snapshot(self, name: str, count: int, offset: int,
                       read: Callable[[list[Layer], int, int, int], _Read]) -> _Read:
        with self._lock.shared():
            layers = self._readable_view(count, offset, self._snapshot(name))
            return read(layers, self.cluster_size, count, offset)

    def _readable_view(self, count: int, offset: int, snapshot: Snapshot | None) -> list[Layer]:
        """The layers of the live disk or a snapshot, once the read is known to fit in it
        (under the read lock)."""
        self._stack.check_usable()
        layers = self._view_layers(snapshot)
        size = self._meta.size_bytes if snapshot is None else snapshot.size_bytes
        self._check_range(count, offset, size)
        return layers

    def _new_consolidation(self, parent_id: str, removed: str | None = None) -> Consolidation:
        def done() -> None:
            self._tracker.consolidation_active = False
        return Consolidation(self._stack, parent_id, done, removed)

    def _commit(self) -> None:
        """Atomically replace disk.json with the in-memory state."""
        meta = self._meta
        meta.layers = [LayerRecord(la.id, la.kind,
                                   la.visible_below if isinstance(la, DeltaLayer) else None,
                                   la.snapshot, la.seal,
                                   la.source_info if isinstance(la, RestoringLayer) else None)
                       for la in self._layers]
        meta.tracker = self._tracker.meta()
        self._fileio.replace_atomic(os.path.join(self.path, META_FILE), meta.to_bytes())

    def _delete_unreferenced(self) -> None:
        keep = {META_FILE, LOCK_FILE} | self._tracker.files()
        keep.update(name for la in self._layers for name in la.file_names())
        for name in self._fileio.listdir(self.path):
            if name not in keep and (name.startswith(("layer-", "interval-"))
                                     or name.endswith(".tmp")):
                unlink_unreferenced(self._fileio, os.path.join(self.path, name))

    @staticmethod
    def _check_range(count: int, offset: int, size: int) -> None:
        if count < 0 or offset < 0 or offset + count > size:
            raise OutOfRange(f"range {offset}+{count} is outside the disk (size {size})")


class _IoCounts:
    """Bytes read and written, counted under a lock of their own (a metric must not lose
    counts to threads racing on ``+=``)."""

    __slots__ = ("_lock", "read", "written")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.read = 0
        self.written = 0

    def add_read(self, count: int) -> None:
        with self._lock:
            self.read += count

    def add_written(self, count: int) -> None:
        with self._lock:
            self.written += count


class SnapshotView:
    """Read-only access to a snapshot's content."""

    def __init__(self, disk: Disk, name: str) -> None:
        self._disk = disk
        self.name = name

    @property
    def size_bytes(self) -> int:
        with self._disk._lock.shared():
            return self._disk._snapshot(self.name).size_bytes

    def pread(self, count: int, offset: int) -> bytes:
        return self._disk._read_snapshot(self.name, count, offset, chain.read_view)

    def pread_direct(self, count: int, offset: int) -> bytes | memoryview:
        """`pread` past the page cache (`fileio.pread_direct`), for reading much of the
        snapshot once, as a full backup does."""
        return self._disk._read_snapshot(self.name, count, offset, chain.read_view_direct)


def _take_lock(fileio: FileIO, path: str) -> FileLock:
    try:
        return fileio.lock_exclusive(os.path.join(path, LOCK_FILE))
    except BlockingIOError:
        raise DiskBusy(f"disk {path} is open in another process or handle") from None
    except OSError as exc:
        raise io_error(f"cannot lock disk {path}", exc) from exc


def _only_create_leftovers(names: list[str]) -> bool:
    return all(n in _CREATE_LEFTOVERS or n.startswith("layer-") or n.endswith(".tmp")
               for n in names)


def _seal_mismatch(fileio: FileIO, path: str, meta: DiskMeta, *, crashed: bool) -> str | None:
    """A reason to restart tracking if a file that nothing may change was changed: every layer
    after a clean close, the frozen ones (sealed when they froze) after a crash."""
    if meta.format_version == 1:  # one seal of (size, mtime, inode), written at clean close
        if crashed:
            return None
        if not meta.legacy_seal:
            return "the disk was closed without a seal"
        for name, sealed in meta.legacy_seal.items():
            full = os.path.join(path, name)
            if not fileio.exists(full) or [*fileio.seal(full)[:2], fileio.seal(full)[3]] \
                    != sealed:
                return (f"disk file {name} was changed outside blocktrail since the disk was "
                        "closed")
        return None
    for record in meta.layers:
        if record.seal is None:
            if not crashed:
                return f"layer {record.id} has no seal at a clean open"
            continue  # the writable top, or a layer being merged into: checked nowhere
        for name, sealed in record.seal.items():
            full = os.path.join(path, name)
            if not fileio.exists(full):
                return f"disk file {name} is missing"
            if list(fileio.seal(full)) != sealed:
                when = "while the disk was closed" if not crashed else (
                    "(it belongs to a frozen layer, which nothing may write)")
                return f"disk file {name} was changed outside blocktrail {when}"
    return None


def _rename_legacy_snapshots(meta: DiskMeta) -> None:
    """Snapshot names an older blocktrail let through (a lone surrogate, a control character,
    '.'), which no API or command line could name, become valid ones."""
    taken = {s.name for s in meta.snapshots}
    for index, snap in enumerate(meta.snapshots):
        if is_valid_snapshot_name(snap.name):
            continue
        new = legacy_snapshot_name(snap.name, taken)
        taken.add(new)
        meta.snapshots[index] = Snapshot(new, snap.change_id, snap.created_at, snap.size_bytes)
        for record in meta.layers:
            if record.snapshot == snap.name:
                record.snapshot = new


def _readonly(buf: bytes | bytearray | memoryview) -> bytes | memoryview:
    """``buf`` as the write path takes it, without copying it (bytes as they are, any other
    buffer as a read-only view of its bytes)."""
    if type(buf) is bytes:
        return buf
    view = memoryview(buf)
    return (view if view.format == "B" and view.ndim == 1 else view.cast("B")).toreadonly()


def _reraise(exc: BaseException) -> None:
    raise exc


def _check_max_extents(max_extents: int | None) -> None:
    if max_extents is not None and max_extents < 1:
        raise InvalidArgument(f"max_extents must be at least 1, not {max_extents}")
