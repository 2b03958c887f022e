"""The base layer of a disk restored instantly from a restore point: local where it has been
filled, fetched from its source (a repository) on first read everywhere else.

A `RestoringLayer` is a base layer (raw image at logical offsets, `layer-<id>.img`) plus a fill
map (`layer-<id>.fill`: one state byte per chunk of the point) saying which chunks are local
(FILLED), which the point holds only zeros for (HOLE), and which must still be fetched
(MISSING). A read is *prepared* first: every missing chunk it touches is fetched (checked by the
source), written into the image and marked filled, so the bytes read are always the point's,
never zeros in their place. A background fill (`fill`) fetches the rest; once every chunk is
local the disk turns the layer into a plain base (`Disk` does that, atomically, in disk.json).

The layer is frozen (no guest write reaches it; they go to the layers above), so the only writer
of its image is the filling itself: fetches of one chunk are never done twice at once, and a
state byte is set only after its chunk's data is written (and made durable before the map, at
`flush`, as a delta layer's cluster map).
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from blocktrail.disk.layers import BaseLayer, data_name
from blocktrail.errors import CorruptMetadata, DiskIOFailure, UnsupportedFormat
from blocktrail.fileio import FileHandle, FileIO, start_writeback
from blocktrail.tracking.info import IntArray

FILL_MAGIC = b"BTFILL\x00"
FILL_VERSION = 1
FILL_HEADER_BYTES = 4096
_FILL_HEADER = struct.Struct("<7sBIQ")
MISSING, FILLED, HOLE = 0, 1, 2
READ_AHEAD_CHUNKS = 16
WRITEBACK_BYTES = 8 << 20  # filled data the kernel is asked to start writing back this often


class ChunkUnavailable(DiskIOFailure):
    """A chunk of a restoring disk's base could not be fetched or failed its check: the read
    fails (an I/O error to the guest); the chunk and the point are named."""


class ChunkSource(Protocol):
    """Where a restoring base layer's chunks come from (a restore point in a repository)."""

    @property
    def chunk_size(self) -> int: ...

    @property
    def size_bytes(self) -> int: ...

    def holes(self) -> list[bool]:
        """Per chunk: True where the point holds only zeros (nothing to fetch)."""
        ...

    def fetch(self, indexes: list[int]) -> Iterator[tuple[int, bytes]]:
        """The chunks' plain bytes, checked, in any order (fetched in parallel); raises
        `ChunkUnavailable` naming the chunk when one cannot be had."""
        ...

    def describe(self) -> dict[str, Any]:
        """What disk.json records so that the source can be opened again (JSON)."""
        ...

    def close(self) -> None: ...


def fill_name(layer_id: str) -> str:
    return f"layer-{layer_id}.fill"


@dataclass(frozen=True, slots=True)
class FillProgress:
    chunks: int  # chunks that hold data in the point
    local: int  # of those, how many are local
    remaining: int

    @property
    def done(self) -> bool:
        return self.remaining == 0

    @property
    def percent(self) -> float:
        return 100.0 if not self.chunks else 100.0 * self.local / self.chunks


