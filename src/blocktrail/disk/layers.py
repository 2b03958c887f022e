"""Layer files: the raw sparse base image, and delta layers with their cluster maps."""

from __future__ import annotations

import os
import struct
import threading
from enum import IntEnum

import numpy as np

from blocktrail.errors import CorruptMetadata, UnsupportedFormat
from blocktrail.extents import Extent
from blocktrail.fileio import FileHandle, FileIO
from blocktrail.tracking.info import IntArray

MAP_MAGIC = b"BTCMAP\x00"
MAP_VERSION = 1
MAP_HEADER_BYTES = 4096
_MAP_HEADER = struct.Struct("<7sBI")
CLUSTER_LOCK_STRIPES = 64


class ClusterState(IntEnum):
    ABSENT = 0  # read through to the layer below
    DATA = 1  # the bytes are in this layer
    ZERO = 2  # reads as zeros; nothing below shows through


def data_name(layer_id: str) -> str:
    return f"layer-{layer_id}.img"


def map_name(layer_id: str) -> str:
    return f"layer-{layer_id}.map"


class BaseLayer:
    """The bottom of the chain: a raw sparse image; bytes past its end read as zeros.

    While the layer is sealed (frozen: nothing may change it) its allocation is looked up once
    and kept; unsealing it (a merge is about to write it) drops what was kept."""

    kind = "base"

    def __init__(self, layer_id: str, data: FileHandle) -> None:
        self.id = layer_id
        self.data = data
        self.snapshot: str | None = None  # the snapshot whose frozen layer this is
        self._seal: dict[str, list[int]] | None = None
        self._extents: tuple[IntArray, IntArray] | None = None  # (starts, ends) if sealed

    @property
    def seal(self) -> dict[str, list[int]] | None:
        return self._seal

    @seal.setter
    def seal(self, value: dict[str, list[int]] | None) -> None:
        self._extents = None
        self._seal = value

    def file_names(self) -> list[str]:
        return [data_name(self.id)]

    def prepare(self, offset: int, length: int) -> None:
        """Make the range readable from ``data`` (a restoring base fetches what is missing)."""

    def is_local(self, offset: int, length: int) -> bool:
        """Whether the range can be read from ``data`` now, without fetching anything."""
        return True

    def allocated(self, start: int, end: int) -> tuple[IntArray, IntArray]:
        """(starts, ends) of the extents inside ``[start, end)`` this layer may hold data in,
        clipped to it."""
        extents = self._extents
        if extents is None:
            extents = _arrays(self.data.data_extents(0 if self._seal else start,
                                                     None if self._seal else end))
            if self._seal is not None:  # frozen: nothing changes it while it is sealed
                self._extents = extents
        starts, ends = extents
        lo, hi = np.searchsorted(ends, start, side="right"), np.searchsorted(starts, end)
        return np.maximum(starts[lo:hi], start), np.minimum(ends[lo:hi], end)

    def flush(self) -> None:
        self.data.fsync()

    def close(self) -> None:
        self.data.close()

    @classmethod
    def create(cls, fileio: FileIO, directory: str, layer_id: str) -> BaseLayer:
        handle = fileio.open(os.path.join(directory, data_name(layer_id)), create=True)
        handle.fsync()
        return cls(layer_id, handle)

    @classmethod
    def open(cls, fileio: FileIO, directory: str, layer_id: str) -> BaseLayer:
        return cls(layer_id, fileio.open(os.path.join(directory, data_name(layer_id))))


