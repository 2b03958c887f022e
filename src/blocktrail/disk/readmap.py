"""A read mapped to layer files, so a server can send the bytes without copying them.

`Disk.map_read` resolves a range of a view, under the disk's read lock, to pieces of layer
files and zeros, and hands out *duplicate* descriptors of those files: a consolidation or revert
may close and delete a layer the moment the lock is released, but a duplicate keeps the open
file. What a snapshot's view maps stays the snapshot's bytes until the read is closed: a merge
changes a layer only where a layer above it in the view holds the bytes, except the merge that
removes the snapshot itself (the next layer goes into the snapshot's layer in place), and the
read pins the snapshot (`LayerStack.pin`; `close` lets it go), so that merge waits for it. Such
a read is to be copied when sent (``copy``), not spliced: a page spliced into a socket is read
when the peer takes it, which may be after the close. (On the live view a write that overlaps
an in-flight read may show through, as with any disk.)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from blocktrail.disk.chain import Piece
from blocktrail.disk.layers import BaseLayer, Layer


@dataclass(frozen=True, slots=True)
class ReadSegment:
    """``length`` bytes at logical ``offset``: in the file ``fd`` at the same offset, in
    ``data``, or zeros when both are None."""

    offset: int
    length: int
    fd: int | None = None
    data: bytes | None = None

    @property
    def is_zero(self) -> bool:
        return self.fd is None and self.data is None


class MappedRead:
    """The segments of one read, in order; owns the duplicate descriptors and the pin of a
    snapshot's layer (`close` lets both go: every reader must close it, also on errors)."""

    def __init__(self, offset: int, length: int, segments: list[ReadSegment],
                 fds: list[int]) -> None:
        self.offset, self.length = offset, length
        self.segments = segments
        self._fds = fds
        self._release: Callable[[], None] | None = None
        self.copy = False  # see `on_close`

    def on_close(self, release: Callable[[], None]) -> None:
        """Call ``release`` (once, on any thread; it must not raise) when the read is closed.
        What it releases may change the files afterwards, so a sender copies the bytes out
        before it closes the read (``copy``), rather than splice pages the peer takes later."""
        self._release = release
        self.copy = True

    @classmethod
    def from_pieces(cls, offset: int, length: int, pieces: list[Piece], *,
                    wait: bool = True) -> MappedRead | None:
        """``wait=False``: None instead of fetching what a restoring base does not hold yet."""
        for layer, at, n in pieces:
            if isinstance(layer, BaseLayer):
                if not wait and not layer.is_local(at, n):
                    return None
                layer.prepare(at, n)
        fds: dict[int, int | None] = {}  # id(layer) -> its duplicate descriptor
        sizes: dict[int, int] = {}
        segments: list[ReadSegment] = []
        try:
            for layer, at, n in pieces:
                if layer is None:
                    segments.append(ReadSegment(at, n))
                    continue
                key = id(layer)
                if isinstance(layer, BaseLayer):  # a raw image may end before the disk does
                    size = sizes.setdefault(key, layer.data.size())
                    if at + n > size:
                        stored = max(0, size - at)
                        if stored:
                            segments.append(_segment(layer, fds, at, stored))
                        segments.append(ReadSegment(at + stored, n - stored))
                        continue
                segments.append(_segment(layer, fds, at, n))
        except BaseException:
            _close_all([fd for fd in fds.values() if fd is not None])
            raise
        return cls(offset, length, segments, [fd for fd in fds.values() if fd is not None])

    def read(self) -> bytes:
        """The bytes themselves (for a reader that cannot send from a file)."""
        return b"".join(_segment_bytes(s) for s in self.segments)

    def close(self) -> None:
        fds, self._fds = self._fds, []
        release, self._release = self._release, None
        _close_all(fds)
        if release is not None:
            release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _segment(layer: Layer, fds: dict[int, int | None], at: int, n: int) -> ReadSegment:
    key = id(layer)
    if key not in fds:
        fds[key] = layer.data.dup()
    fd = fds[key]
    if fd is None:
        return ReadSegment(at, n, data=layer.data.pread(n, at))
    return ReadSegment(at, n, fd=fd)


def _segment_bytes(segment: ReadSegment) -> bytes:
    if segment.data is not None:
        return segment.data
    if segment.fd is None:
        return bytes(segment.length)
    data = os.pread(segment.fd, segment.length, segment.offset)
    return data + bytes(segment.length - len(data))  # a file that ends early reads zeros


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
