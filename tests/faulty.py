"""Test-only trackers that re-create the CBT bugs seen in the field, and shared checks.

The test suites must fail against these: that is the proof they would catch the real bugs."""

from __future__ import annotations

from typing import Any

from blocktrail.disk import Disk
from blocktrail.fileio import FileIO
from blocktrail.tracking import ChangeId, ChangeTracker
from blocktrail.tracking.answers import KeptAnswers, Runs


class DropsMarksDuringConsolidation(ChangeTracker):
    """ESXi 6.0 (KB 2136854): writes made while a snapshot is consolidated go untracked."""

    def mark(self, offset: int, length: int) -> None:
        if not self.consolidation_active:
            super().mark(offset, length)


class ForgetsGrownArea(ChangeTracker):
    """ESXi 4/5 (KB 2090639): the range a disk grew by is not counted as changed."""

    def note_resize(self, old_size: int, new_size: int) -> None:
        self.size_bytes = new_size


class ClearsIntentBeforeResetCommits(ChangeTracker):
    """A tracking reset in the order blocktrail once had: the old epoch's write-intent bits
    cleared (and synced) before the new epoch was committed to disk.json. A crash in between
    reopened the old epoch with writes since the last checkpoint untracked."""

    def restart(self, reason: str) -> ChangeId:
        change_id = super().restart(reason)
        self._intent.clear()
        return change_id


class _EpochBlindAnswers(KeptAnswers):
    def get(self, key: tuple[str, int, int]) -> Runs | None:
        return super().get(("", *key[1:]))

    def put(self, key: tuple[str, int, int], runs: Runs) -> None:
        super().put(("", *key[1:]), runs)

    def clear(self) -> None:
        pass


class KeepsAnswersAcrossEpochs(ChangeTracker):
    """Keeps a snapshot's dirty map by its sequence numbers alone, past the epoch they belong
    to: after a revert, the next snapshot takes the same number and is answered with the map of
    the one reverted away."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._answers = _EpochBlindAnswers()


class SkipsWriteIntent(ChangeTracker):
    """Marks a write in memory only, with no durable write-intent bit before its data: a crash
    before the next checkpoint forgets writes whose data reached the disk (flushed, or taken
    by the disk unasked)."""

    def mark(self, offset: int, length: int) -> None:
        self._mark_open(offset, length)


class ClearsIntentAtRecovery(ChangeTracker):
    """A recovery that takes the write-intent bits into memory and clears them at once, before
    they are durable anywhere else: a second crash during the recovery loses those writes.
    Only a crash of the recovery itself shows it."""

    @classmethod
    def load(cls, fileio: FileIO, directory: str, granularity: int, size_bytes: int,
             meta: dict[str, Any], *, crashed: bool,
             restart_reason: str | None) -> ChangeTracker:
        tracker = super().load(fileio, directory, granularity, size_bytes, meta,
                               crashed=crashed, restart_reason=restart_reason)
        if crashed and not tracker.new_epoch_pending:
            tracker._intent.clear()
        return tracker


TRACKERS: dict[str, type[ChangeTracker]] = {
    "good": ChangeTracker,
    "drops-marks-during-consolidation": DropsMarksDuringConsolidation,
    "forgets-grown-area": ForgetsGrownArea,
}


def reported_granules(disk: Disk, change_id: str, granularity: int,
                      snapshot: str | None = None) -> set[int]:
    """Granule indexes of every page of the answer to a changed-areas query."""
    size = disk.open_snapshot(snapshot).size_bytes if snapshot else disk.size_bytes
    out: set[int] = set()
    start = 0
    while start < size:
        info = disk.query_changed_areas(change_id, start, snapshot)
        for e in info.changed_areas:
            out.update(range(e.offset // granularity, (e.end - 1) // granularity + 1))
        start = info.end
    return out
