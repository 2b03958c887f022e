"""Following a paged changed-areas answer: every page starts where the previous one ended."""

from __future__ import annotations

import pytest

from blocktrail.backup.source import all_pages
from blocktrail.errors import InvalidArgument
from blocktrail.extents import Extent
from blocktrail.tracking import DiskChangeInfo

KiB = 1024


def test_pages_are_followed_to_the_end_of_the_disk() -> None:
    asked: list[int] = []

    def query(start: int) -> DiskChangeInfo:
        asked.append(start)
        return DiskChangeInfo(start, 64 * KiB, [Extent(start, 4 * KiB)])

    assert all_pages(query, 192 * KiB) == [Extent(0, 4 * KiB), Extent(64 * KiB, 4 * KiB),
                                           Extent(128 * KiB, 4 * KiB)]
    assert asked == [0, 64 * KiB, 128 * KiB]


@pytest.mark.parametrize("shift", [64 * KiB, -4 * KiB])
def test_a_page_that_starts_elsewhere_than_asked_is_an_error(shift: int) -> None:
    """Past the offset asked: the areas in between were never answered (a silent gap); before
    it: the source is confused about what it was asked."""
    def query(start: int) -> DiskChangeInfo:
        first = start if start == 0 else start + shift
        return DiskChangeInfo(first, 64 * KiB, [])

    with pytest.raises(InvalidArgument, match=f"from offset {64 * KiB + shift} to a query "
                                              f"from offset {64 * KiB}"):
        all_pages(query, 256 * KiB)