class RestoringLayer(BaseLayer):
    kind = "restoring"

    def __init__(self, layer_id: str, data: FileHandle, fill_file: FileHandle, chunk_size: int,
                 states: np.ndarray, source: ChunkSource | None,
                 source_info: dict[str, Any]) -> None:
        super().__init__(layer_id, data)
        self.chunk_size = chunk_size
        self.source = source
        self.source_info = source_info
        self._fill_file = fill_file
        self._states = states  # uint8 per chunk: MISSING / FILLED / HOLE
        self._pending: set[int] = set()  # filled since the last flush
        self._fetching: set[int] = set()
        self._cond = threading.Condition()
        self._flush_lock = threading.Lock()
        self._cursor = 0  # where the background fill goes on
        self._last_read_end = -1
        self._unwritten = 0  # bytes filled since the kernel was last asked to write back

    # ------------------------------------------------------------------ files

    def file_names(self) -> list[str]:
        return [data_name(self.id), fill_name(self.id)]

    @classmethod
    def create(cls, fileio: FileIO, directory: str, layer_id: str,  # type: ignore[override]
               source: ChunkSource) -> RestoringLayer:
        cs = source.chunk_size
        holes = source.holes()
        states = np.where(np.array(holes, dtype=bool), HOLE, MISSING).astype(np.uint8)
        data = fileio.open(os.path.join(directory, data_name(layer_id)), create=True)
        data.truncate(source.size_bytes)
        data.fsync()
        fill = fileio.open(os.path.join(directory, fill_name(layer_id)), create=True)
        header = _FILL_HEADER.pack(FILL_MAGIC, FILL_VERSION, cs, len(states))
        fill.pwrite(header.ljust(FILL_HEADER_BYTES, b"\0") + states.tobytes(), 0)
        fill.fsync()
        return cls(layer_id, data, fill, cs, states, source, source.describe())

    @classmethod
    def open_restoring(cls, fileio: FileIO, directory: str, layer_id: str,
                       source: ChunkSource | None,
                       source_info: dict[str, Any]) -> RestoringLayer:
        data = fileio.open(os.path.join(directory, data_name(layer_id)))
        fill = fileio.open(os.path.join(directory, fill_name(layer_id)))
        what = fill_name(layer_id)
        raw = fill.pread(fill.size(), 0)
        magic, version, cs, count = _FILL_HEADER.unpack_from(raw)
        if magic != FILL_MAGIC:
            raise CorruptMetadata(f"{what}: not a blocktrail fill map")
        if version != FILL_VERSION:
            raise UnsupportedFormat(f"{what}: fill map version {version} is not supported")
        states = np.frombuffer(raw, dtype=np.uint8, count=count,
                               offset=FILL_HEADER_BYTES).copy()
        if len(states) != count or (len(states) and int(states.max()) > HOLE):
            raise CorruptMetadata(f"{what}: damaged fill map")
        if source is not None and source.chunk_size != cs:
            raise CorruptMetadata(f"{what}: chunk size {cs} != the source's "
                                  f"{source.chunk_size}")
        return cls(layer_id, data, fill, cs, states, source, source_info)

    # ------------------------------------------------------------------ reading

    def missing_in(self, offset: int, length: int) -> list[int]:
        if length <= 0:
            return []
        first, last = offset // self.chunk_size, (offset + length - 1) // self.chunk_size
        window = self._states[first : last + 1]
        return (np.flatnonzero(window == MISSING) + first).tolist()

    def is_local(self, offset: int, length: int) -> bool:
        return not self.missing_in(offset, length)

    def prepare(self, offset: int, length: int) -> None:
        """Make ``[offset, offset + length)`` local: fetch what is missing (and, for a read
        that goes on from the last one, the chunks after it)."""
        missing = self.missing_in(offset, length)
        sequential = offset == self._last_read_end
        self._last_read_end = offset + length
        if not missing:
            return
        needed = set(missing)
        if sequential:
            end = min(offset + length + READ_AHEAD_CHUNKS * self.chunk_size,
                      len(self._states) * self.chunk_size)
            missing = self.missing_in(offset, end - offset)
        self._fetch(missing, needed)

    def _fetch(self, wanted: Iterable[int], needed: set[int] | None = None) -> None:
        """Fetch chunks no one else is fetching; wait for those others are. ``needed``: the
        chunks whose failure fails the call (None: all); the others are read ahead, and a
        read-ahead chunk that cannot be had fails only the read that needs it."""
        error: ChunkUnavailable | None = None
        with self._cond:
            wanted = [i for i in wanted if self._states[i] == MISSING]
            mine = [i for i in wanted if i not in self._fetching]
            self._fetching.update(mine)
        try:
            if mine:
                if self.source is None:
                    raise ChunkUnavailable(
                        f"chunk {mine[0]} of this disk's base is not local yet and no source "
                        f"is open to fetch it from ({self._described()}): open the disk "
                        "through its host")
                try:
                    self._fetch_from_source(mine)
                except ChunkUnavailable as exc:  # every chunk that could be had is written
                    error = exc
        finally:
            with self._cond:
                self._fetching.difference_update(mine)
                self._cond.notify_all()
        with self._cond:
            while any(self._states[i] == MISSING and i in self._fetching for i in wanted):
                self._cond.wait()
            failed = [i for i in wanted if self._states[i] == MISSING
                      and (needed is None or i in needed)]
        if not failed:
            return
        if error is not None and needed is not None and len(wanted) > len(needed):
            self._fetch(failed)  # once more without the read-ahead: the error is its own
            return
        raise error or ChunkUnavailable(f"chunk {failed[0]} of this disk's base "
                                        f"({self._described()}) could not be fetched")

    def _fetch_from_source(self, indexes: list[int]) -> None:
        """Write each chunk the source yields, and mark it filled."""
        assert self.source is not None
        for index, data in self.source.fetch(indexes):
            self.data.pwrite(data, index * self.chunk_size)
            with self._cond:
                self._states[index] = FILLED
                self._pending.add(index)
                self._fetching.discard(index)
                self._cond.notify_all()
                self._unwritten += len(data)
                write_back = self._unwritten >= WRITEBACK_BYTES
                if write_back:
                    self._unwritten = 0
            if write_back:  # the fsync at `flush` then finds little left, and the device
                start_writeback(self.data)  # writes while more is fetched

    def _described(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(self.source_info.items())) or "unknown"

    # ------------------------------------------------------------------ filling

    def fill(self, max_chunks: int) -> FillProgress:
        """Fetch up to ``max_chunks`` missing chunks, in order from where the last call
        stopped (reads fetch what they need themselves)."""
        count = len(self._states)
        picked: list[int] = []
        start = self._cursor
        position = np.flatnonzero(self._states[start:] == MISSING)
        if len(position) < max_chunks and start:
            position = np.concatenate((position + start, np.flatnonzero(
                self._states[:start] == MISSING)))
        else:
            position = position + start
        picked = position[:max_chunks].tolist()
        if picked:
            # on past them even if one fails: a chunk that cannot be had now is tried again
            # when the fill comes round to it, and does not hold up the chunks after it
            self._cursor = (picked[-1] + 1) % max(count, 1)
            self._fetch(picked)
        return self.progress()

    def progress(self) -> FillProgress:
        states = self._states
        chunks = int(np.count_nonzero(states != HOLE))
        remaining = int(np.count_nonzero(states == MISSING))
        return FillProgress(chunks, chunks - remaining, remaining)

    def flush(self) -> None:
        """The filled chunks' data, then their states, made durable."""
        with self._flush_lock:
            with self._cond:
                pending, self._pending = sorted(self._pending), set()
            self.data.fsync()
            if not pending:
                return
            for start, end in _runs(pending):
                self._fill_file.pwrite(self._states[start:end].tobytes(),
                                       FILL_HEADER_BYTES + start)
            self._fill_file.fsync()

    def allocated(self, start: int, end: int) -> tuple[IntArray, IntArray]:
        """Where the point holds data (local or not), clipped to ``[start, end)``."""
        cs = self.chunk_size
        first, last = start // cs, -(-end // cs)
        data = np.flatnonzero(self._states[first:last] != HOLE) + first
        if not len(data):
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty
        breaks = np.flatnonzero(np.diff(data) != 1)
        firsts = data[np.concatenate(([0], breaks + 1))].astype(np.int64)
        lasts = data[np.concatenate((breaks, [len(data) - 1]))].astype(np.int64)
        return np.maximum(firsts * cs, start), np.minimum((lasts + 1) * cs, end)

    def close(self) -> None:
        super().close()
        self._fill_file.close()
        if self.source is not None:
            self.source.close()

    def detach_data(self) -> FileHandle:
        """The image, for the plain base layer that takes this one's place (the fill map and
        the source are closed)."""
        self._fill_file.close()
        if self.source is not None:
            self.source.close()
            self.source = None
        return self.data


def _runs(indexes: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i in indexes:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out
