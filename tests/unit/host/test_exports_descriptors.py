"""Block status descriptors as the wire carries them, against a plain reference: one (length,
flags) pair per run of one state, in order, covering the range (or its start, when cut)."""

from __future__ import annotations

import struct

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from blocktrail.host.exports import MAX_DESCRIPTORS, descriptors


def reference(areas: list[tuple[int, int]], start: int, end: int, inside: int, outside: int, *,
              one: bool) -> bytes:
    runs: list[list[int]] = []
    pos = start
    for lo, hi in [*areas, (end, end)]:
        for length, flags in ((lo - pos, outside), (hi - lo, inside)):
            if not length:
                continue
            if runs and runs[-1][1] == flags:
                runs[-1][0] += length
            else:
                runs.append([length, flags])
        pos = hi
    runs = runs[: 1 if one else MAX_DESCRIPTORS]
    return b"".join(struct.pack(">II", length, flags) for length, flags in runs)


@st.composite
def marked_range(draw: st.DrawFn) -> tuple[list[tuple[int, int]], int, int]:
    start = draw(st.integers(0, 1 << 20))
    end = start + draw(st.integers(1, (1 << 32) - 1))
    cuts = sorted(draw(st.sets(st.integers(start, end), max_size=40)))
    cuts += draw(st.lists(st.sampled_from(cuts), max_size=6)) if cuts else []  # adjacent areas
    cuts.sort()
    areas = [(lo, hi) for lo, hi in zip(cuts[0::2], cuts[1::2], strict=False) if lo < hi]
    return areas, start, end


@settings(max_examples=400, deadline=None)
@given(marked_range(), st.sampled_from([(1, 0), (0, 3), (2, 2)]), st.booleans())
def test_descriptors_equal_the_reference(case: tuple[list[tuple[int, int]], int, int],
                                         states: tuple[int, int], one: bool) -> None:
    areas, start, end = case
    lo = np.array([a for a, _ in areas], dtype=np.int64)
    hi = np.array([b for _, b in areas], dtype=np.int64)
    inside, outside = states
    assert descriptors((lo, hi), start, end, inside, outside, one=one) == \
        reference(areas, start, end, inside, outside, one=one)


def test_a_long_answer_is_cut_at_the_descriptor_limit() -> None:
    lo = np.arange(1, 4 * MAX_DESCRIPTORS, 4, dtype=np.int64)
    payload = descriptors((lo, lo + 2), 0, 4 * MAX_DESCRIPTORS + 10, 1, 0, one=False)
    areas = [(int(a), int(a) + 2) for a in lo]
    assert len(payload) == 8 * MAX_DESCRIPTORS
    assert payload == reference(areas, 0, 4 * MAX_DESCRIPTORS + 10, 1, 0, one=False)
