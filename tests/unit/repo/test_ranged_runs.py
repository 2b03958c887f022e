"""How a restore groups the chunks it wants into ranged reads (`ranged_runs`): every chunk in
exactly one read, each read one stretch of one pack, and a pack's chunks that lie together read
together also where chunks of other packs come between them in disk order."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import pairwise
from types import SimpleNamespace
from typing import Any
from unittest.mock import patch

from hypothesis import given, settings
from hypothesis import strategies as st

from blocktrail.repo import runs as runs_module
from blocktrail.repo.packs import Location
from blocktrail.repo.runs import OPEN_RUN_ENTRIES, RANGE_BYTES, RANGE_GAP, ranged_runs

KiB = 1 << 10


@st.composite
def layouts(draw: Any) -> tuple[SimpleNamespace, list[tuple[int, bytes]]]:
    """A store's index (chunks in 1-3 packs, each pack's chunks at increasing offsets, with
    gaps, some bigger than RANGE_GAP) and entries in disk order, some with no copy."""
    count = draw(st.integers(1, 60))
    packs = draw(st.lists(st.sampled_from("abc"), min_size=count, max_size=count))
    ends = {"a": 0, "b": 0, "c": 0}
    index: dict[bytes, Location] = {}
    entries = []
    for i, pack in enumerate(packs):
        name = i.to_bytes(4, "big")
        entries.append((i, name))
        if draw(st.integers(0, 19)) == 0:
            continue  # not in the index: a run of its own
        gap = draw(st.sampled_from([0, 0, 1, 64 * KiB, RANGE_GAP, RANGE_GAP + 1, 2 << 20]))
        length = draw(st.sampled_from([100, 64 * KiB, 1 << 20, 3 << 20]))
        index[name] = Location(pack, ends[pack] + gap, length, length)
        ends[pack] += gap + length
    return SimpleNamespace(index=index), entries


@settings(max_examples=300, deadline=None)
@given(layouts(), st.sampled_from([1, 3, OPEN_RUN_ENTRIES]))
def test_every_chunk_is_in_one_read_of_one_stretch_of_one_pack(
        layout: tuple[SimpleNamespace, list[tuple[int, bytes]]], held: int) -> None:
    """Also when few entries may wait in open runs (``held``)."""
    store, entries = layout
    with patch.object(runs_module, "OPEN_RUN_ENTRIES", held):
        runs = list(ranged_runs(store, entries))  # type: ignore[arg-type]
    assert sorted((i, n) for run in runs for i, n, _ in run) == entries
    for run in runs:
        assert all(loc == store.index.get(name) for _, name, loc in run)
        if run[0][2] is None:
            assert len(run) == 1
            continue
        first = run[0][2]
        assert {loc.pack_id for _, _, loc in run} == {first.pack_id}
        assert [i for i, _, _ in run] == sorted(i for i, _, _ in run)  # disk order kept
        for (_, _, a), (_, _, b) in pairwise(run):
            assert a.offset + a.length <= b.offset <= a.offset + a.length + RANGE_GAP
        span = run[-1][2].offset + run[-1][2].length - first.offset
        assert span <= RANGE_BYTES or len(run) == 1


def test_a_pack_read_goes_on_past_chunks_of_other_packs() -> None:
    """A base's chunks with an incremental's changes between them, in disk order: one read for
    each pack, not one for every change."""
    index = {}
    entries = []
    base = changes = 0
    for i in range(40):
        name = i.to_bytes(4, "big")
        if i % 4 == 3:  # a change, stored in the incremental's pack
            index[name] = Location("inc", changes, 64 * KiB, 64 * KiB)
            changes += 64 * KiB
        else:
            index[name] = Location("base", base, 64 * KiB, 64 * KiB)
        base += 64 * KiB  # the base's copy of a changed chunk is read across, or skipped
        entries.append((i, name))
    runs = list(ranged_runs(SimpleNamespace(index=index), entries))  # type: ignore[arg-type]
    assert sorted(run[0][2].pack_id for run in runs) == ["base", "inc"]


def test_runs_of_many_packs_taking_turns_start_early_and_stay_bounded() -> None:
    """Chunks of 1000 small packs in turn (an image made of many incrementals): the first read
    is yielded after at most OPEN_RUN_ENTRIES entries, not after the whole image, and no more
    than that many wait in open runs."""
    packs = 1000
    index = {}
    entries = []
    for i in range(20 * packs):
        name = i.to_bytes(4, "big")
        index[name] = Location(f"p{i % packs}", (i // packs) * 64 * KiB, 64 * KiB, 64 * KiB)
        entries.append((i, name))
    pulled = 0

    def walked() -> Iterator[tuple[int, bytes]]:
        nonlocal pulled
        for entry in entries:
            pulled += 1
            yield entry

    runs = ranged_runs(SimpleNamespace(index=index), walked())  # type: ignore[arg-type]
    first = next(runs)
    assert pulled <= OPEN_RUN_ENTRIES + 1 and len(first) >= 2
    held_most = 0
    taken = len(first)
    for run in runs:
        taken += len(run)
        held_most = max(held_most, pulled - taken)
    assert taken == len(entries) and held_most <= OPEN_RUN_ENTRIES
