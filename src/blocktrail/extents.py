"""Extent(offset, length) and the extent-list algebra used everywhere (merge, clip, align)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple


class Extent(NamedTuple):
    """A byte range ``[offset, offset + length)``. A named tuple: cheap to make by the 100,000
    in a query answer; callers that take extents from outside check them with `checked`."""

    offset: int
    length: int

    @classmethod
    def checked(cls, offset: int, length: int) -> Extent:
        if offset < 0 or length < 0:
            raise ValueError(f"extent must not be negative: {offset}+{length}")
        return cls(offset, length)

    @property
    def end(self) -> int:
        return self.offset + self.length


def merge(extents: Iterable[Extent]) -> list[Extent]:
    """Sort and coalesce overlapping or touching extents; drop empty ones."""
    out: list[Extent] = []
    for ext in sorted(e for e in extents if e.length):
        if out and ext.offset <= out[-1].end:
            last = out[-1]
            if ext.end > last.end:
                out[-1] = Extent(last.offset, ext.end - last.offset)
        else:
            out.append(ext)
    return out


def clip(extents: Iterable[Extent], start: int, end: int) -> list[Extent]:
    """The parts of ``extents`` inside ``[start, end)``, in input order."""
    out: list[Extent] = []
    for ext in extents:
        lo, hi = max(ext.offset, start), min(ext.end, end)
        if lo < hi:
            out.append(Extent(lo, hi - lo))
    return out


def align_out(ext: Extent, granularity: int) -> Extent:
    """The smallest granularity-aligned extent covering ``ext``."""
    lo = ext.offset - ext.offset % granularity
    hi = -(-ext.end // granularity) * granularity
    return Extent(lo, hi - lo)


def granules(offset: int, length: int, granularity: int) -> range:
    """Indexes of the granules touched by ``[offset, offset + length)``."""
    if length <= 0:
        return range(0)
    return range(offset // granularity, (offset + length - 1) // granularity + 1)


def total_length(extents: Iterable[Extent]) -> int:
    return sum(e.length for e in extents)


def iter_pieces(offset: int, length: int, piece: int) -> Iterator[tuple[int, int]]:
    """Split ``[offset, offset+length)`` at multiples of ``piece``: yields (offset, length)."""
    end = offset + length
    while offset < end:
        stop = min(end, (offset // piece + 1) * piece)
        yield offset, stop - offset
        offset = stop


def consecutive(indexes: Iterable[int]) -> Iterator[tuple[int, int]]:
    """(first, count) of each run of consecutive ``indexes`` (ascending)."""
    first = count = 0
    for index in indexes:
        if count and index == first + count:
            count += 1
            continue
        if count:
            yield first, count
        first, count = index, 1
    if count:
        yield first, count