class DeltaLayer:
    """Clusters written while this layer was the top, and a map of which ones it holds.

    New map entries stay in memory (``_pending``) until `flush`, which makes the data durable
    before the map: a crash never leaves a map entry pointing at data that did not arrive.

    Thread-safety (the writable top is written by many threads at once): a writer holds
    `cluster_lock(c)` while it changes cluster ``c`` (a copy-up reads, merges and writes the
    whole cluster), and sets the cluster's state only after its data is written; the map state
    is kept under a lock of its own; flushes run one at a time."""

    kind = "delta"

    def __init__(self, layer_id: str, data: FileHandle, map_file: FileHandle, cluster_size: int,
                 states: dict[int, ClusterState], visible_below: int) -> None:
        self.id = layer_id
        self.data = data
        self._map_file = map_file
        self.cluster_size = cluster_size
        self.states = states  # cluster index -> DATA or ZERO (ABSENT is not stored)
        self._data_clusters: np.ndarray | None = None  # sorted DATA clusters, until a change
        self._pending: dict[int, ClusterState] = {}
        self._state_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._cluster_locks = [threading.Lock() for _ in range(CLUSTER_LOCK_STRIPES)]
        self.visible_below = visible_below
        self.snapshot: str | None = None
        self.seal: dict[str, list[int]] | None = None

    def file_names(self) -> list[str]:
        return [data_name(self.id), map_name(self.id)]

    def state(self, cluster: int) -> ClusterState:
        return self.states.get(cluster, ClusterState.ABSENT)

    def cluster_lock(self, cluster: int) -> threading.Lock:
        return self._cluster_locks[cluster % CLUSTER_LOCK_STRIPES]

    def set_state(self, cluster: int, state: ClusterState) -> None:
        with self._state_lock:
            self._data_clusters = None
            if state is ClusterState.ABSENT:
                self.states.pop(cluster, None)
            else:
                self.states[cluster] = state
            self._pending[cluster] = state

    def allocated(self, start: int, end: int) -> tuple[IntArray, IntArray]:
        """(starts, ends) of the extents inside ``[start, end)`` this layer holds data in,
        clipped to it."""
        cs = self.cluster_size
        with self._state_lock:
            clusters = self._data_clusters
            if clusters is None:  # a frozen layer sorts once; the top after each change
                clusters = np.array(sorted(c for c, s in self.states.items()
                                           if s is ClusterState.DATA), dtype=np.int64)
                self._data_clusters = clusters
        window = clusters[np.searchsorted(clusters, start // cs):
                          np.searchsorted(clusters, -(-end // cs))]
        if not len(window):
            return _EMPTY, _EMPTY
        breaks = np.flatnonzero(np.diff(window) != 1)
        firsts = window[np.concatenate(([0], breaks + 1))]
        lasts = window[np.concatenate((breaks, [len(window) - 1]))]
        return np.maximum(firsts * cs, start), np.minimum((lasts + 1) * cs, end)

    def flush(self) -> None:
        """Every cluster whose state was set before this call is durable, data then map. An
        entry set while it runs waits for the next flush: its data may not be in the fsync."""
        with self._flush_lock:
            with self._state_lock:
                pending, self._pending = self._pending, {}
            self.data.fsync()
            if not pending:
                return
            for start, values in _runs(pending):
                self._map_file.pwrite(values, MAP_HEADER_BYTES + start)
            self._map_file.fsync()

    def close(self) -> None:
        self.data.close()
        self._map_file.close()

    @classmethod
    def create(cls, fileio: FileIO, directory: str, layer_id: str, cluster_size: int,
               visible_below: int) -> DeltaLayer:
        data = fileio.open(os.path.join(directory, data_name(layer_id)), create=True)
        data.fsync()
        map_file = fileio.open(os.path.join(directory, map_name(layer_id)), create=True)
        header = _MAP_HEADER.pack(MAP_MAGIC, MAP_VERSION, cluster_size)
        map_file.pwrite(header.ljust(MAP_HEADER_BYTES, b"\0"), 0)
        map_file.fsync()
        return cls(layer_id, data, map_file, cluster_size, {}, visible_below)

    @classmethod
    def open(cls, fileio: FileIO, directory: str, layer_id: str, cluster_size: int,
             visible_below: int) -> DeltaLayer:
        data = fileio.open(os.path.join(directory, data_name(layer_id)))
        map_file = fileio.open(os.path.join(directory, map_name(layer_id)))
        what = map_name(layer_id)
        magic, version, stored_cluster = _MAP_HEADER.unpack_from(
            map_file.pread(_MAP_HEADER.size, 0))
        if magic != MAP_MAGIC:
            raise CorruptMetadata(f"{what}: not a blocktrail cluster map")
        if version != MAP_VERSION:
            raise UnsupportedFormat(f"{what}: cluster map version {version} is not supported")
        if stored_cluster != cluster_size:
            raise CorruptMetadata(f"{what}: cluster size {stored_cluster} != {cluster_size}")
        states: dict[int, ClusterState] = {}
        for ext in map_file.data_extents():
            lo = max(ext.offset, MAP_HEADER_BYTES)
            if lo >= ext.end:
                continue
            raw = np.frombuffer(map_file.pread(ext.end - lo, lo), dtype=np.uint8)
            where = np.flatnonzero(raw)
            values = raw[where]
            if len(values) and int(values.max()) > ClusterState.ZERO:
                raise CorruptMetadata(f"{what}: invalid cluster state {int(values.max())}")
            first = lo - MAP_HEADER_BYTES
            for index, value in zip(where.tolist(), values.tolist(), strict=True):
                states[first + index] = ClusterState(value)
        return cls(layer_id, data, map_file, cluster_size, states, visible_below)


Layer = BaseLayer | DeltaLayer
_EMPTY = np.zeros(0, dtype=np.int64)


def _arrays(extents: list[Extent]) -> tuple[IntArray, IntArray]:
    starts = np.fromiter((e.offset for e in extents), dtype=np.int64, count=len(extents))
    lengths = np.fromiter((e.length for e in extents), dtype=np.int64, count=len(extents))
    return starts, starts + lengths


def _runs(entries: dict[int, ClusterState]) -> list[tuple[int, bytes]]:
    """Group map entries into runs of consecutive cluster indexes for few writes."""
    out: list[tuple[int, bytearray]] = []
    for cluster in sorted(entries):
        if out and out[-1][0] + len(out[-1][1]) == cluster:
            out[-1][1].append(entries[cluster])
        else:
            out.append((cluster, bytearray([entries[cluster]])))
    return [(start, bytes(values)) for start, values in out]
