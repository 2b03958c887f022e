"""The answer to "what changed since change ID X?"."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import repeat
from typing import Any

import numpy as np
import numpy.typing as npt

from blocktrail.extents import Extent

IntArray = npt.NDArray[np.int64]


class DiskChangeInfo:
    """Areas changed inside ``[start_offset, start_offset + length)``, as VMware's type of the
    same name: sorted, merged, granule-aligned (except where clipped to the window).

    The areas are kept as two int64 arrays (`offsets`, `lengths`); `changed_areas` builds the
    `Extent` tuple on first use, so a 100,000-extent answer costs its Python objects only when
    someone asks for them."""

    __slots__ = ("_areas", "_lengths", "_offsets", "length", "start_offset")

    def __init__(self, start_offset: int, length: int,
                 changed_areas: Iterable[Extent] = ()) -> None:
        self.start_offset = start_offset
        self.length = length
        areas = tuple(changed_areas)
        self._areas: tuple[Extent, ...] | None = areas
        self._offsets = np.array([e.offset for e in areas], dtype=np.int64)
        self._lengths = np.array([e.length for e in areas], dtype=np.int64)

    @classmethod
    def from_arrays(cls, start_offset: int, length: int, offsets: IntArray,
                    lengths: IntArray) -> DiskChangeInfo:
        info = cls(start_offset, length)
        info._offsets, info._lengths, info._areas = offsets, lengths, None
        return info

    @property
    def end(self) -> int:
        return self.start_offset + self.length

    @property
    def offsets(self) -> IntArray:
        return self._offsets

    @property
    def lengths(self) -> IntArray:
        return self._lengths

    @property
    def changed_bytes(self) -> int:
        return int(self._lengths.sum())

    @property
    def changed_areas(self) -> tuple[Extent, ...]:
        if self._areas is None:
            pairs = zip(self._offsets.tolist(), self._lengths.tolist(), strict=True)
            self._areas = tuple(map(tuple.__new__, repeat(Extent), pairs))
        return self._areas

    def __len__(self) -> int:
        return len(self._offsets)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DiskChangeInfo):
            return NotImplemented
        return (self.start_offset, self.length) == (other.start_offset, other.length) and (
            np.array_equal(self._offsets, other._offsets)
            and np.array_equal(self._lengths, other._lengths))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"DiskChangeInfo(start_offset={self.start_offset}, length={self.length}, "
                f"changed_areas={list(self.changed_areas)!r})")

    def to_json(self) -> dict[str, Any]:
        return {
            "start_offset": self.start_offset,
            "length": self.length,
            "changed_areas": [{"offset": o, "length": n} for o, n in
                              zip(self._offsets.tolist(), self._lengths.tolist(), strict=True)],
        }
