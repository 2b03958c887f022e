"""A snapshot's dirty map is joined once and kept (tracking/answers.py): a kept answer is never
stale, also where a revert or a reset lets the next snapshot take the same sequence number, and
any window of it says what a fresh join says there."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from pyroaring import BitMap

from blocktrail.disk import Disk
from blocktrail.errors import InvalidArgument, OutOfRange, SnapshotRemoved, StaleChangeId
from blocktrail.tracking import ChangeTracker
from blocktrail.tracking.answers import KeptAnswers, runs_of, runs_within
from faulty import KeepsAnswersAcrossEpochs

GRAIN = 4096
SIZE = 256 * GRAIN


def _granules(disk: Disk, since: str, snapshot: str, start: int = 0,
              end: int | None = None) -> set[int]:
    info = disk.query_changed_areas(since, start, snapshot, end_offset=end)
    return {g for o, n in zip(info.offsets.tolist(), info.lengths.tolist(), strict=True)
            for g in range(o // GRAIN, -(-(o + n) // GRAIN))}


def _first(disk: Disk, since: str, snapshot: str) -> set[int]:
    """The granules of the first area of the map (`Disk.try_first_changed_area`: from the
    answer kept whole, as QEMU's one-extent questions are answered)."""
    record = next(s for s in disk.snapshots if s.name == snapshot)
    area = disk.try_first_changed_area(since, 0, record)
    assert area is not None  # kept: the map was just asked for whole
    return set(range(area[0] // GRAIN, -(-area[1] // GRAIN)))


def _revert_then_same_number(tmp_path: Path, tracker_class: type[ChangeTracker]
                             ) -> tuple[set[int], set[int]]:
    """s1 holds granule 10; reverted to s0, the disk writes granule 20 and takes s1 again
    (the same sequence number, in a new epoch): what the map of s0..s1 says, whole and its
    first area."""
    with Disk.create(str(tmp_path / "d"), SIZE, granularity=GRAIN,
                     tracker_class=tracker_class) as disk:
        since = disk.create_snapshot("s0").change_id
        disk.pwrite(b"a" * GRAIN, 10 * GRAIN)
        disk.create_snapshot("s1")
        assert _granules(disk, since, "s1") == {10}  # joined and kept
        disk.revert_to_snapshot("s0")
        disk.pwrite(b"b" * GRAIN, 20 * GRAIN)
        disk.create_snapshot("s1")
        return _granules(disk, since, "s1"), _first(disk, since, "s1")


def test_a_revert_never_leaves_a_stale_answer(tmp_path: Path) -> None:
    assert _revert_then_same_number(tmp_path, ChangeTracker) == ({20}, {20})


def test_the_revert_test_catches_answers_kept_across_epochs(tmp_path: Path) -> None:
    assert _revert_then_same_number(tmp_path, KeepsAnswersAcrossEpochs) == ({10}, {10})


def _reset_then_same_numbers(tmp_path: Path, tracker_class: type[ChangeTracker]
                             ) -> tuple[set[int], set[int]]:
    """s0..s1 holds granule 10; after a reset, s2..s3 (the same sequence numbers, in a new
    epoch) holds granule 40: what the map of s2..s3 says, whole and its first area."""
    with Disk.create(str(tmp_path / "d"), SIZE, granularity=GRAIN,
                     tracker_class=tracker_class) as disk:
        since = disk.create_snapshot("s0").change_id
        disk.pwrite(b"a" * GRAIN, 10 * GRAIN)
        disk.create_snapshot("s1")
        assert _granules(disk, since, "s1") == {10}
        disk.reset_tracking()
        since = disk.create_snapshot("s2").change_id
        disk.pwrite(b"c" * GRAIN, 40 * GRAIN)
        disk.create_snapshot("s3")
        return _granules(disk, since, "s3"), _first(disk, since, "s3")


def test_a_reset_never_leaves_a_stale_answer(tmp_path: Path) -> None:
    assert _reset_then_same_numbers(tmp_path, ChangeTracker) == ({40}, {40})


def test_the_reset_test_catches_answers_kept_across_epochs(tmp_path: Path) -> None:
    assert _reset_then_same_numbers(tmp_path, KeepsAnswersAcrossEpochs) == ({10}, {10})


def test_every_window_of_a_kept_answer_is_what_a_fresh_join_says(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(3)
    with Disk.create(str(tmp_path / "d"), SIZE, granularity=GRAIN) as disk:
        since = disk.create_snapshot("s0").change_id
        for name in ("s1", "s2"):
            for _ in range(60):
                disk.pwrite(b"x" * rng.choice((1, GRAIN, 3 * GRAIN)),
                            rng.randrange(SIZE - 3 * GRAIN))
            disk.create_snapshot(name)
        windows = []
        for _ in range(200):
            start = rng.randrange(SIZE - 1)
            windows.append((start, min(SIZE, start + rng.choice((1, 700, GRAIN, 9 * GRAIN)))))
        kept = [_granules(disk, since, "s2", s, e) for s, e in windows]
        # the same windows, each joined from the intervals' bitmaps for itself alone
        monkeypatch.setattr(ChangeTracker, "_closed_runs", lambda self, joined, up_to: None)
        assert kept == [_granules(disk, since, "s2", s, e) for s, e in windows]


def test_runs_within_clips_the_runs_at_both_ends() -> None:
    runs = runs_of(BitMap([1, 2, 3, 7, 8, 20]))
    assert [r.tolist() for r in runs] == [[1, 7, 20], [4, 9, 21]]
    assert [r.tolist() for r in runs_within(runs, 2, 8)] == [[2, 7], [4, 8]]
    assert [r.tolist() for r in runs_within(runs, 4, 7)] == [[], []]
    assert [r.tolist() for r in runs_within(runs, 0, 100)] == [[1, 7, 20], [4, 9, 21]]
    assert [r.tolist() for r in runs_of(BitMap())] == [[], []]


def test_kept_answers_hold_a_bounded_number_of_runs() -> None:
    kept = KeptAnswers(max_runs=5)
    three, two = runs_of(BitMap([1, 3, 5])), runs_of(BitMap([1, 3]))
    kept.put(("e", 0, 1), three)
    kept.put(("e", 0, 2), two)
    assert kept.get(("e", 0, 1)) is three
    kept.put(("e", 1, 2), two)  # 7 runs: the least recently asked goes
    assert kept.get(("e", 0, 2)) is None
    assert kept.get(("e", 0, 1)) is three and kept.get(("e", 1, 2)) is two
    kept.put(("e", 0, 3), runs_of(BitMap(range(0, 20, 2))))  # 10 runs: never kept
    assert kept.get(("e", 0, 3)) is None


def test_runs_of_a_window_are_those_of_the_whole_clipped() -> None:
    granules = BitMap([0, 1, 2, 5, 9, 10, 11, 12, 30])
    for lo in range(0, 32, 3):
        for hi in range(lo + 1, 34, 4):
            assert [r.tolist() for r in runs_of(granules, lo, hi)] == \
                [r.tolist() for r in runs_within(runs_of(granules), lo, hi)]


def test_an_answer_of_n_extents_ends_where_the_nth_does(tmp_path: Path) -> None:
    with Disk.create(str(tmp_path / "d"), SIZE, granularity=GRAIN) as disk:
        since = disk.create_snapshot("s0").change_id
        for g in (3, 4, 10, 20):
            disk.pwrite(b"a" * GRAIN, g * GRAIN)
        disk.create_snapshot("s1")
        for snapshot in ("s1", None):
            one = disk.query_changed_areas(since, 0, snapshot, max_extents=1)
            assert [(e.offset, e.length) for e in one.changed_areas] == [(3 * GRAIN, 2 * GRAIN)]
            assert one.end == 5 * GRAIN
            two = disk.query_changed_areas(since, 4 * GRAIN + 5, snapshot, max_extents=2)
            assert [(e.offset, e.length) for e in two.changed_areas] == \
                [(4 * GRAIN + 5, GRAIN - 5), (10 * GRAIN, GRAIN)]
            assert two.end == 11 * GRAIN
            assert disk.query_changed_areas(since, 21 * GRAIN, snapshot, max_extents=1).end \
                == SIZE  # none left: the answer covers the rest
        with pytest.raises(InvalidArgument, match="at least 1"):
            disk.query_changed_areas(since, 0, "s1", max_extents=0)
        with pytest.raises(InvalidArgument, match="at least 1"):
            disk.try_query_changed_areas(since, 0, "s1", max_granules=10, max_extents=0)


def test_the_first_area_is_that_of_a_one_extent_answer(tmp_path: Path) -> None:
    """`Disk.try_first_changed_area` (the answer kept whole, no arrays) says what
    `query_changed_areas` with ``max_extents=1`` says, for any window; None until the answer
    is kept; and refuses what the query refuses."""
    rng = random.Random(5)
    with Disk.create(str(tmp_path / "d"), SIZE, granularity=GRAIN) as disk:
        since = disk.create_snapshot("s0").change_id
        for _ in range(80):
            disk.pwrite(b"x" * rng.choice((1, GRAIN, 3 * GRAIN)), rng.randrange(SIZE - 3 * GRAIN))
        record = disk.create_snapshot("s1")
        assert disk.try_first_changed_area(since, 0, record) is None  # not joined yet
        disk.query_changed_areas(since, 0, "s1")  # joined whole, and kept
        for _ in range(400):
            start = rng.randrange(SIZE)
            end = rng.choice((None, min(SIZE, start + rng.choice((1, 700, GRAIN, 9 * GRAIN)))))
            one = disk.query_changed_areas(since, start, "s1", end_offset=end, max_extents=1)
            expected = (int(one.offsets[0]), int(one.offsets[0] + one.lengths[0])) if len(one) \
                else (one.end, one.end)
            assert disk.try_first_changed_area(since, start, record, end_offset=end) \
                == expected, (start, end)
        with pytest.raises(OutOfRange):
            disk.try_first_changed_area(since, SIZE, record)
        disk.reset_tracking()
        with pytest.raises(StaleChangeId):
            disk.try_first_changed_area(since, 0, record)
        disk.remove_snapshot("s1")
        with pytest.raises(SnapshotRemoved):
            disk.try_first_changed_area(since, 0, record)
