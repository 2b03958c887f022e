"""Answers to closed questions, kept: the granules changed after one point up to a later one.

Once a point's interval is closed (`ChangeTracker.advance`), its granules never change: marks go
to the open interval only, and whatever takes history back or ends it (a revert, a reset, a
tracker upgrade) starts a new epoch, in which sequence numbers already used may come again with
other granules. So within one epoch, the answer to "after point A up to point B" is the same each
time it is asked. A client that asks for a snapshot's dirty map piece by piece (QEMU asks for one
extent at a time, each from where the last ended) or again on each connection (``nbdinfo
--map``) pays for joining the intervals once.

Keyed by (epoch, A, B): an answer of an epoch that has ended is never found again (the tracker
also drops them all when it starts an epoch). An answer is kept as its runs of granules; the
answers kept hold at most `MAX_KEPT_RUNS` runs together, the least recently asked going first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import numpy.typing as npt
from pyroaring import BitMap

GranuleArray = npt.NDArray[np.int64]
Runs = tuple[GranuleArray, GranuleArray]  # first granule of each run, and the one after it

# Runs kept per tracker (16 bytes each): 8 MiB at most, however fragmented the answers are.
MAX_KEPT_RUNS = 1 << 19
# A closed question is answered whole (and kept) when its intervals hold at most this many
# granules together (32 GiB of changes at 64 KiB): it has no more runs than granules, so it is
# always kept. A larger one is answered for the window asked only, each time (a small window
# of it costs its own size, not the whole answer's).
MAX_JOINED_GRANULES = MAX_KEPT_RUNS

_EMPTY: GranuleArray = np.empty(0, dtype=np.int64)


class KeptAnswers:
    """The runs of answers already given, by (epoch, after sequence, up to sequence)."""

    def __init__(self, max_runs: int = MAX_KEPT_RUNS) -> None:
        self._max_runs = max_runs
        self._kept: OrderedDict[tuple[str, int, int], Runs] = OrderedDict()
        self._runs = 0
        self._lock = threading.Lock()  # queries run on many threads at once

    def get(self, key: tuple[str, int, int]) -> Runs | None:
        with self._lock:
            runs = self._kept.get(key)
            if runs is not None:
                self._kept.move_to_end(key)
            return runs

    def put(self, key: tuple[str, int, int], runs: Runs) -> None:
        count = len(runs[0])
        if count > self._max_runs:
            return
        with self._lock:
            if key in self._kept:
                return
            while self._runs + count > self._max_runs:
                _, dropped = self._kept.popitem(last=False)
                self._runs -= len(dropped[0])
            self._kept[key] = runs
            self._runs += count

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()
            self._runs = 0


def runs_of(granules: BitMap, lo: int = 0, hi: int | None = None) -> Runs:
    """The runs of consecutive granules of ``granules`` inside [lo, hi): (firsts, ends),
    sorted."""
    if not granules:
        return _EMPTY, _EMPTY
    arr = np.frombuffer(granules.to_array(), dtype=np.uint32)
    if lo > 0 or hi is not None:
        arr = arr[np.searchsorted(arr, lo) : len(arr) if hi is None else np.searchsorted(arr, hi)]
        if not len(arr):
            return _EMPTY, _EMPTY
    breaks = np.flatnonzero(np.diff(arr) != 1)
    firsts = arr[np.concatenate(([0], breaks + 1))].astype(np.int64)
    ends = arr[np.concatenate((breaks, [len(arr) - 1]))].astype(np.int64) + 1
    return firsts, ends


def runs_within(runs: Runs, lo: int, hi: int, limit: int | None = None) -> Runs:
    """The parts of ``runs`` inside granules [lo, hi); the first ``limit`` of them at most."""
    firsts, ends = runs
    i = int(np.searchsorted(ends, lo, side="right"))  # the first run ending past lo
    j = int(np.searchsorted(firsts, hi, side="left"))  # the runs starting before hi
    if limit is not None:
        j = min(j, i + limit)
    if i >= j:
        return _EMPTY, _EMPTY
    firsts, ends = firsts[i:j], ends[i:j]
    if firsts[0] < lo or ends[-1] > hi:  # only the first and the last run can stick out
        firsts, ends = firsts.copy(), ends.copy()
        firsts[0], ends[-1] = max(int(firsts[0]), lo), min(int(ends[-1]), hi)
    return firsts, ends
