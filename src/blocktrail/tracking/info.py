"""The answer to "what changed since change ID X?"."""

from __future__ import annotations

from dataclasses import dataclass

from blocktrail.extents import Extent


@dataclass(frozen=True, slots=True)
class DiskChangeInfo:
    """Areas changed inside ``[start_offset, start_offset + length)``, as VMware's type of the
    same name: sorted, merged, granule-aligned (except where clipped to the window)."""

    start_offset: int
    length: int
    changed_areas: tuple[Extent, ...]

    @property
    def end(self) -> int:
        return self.start_offset + self.length

    def to_json(self) -> dict[str, object]:
        return {
            "start_offset": self.start_offset,
            "length": self.length,
            "changed_areas": [{"offset": e.offset, "length": e.length} for e in self.changed_areas],
        }
