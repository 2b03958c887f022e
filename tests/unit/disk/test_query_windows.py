"""A query of a small window of a much-changed disk looks at that window only (tracker slices
each interval's bitmap), and answers exactly what a query of the whole disk says there."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from pyroaring import BitMap

from blocktrail.disk import Disk
from blocktrail.tracking import tracker as tracker_module

GRAIN = 4096
SIZE = 4096 * GRAIN


def _marked(disk: Disk, since: str, snapshot: str | None) -> set[int]:
    info = disk.query_changed_areas(since, 0, snapshot)
    return {g for o, n in zip(info.offsets.tolist(), info.lengths.tolist(), strict=True)
            for g in range(o // GRAIN, -(-(o + n) // GRAIN))}


def test_windows_answer_what_the_whole_disk_says(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    sliced: list[int] = []
    window = tracker_module._window

    def counting(granules: BitMap, lo: int, hi: int, *, copy: bool = False) -> BitMap:
        out = window(granules, lo, hi, copy=copy)
        sliced.append(out is not granules and len(out) < len(granules))
        return out

    monkeypatch.setattr(tracker_module, "_window", counting)
    rng = random.Random(7)
    with Disk.create(str(tmp_path / "d"), SIZE, granularity=GRAIN) as disk:
        since = str(disk.current_change_id)
        for name in ("s1", "s2"):  # two intervals and the open one
            for _ in range(600):
                disk.pwrite(b"x" * rng.choice((1, 100, GRAIN, 3 * GRAIN)),
                            rng.randrange(SIZE - 3 * GRAIN))
            disk.create_snapshot(name)
        for _ in range(300):
            disk.pwrite(b"y", rng.randrange(SIZE))
        for snapshot in (None, "s1", "s2"):
            whole = _marked(disk, since, snapshot)
            for _ in range(40):
                start = rng.randrange(SIZE - 1)
                end = min(SIZE, start + rng.choice((1, 700, GRAIN, 5 * GRAIN, 64 * GRAIN)))
                info = disk.query_changed_areas(since, start, snapshot, end_offset=end)
                got = {g for o, n in zip(info.offsets.tolist(), info.lengths.tolist(),
                                         strict=True)
                       for g in range(o // GRAIN, -(-(o + n) // GRAIN))}
                assert got == {g for g in whole if start // GRAIN <= g < -(-end // GRAIN)}
                assert all(start <= o and o + n <= end for o, n in
                           zip(info.offsets.tolist(), info.lengths.tolist(), strict=True))
    assert any(sliced)  # small windows were sliced out, not converted whole
