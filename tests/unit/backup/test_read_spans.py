"""How a backup groups the chunks it reads: runs of consecutive chunks, at most READ_RUN_BYTES
a read; a full backup reads through small gaps (holes) too, and stores only the chunks wanted."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st

from blocktrail.backup.engine import READ_RUN_BYTES, _spans
from blocktrail.extents import consecutive

CS = 65536
PER_READ = READ_RUN_BYTES // CS


def test_without_gaps_each_read_is_a_run_of_consecutive_chunks() -> None:
    assert list(_spans([1, 2, 3, 7, 8], CS)) == [(1, 3, [1, 2, 3]), (7, 2, [7, 8])]


def test_small_gaps_are_read_through() -> None:
    assert list(_spans([1, 2, 5, 11], CS, gap_chunks=3)) == [(1, 5, [1, 2, 5]),
                                                             (11, 1, [11])]


@given(st.sets(st.integers(0, 2000), min_size=1), st.integers(0, 8))
def test_spans_cover_every_chunk_once_in_bounded_reads(chunks: set[int], gap: int) -> None:
    ordered = sorted(chunks)
    spans = list(_spans(ordered, CS, gap))
    assert [i for _, _, wanted in spans for i in wanted] == ordered
    for first, count, wanted in spans:
        assert wanted[0] == first and wanted[-1] == first + count - 1
        assert count <= PER_READ
        assert all(b - a - 1 <= gap for a, b in pairwise(wanted))
        runs = list(consecutive(wanted))
        assert [first + k for f, n in runs for k in range(f - first, f - first + n)] == wanted
