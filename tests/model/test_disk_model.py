"""The disk and its tracker against a flat-bytearray model (hypothesis stateful testing).

Rules: write, zero, trim, flush, snapshot, step-by-step consolidation interleaved with writes,
whole removal, revert, grow and shrink across 2^k boundaries, crash (process kill, and power loss
on the simulated file system), clean reopen, a file edited outside blocktrail, reset.

Invariants after every step: the live content and every snapshot's content equal the model; for
every valid change ID c and every snapshot s (and "now"), the reported areas cover every granule
that differs between c's point and s; the refused change IDs are exactly the stale ones; and
every answer the tracker gives from what it kept equals the same intervals joined afresh.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from pyroaring import BitMap

from blocktrail.disk import Consolidation, Disk
from blocktrail.errors import InvalidChangeId, StaleChangeId
from blocktrail.simfileio import SimulatedFileIO
from blocktrail.tracking import ChangeTracker
from blocktrail.tracking.answers import Runs, runs_of
from faulty import DropsMarksDuringConsolidation, ForgetsGrownArea

GRANULARITY = 512
CLUSTER = 1024
PATH = "/sim/disk"
SIZES = [512, 1536, 4096, 8192, 8192 + 700, 16384, 16384 + 512, 32768, 65536 - 100, 65536]


class ChecksKeptAnswers(ChangeTracker):
    """Compares every answer it gives from what it kept (tracking/answers.py) with the same
    intervals joined afresh: a kept answer is never stale."""

    def _closed_runs(self, joined: range, join_up_to: int) -> Runs | None:
        runs = super()._closed_runs(joined, join_up_to)
        if runs is not None:
            fresh = runs_of(BitMap.union(BitMap(), *(self._intervals[s][1] for s in joined)))
            assert all(np.array_equal(a, b) for a, b in zip(runs, fresh, strict=True)), \
                f"the kept answer after {joined.start - 1} up to {joined.stop - 1} is stale"
        return runs


@dataclass
class Point:
    """A change ID the model knows, the content at its point, and whether it is still valid."""

    change_id: str
    content: bytes
    order: int
    same_as: int  # the order of the point this one names (a revert re-names its target)
    stale: bool = False


class DiskMachine(RuleBasedStateMachine):
    tracker_class: type[ChangeTracker] = ChecksKeptAnswers

    def __init__(self) -> None:
        super().__init__()
        self.fs = SimulatedFileIO()
        self.disk: Disk
        self.model = bytearray()
        self.snapshots: dict[str, tuple[bytes, Point]] = {}
        self.points: list[Point] = []
        self.consolidation: Consolidation | None = None
        self.counter = 0

    # -------------------------------------------------------------- helpers

    def _open(self) -> None:
        self.disk = Disk.open(PATH, fileio=self.fs, tracker_class=self.tracker_class)

    def _point(self, change_id: str, same_as: int | None = None) -> Point:
        self.counter += 1
        point = Point(change_id, bytes(self.model), self.counter,
                      self.counter if same_as is None else same_as)
        self.points.append(point)
        return point

    def _all_stale(self) -> None:
        for point in self.points:
            point.stale = True

    def _current_point(self) -> None:
        self._point(self.disk.current_change_id)

    # -------------------------------------------------------------- rules

    @initialize(size=st.sampled_from(SIZES))
    def create(self, size: int) -> None:
        self.disk = Disk.create(PATH, size, GRANULARITY, cluster_size=CLUSTER, fileio=self.fs,
                                tracker_class=self.tracker_class)
        self.model = bytearray(size)
        self._current_point()

    # at_once: first as the NBD server's event loop asks (done at once or not at all), then,
    # if not done, waiting
    @rule(data=st.data(), at_once=st.booleans())
    def write(self, data: st.DataObject, at_once: bool) -> None:
        size = len(self.model)
        if size == 0:
            return
        offset = data.draw(st.integers(0, size - 1))
        length = data.draw(st.integers(1, min(3 * CLUSTER, size - offset)))
        fill = data.draw(st.integers(1, 255))
        buf = bytes([fill]) * length
        if not (at_once and self.disk.try_pwrite(buf, offset)):
            self.disk.pwrite(buf, offset)
        self.model[offset : offset + length] = buf

    @rule(data=st.data(), trim=st.booleans(), at_once=st.booleans())
    def zero(self, data: st.DataObject, trim: bool, at_once: bool) -> None:
        size = len(self.model)
        if size == 0:
            return
        offset = data.draw(st.integers(0, size - 1))
        length = data.draw(st.integers(1, size - offset))
        if not (at_once and self.disk.try_zero(length, offset)):
            (self.disk.trim if trim else self.disk.zero)(length, offset)
        self.model[offset : offset + length] = bytes(length)

    @rule()
    def flush(self) -> None:
        self.disk.flush()

    @rule()
    def snapshot(self) -> None:
        self.counter += 1
        name = f"s{self.counter}"
        snap = self.disk.create_snapshot(name)
        self.snapshots[name] = (bytes(self.model), self._point(snap.change_id))

    @precondition(lambda self: self.snapshots)
    @rule(data=st.data())
    def begin_remove(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.snapshots)))
        self.consolidation = self.disk.begin_remove_snapshot(name)
        del self.snapshots[name]

    @precondition(lambda self: self.consolidation is not None and not self.consolidation.done)
    @rule(clusters=st.integers(1, 4))
    def consolidation_step(self, clusters: int) -> None:
        assert self.consolidation is not None
        self.consolidation.step(max_clusters=clusters)

    @precondition(lambda self: self.snapshots)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.snapshots)))
        self.disk.remove_snapshot(name)
        del self.snapshots[name]

    @precondition(lambda self: self.snapshots)
    @rule(data=st.data())
    def revert(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.snapshots)))
        content, target = self.snapshots[name]
        order = [s.name for s in self.disk.snapshots]
        self.disk.revert_to_snapshot(name)
        for later in order[order.index(name) + 1 :]:
            self.snapshots.pop(later, None)
        self.model = bytearray(content)
        if target.stale:  # the snapshot predates the epoch: tracking restarts
            self._all_stale()
            self._current_point()
            return
        for point in self.points:  # every point after the snapshot's is reverted past
            if point.same_as > target.same_as:
                point.stale = True
        self._point(self.disk.current_change_id, same_as=target.same_as)

    @rule(size=st.sampled_from(SIZES))
    def resize(self, size: int) -> None:
        self.disk.resize(size)
        if size < len(self.model):
            del self.model[size:]
        else:
            self.model += bytes(size - len(self.model))

    @rule(power_loss=st.sampled_from(["none", "unsynced lost", "unsynced torn"]),
          seed=st.integers(0, 1 << 16))
    def crash(self, power_loss: str, seed: int) -> None:
        """The process dies after a flush; the power too, perhaps (what was not synced lost,
        or each sector of it kept or lost at random)."""
        self.disk.flush()
        self.disk.abandon()
        if power_loss != "none":
            self.fs.torn = random.Random(seed) if power_loss == "unsynced torn" else None
            self.fs.power_loss()
        self.consolidation = None
        self._open()

    @rule()
    def reopen(self) -> None:
        self.disk.close()
        self.consolidation = None
        self._open()

    @rule()
    def edit_outside(self) -> None:
        """Another program rewrites a byte of a layer file (same value) while the disk is
        closed: the tracker cannot vouch for the history any more."""
        self.disk.close()
        self.consolidation = None
        name = next(n for n in self.fs.listdir(PATH) if n.endswith(".img"))
        path = os.path.join(PATH, name)
        self.fs.tamper(path, self.fs.read_file(path)[:1] or b"", 0)
        self._open()
        self._all_stale()
        self._current_point()

    @rule()
    def reset(self) -> None:
        self.disk.reset_tracking()
        self._all_stale()
        self._current_point()

    # -------------------------------------------------------------- invariants

    @invariant()
    def content_matches(self) -> None:
        assert self.disk.size_bytes == len(self.model)
        assert self.disk.pread(len(self.model), 0) == bytes(self.model)
        listed = {s.name for s in self.disk.snapshots}
        assert listed == set(self.snapshots)
        for name, (content, _) in self.snapshots.items():
            view = self.disk.open_snapshot(name)
            assert view.size_bytes == len(content)
            assert view.pread(len(content), 0) == content, f"snapshot {name} changed"

    @invariant()
    def tracking_covers_changes(self) -> None:
        ends: list[tuple[str | None, bytes, Point | None]] = [(None, bytes(self.model), None)]
        ends += [(name, content, point) for name, (content, point) in self.snapshots.items()]
        for point in self.points[:1] + self.points[-6:]:
            for snapshot, content, end_point in ends:
                self._check_query(point, snapshot, content, end_point)

    def _check_query(self, point: Point, snapshot: str | None, content: bytes,
                     end_point: Point | None) -> None:
        size = len(content)
        if size == 0:
            return
        try:
            reported = self._reported(point.change_id, snapshot, size)
        except StaleChangeId:
            assert point.stale or (end_point is not None and end_point.stale), \
                f"valid change ID {point.change_id} refused as stale"
            return
        except InvalidChangeId:
            assert end_point is not None and end_point.same_as < point.same_as, \
                f"change ID {point.change_id} refused as invalid"
            return
        assert not point.stale, f"stale change ID {point.change_id} was answered"
        assert end_point is None or not end_point.stale, "a stale snapshot point was answered"
        before = point.content
        for g in range(-(-size // GRANULARITY)):
            lo, hi = g * GRANULARITY, min((g + 1) * GRANULARITY, size)
            if hi > len(before) or before[lo:hi] != content[lo:hi]:
                assert g in reported, (
                    f"granule {g} differs between {point.change_id} and "
                    f"{snapshot or 'now'} but is not reported")

    def _reported(self, change_id: str, snapshot: str | None, size: int) -> set[int]:
        out: set[int] = set()
        start = 0
        while start < size:
            info = self.disk.query_changed_areas(change_id, start, snapshot)
            previous_end = start
            for area in info.changed_areas:
                assert area.offset >= previous_end, "extents not sorted and disjoint"
                assert area.offset % GRANULARITY == 0 or area.offset == start
                assert area.end % GRANULARITY == 0 or area.end == size
                out.update(range(area.offset // GRANULARITY, (area.end - 1) // GRANULARITY + 1))
                previous_end = area.end
            assert info.length > 0
            start = info.end
        return out

    def teardown(self) -> None:
        if not self.disk.closed:
            self.disk.close()


TestDiskMachine = DiskMachine.TestCase  # examples and steps: the profile in tests/conftest.py


@pytest.mark.parametrize("faulty", [DropsMarksDuringConsolidation, ForgetsGrownArea])
def test_machine_finds_faulty_tracker(faulty: type[ChangeTracker]) -> None:
    machine = type(f"{faulty.__name__}Machine", (DiskMachine,), {"tracker_class": faulty})
    with pytest.raises(AssertionError, match="is not reported"):
        run_state_machine_as_test(machine, settings=settings(
            max_examples=3000, stateful_step_count=30, deadline=None, database=None,
            suppress_health_check=list(HealthCheck), print_blob=False))
