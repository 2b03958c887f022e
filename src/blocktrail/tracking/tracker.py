"""The change tracker: per-interval granule bitmaps, epochs, write intent, crash recovery.

The tracker knows nothing of layers. The disk calls `mark` for every guest write, zero and trim
before the data reaches any layer, `advance` at every snapshot, and commits `meta()` into its
metadata file.

Thread-safety: `mark` and `query` may run on many threads at once (guest I/O runs in parallel);
everything else (snapshots, checkpoints, resets, reverts, loading) is called by the disk with its
lock held exclusively, so no mark runs at the same time.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from pyroaring import BitMap

from blocktrail.errors import (
    CorruptMetadata,
    InvalidArgument,
    InvalidChangeId,
    OutOfRange,
    StaleChangeId,
    UnsupportedFormat,
)
from blocktrail.fileio import FileIO
from blocktrail.tracking import interval_file
from blocktrail.tracking.answers import MAX_JOINED_GRANULES, KeptAnswers, Runs, runs_of, runs_within
from blocktrail.tracking.changeid import ChangeId, new_epoch
from blocktrail.tracking.info import DiskChangeInfo
from blocktrail.tracking.intent import IntentLog, region_bytes_for

TRACKER_FORMAT = 1
MAX_EXTENTS_PER_ANSWER = 65536
# A query's window is sliced out of an interval's bitmap when it holds at most this fraction of
# the interval's granules (a slice costs about five times what converting the same granules of
# the whole bitmap does).
WINDOW_SLICE_FRACTION = 8
INTENT_FILE = "intent.bin"
OPEN_FILE = "open.roar"
# what `advance` names an interval file: interval-<first 8 hex digits of the epoch>-<seq>.roar
INTERVAL_NAME = re.compile(r"interval-[0-9a-f]{8}-[0-9]+\.roar")
CHECKPOINT_EVERY_S = 30.0


@dataclass(frozen=True, slots=True)
class EpochRecord:
    epoch: str
    created_at: str
    reason: str
    tracker_format: int
    # (parent epoch, last sequence still valid): after a revert, or a restore from a point
    inherits: tuple[str, int] | None
    # the first sequence of the parent epoch still valid: 0 after a revert (every earlier point
    # is the disk's own history); the point's own sequence for a disk restored from a restore
    # point (what came before it happened to another disk)
    inherits_floor: int = 0

    def to_json(self) -> dict[str, Any]:
        inherits = None if self.inherits is None else list(self.inherits)
        return {"epoch": self.epoch, "created_at": self.created_at, "reason": self.reason,
                "tracker_format": self.tracker_format, "inherits": inherits,
                "inherits_floor": self.inherits_floor}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> EpochRecord:
        """The record; TypeError or ValueError if ``obj`` is not one."""
        if not isinstance(obj, dict):
            raise TypeError(f"an epoch must be an object, not {obj!r}")
        inh = obj.get("inherits")
        if inh is not None and (not isinstance(inh, list) or len(inh) != 2):
            raise TypeError(f"an epoch's inherits must be [epoch, seq], not {inh!r}")
        return cls(str(obj["epoch"]), str(obj["created_at"]), str(obj["reason"]),
                   int(obj["tracker_format"]), None if inh is None else (str(inh[0]), int(inh[1])),
                   int(obj.get("inherits_floor", 0)))


def _now() -> str:
    return datetime.now(UTC).isoformat()


class ChangeTracker:
    """Tracks which granules changed between points of a disk's history."""

    consolidation_active: bool

    def __init__(self, fileio: FileIO, directory: str, granularity: int, size_bytes: int,
                 epochs: list[EpochRecord], seq: int, intervals: dict[int, tuple[str, BitMap]],
                 open_marks: BitMap, intent: IntentLog) -> None:
        self._fileio = fileio
        self._dir = directory
        self.granularity = granularity
        self.size_bytes = size_bytes
        self._epochs = epochs
        self.seq = seq
        self._intervals = intervals
        self._open = open_marks
        self._intent = intent
        self._last_checkpoint = time.monotonic()
        self._marks_lock = threading.Lock()  # the open interval's bitmap (not thread-safe)
        self.consolidation_active = False
        self.marks_during_consolidation = 0
        self._checkpoint_after_commit = False
        self._answers = KeptAnswers()  # closed questions answered (answers.py)
        # `_inherited_chain` of `_epochs`, made again only when an epoch is added (a query
        # resolves its change ID, and QEMU asks a dirty map one extent a request). Queries on
        # two threads may both make it: the same value; epochs are added with the disk's lock
        # held exclusively, so never while a query runs.
        self._chain: tuple[list[EpochRecord], str | None] | None = None

    # ---------------------------------------------------------------- construction

    @classmethod
    def start(cls, fileio: FileIO, directory: str, granularity: int, size_bytes: int,
              reason: str, *, intent_region_bytes: int | None = None,
              continues: ChangeId | None = None) -> ChangeTracker:
        """Start tracking a new disk: a fresh epoch at sequence 0. ``intent_region_bytes``: the
        write-intent bitmap's region (default: `region_bytes_for` the disk). ``continues``: the
        disk starts with the content another disk had at that change ID (it was restored from
        a restore point taken there): that one change ID stays valid, so the next backup is an
        incremental against that point; every other ID of that epoch is refused.

        Writes the (empty) checkpoint of the open interval before the caller first commits
        `meta()`: from then on `open.roar` always exists, so one missing after a crash is damage
        (its marks may be gone from the intent log), not "no checkpoint yet"."""
        region = intent_region_bytes or region_bytes_for(size_bytes, granularity)
        if region < granularity or region & (region - 1):
            raise InvalidArgument(f"the write-intent region must be a power of two of at least "
                                  f"the granularity ({granularity}), not {region}")
        intent = IntentLog.create(fileio, os.path.join(directory, INTENT_FILE), region)
        if continues is None:
            epochs = [EpochRecord(new_epoch(), _now(), reason, TRACKER_FORMAT, None)]
            seq = 0
        else:
            epochs = [EpochRecord(continues.epoch, _now(), "the epoch of the disk restored from",
                                  TRACKER_FORMAT, None),
                      EpochRecord(new_epoch(), _now(), reason, TRACKER_FORMAT,
                                  (continues.epoch, continues.seq), continues.seq)]
            seq = continues.seq
        tracker = cls(fileio, directory, granularity, size_bytes, epochs, seq, {}, BitMap(),
                      intent)
        tracker.checkpoint()
        return tracker

    @classmethod
    def load(cls, fileio: FileIO, directory: str, granularity: int, size_bytes: int,
             meta: dict[str, Any], *, crashed: bool,
             restart_reason: str | None) -> ChangeTracker:
        """Load the tracker from ``meta``; after a crash, recover from the intent log.

        Starts a new epoch when the history cannot be trusted (``restart_reason`` from the disk,
        an older tracker format, a damaged file, a crash the intent log cannot prove safe)."""
        stored = _StoredTracker.parse(meta, directory, granularity)
        if stored.format < TRACKER_FORMAT and restart_reason is None:
            restart_reason = (f"tracker format upgraded from v{stored.format} "
                              f"to v{TRACKER_FORMAT}")
        epochs, seq, region = stored.epochs, stored.seq, stored.region
        history: _History | str | None = restart_reason or _inheritance_loop(epochs)
        if history is None:
            history = _load_history(fileio, directory, stored.intervals, epochs[-1].epoch, seq,
                                    region, crashed=crashed, granularity=granularity)
        if isinstance(history, str):
            # The old epoch's files stay as they are until the caller has committed the new
            # epoch (then `after_commit` clears the intent bits).
            intent_path = os.path.join(directory, INTENT_FILE)
            try:
                intent = IntentLog.load(fileio, intent_path, region)
            except (OSError, CorruptMetadata, UnsupportedFormat):
                intent = IntentLog.create(fileio, intent_path, region)
            tracker = cls(fileio, directory, granularity, size_bytes, epochs, seq, {}, BitMap(),
                          intent)
            tracker.restart(history)
            # open.roar may be missing or damaged: the new epoch's empty checkpoint replaces it
            # once committed, so a crash before the next checkpoint does not restart again
            tracker._checkpoint_after_commit = True
            return tracker
        return cls(fileio, directory, granularity, size_bytes, epochs, seq, history.intervals,
                   history.open_marks, history.intent)

    # ---------------------------------------------------------------- recording

    @property
    def epoch(self) -> str:
        return self._epochs[-1].epoch

    @property
    def new_epoch_pending(self) -> bool:
        """`load` started a new epoch: the caller commits `meta()`, then calls `after_commit`."""
        return self._checkpoint_after_commit

    @property
    def current_change_id(self) -> ChangeId:
        return ChangeId(self.epoch, self.seq)

    @property
    def epochs(self) -> tuple[EpochRecord, ...]:
        return tuple(self._epochs)

    @property
    def intent_fsyncs(self) -> int:
        return self._intent.fsync_count

    def mark(self, offset: int, length: int) -> None:
        """Record a write to ``[offset, offset + length)``; durable intent before returning."""
        if length <= 0:
            return
        self._mark_open(offset, length)
        self._intent.ensure(offset, length, self.size_bytes)

    def _mark_open(self, offset: int, length: int) -> None:
        g = self.granularity
        with self._marks_lock:
            if self.consolidation_active:
                self.marks_during_consolidation += 1
            self._open.add_range(offset // g, (offset + length - 1) // g + 1)

    def try_mark(self, offset: int, length: int) -> bool:
        """`mark` when it returns without waiting for a sync (the range's write-intent regions
        are durable already) and no checkpoint is due: True. False: nothing was recorded.
        (One call for the check and the mark: it runs for nearly every guest write.)"""
        if length <= 0:
            return True
        if self.checkpoint_due or not self._intent.covers(offset, length):
            return False
        self._mark_open(offset, length)
        return True

    @property
    def checkpoint_due(self) -> bool:
        """Writes went on for a while since the last checkpoint: the disk should call
        `checkpoint` (with its lock held exclusively) to keep what a crash costs small."""
        return time.monotonic() - self._last_checkpoint > CHECKPOINT_EVERY_S

    def note_resize(self, old_size: int, new_size: int) -> None:
        """A grown range counts as changed; a shrunk one is clipped away by queries.

        The grown range is made durable by a checkpoint of the open interval (one file, however
        large the range), not through the write-intent log: a bit per region there would cost
        seconds for a disk grown by hundreds of GiB. The disk holds its lock exclusively and
        commits the new size after this returns, so a crash before that commit leaves marks
        past the old end, which queries clip."""
        if new_size > old_size:
            self._mark_open(old_size, new_size - old_size)
            self.checkpoint()
        self.size_bytes = new_size

    def checkpoint(self) -> None:
        """Make the open interval durable, then clear the write-intent bits it covers."""
        data = interval_file.encode(self.epoch, self.seq, self._open)
        self._fileio.replace_atomic(os.path.join(self._dir, OPEN_FILE), data)
        self._intent.clear()
        self._last_checkpoint = time.monotonic()

    def advance(self) -> ChangeId:
        """Freeze the open interval as the next point (a snapshot). The caller commits meta()
        and then calls `after_commit`."""
        seq = self.seq + 1
        name = f"interval-{self.epoch[:8]}-{seq}.roar"
        self._open.run_optimize()
        data = interval_file.encode(self.epoch, seq, self._open)
        self._fileio.replace_atomic(os.path.join(self._dir, name), data)
        self._intervals[seq] = (name, self._open)
        self._open = BitMap()
        self.seq = seq
        return self.current_change_id

    def after_commit(self) -> None:
        """Every mark so far is durable in a committed interval: the intent bits can go. (After
        a restart at load: the new epoch's checkpoint is written first.)"""
        if self._checkpoint_after_commit:
            self.checkpoint()
            self._checkpoint_after_commit = False
        else:
            self._intent.clear()

    def restart(self, reason: str) -> ChangeId:
        """A new epoch: every earlier change ID is refused from now on. In memory only: the
        caller commits `meta()`, and only then calls `after_commit` (which drops the old
        epoch's write-intent bits), so a crash in between never reopens the old epoch with
        its intent gone."""
        self._epochs.append(EpochRecord(new_epoch(), _now(), reason, TRACKER_FORMAT, None))
        self._chain = None
        self._answers.clear()
        self._intervals.clear()
        self._open = BitMap()
        self.seq = 0
        return self.current_change_id

    def revert_to(self, change_id: str, reason: str) -> ChangeId:
        """The disk's content became that of the point ``change_id``: IDs after it are stale,
        IDs at or before it stay valid (the new epoch inherits them)."""
        try:
            seq = self.resolve(change_id)
        except StaleChangeId:
            return self.restart(reason + " (the snapshot predates the current epoch)")
        self._answers.clear()
        for later in [s for s in self._intervals if s > seq]:
            del self._intervals[later]
        self._epochs.append(
            EpochRecord(new_epoch(), _now(), reason, TRACKER_FORMAT, (self.epoch, seq)))
        self._chain = None
        self._open = BitMap()
        self.seq = seq
        return self.current_change_id

    # ---------------------------------------------------------------- answering

    def resolve(self, change_id: str) -> int:
        """The sequence, in the current epoch's numbering, of a valid change ID."""
        cid = ChangeId.parse(change_id)
        if self._chain is None:
            self._chain = _inherited_chain(self._epochs)
        chain, loop = self._chain
        if loop is not None:  # a load restarts such a history: only a damaged state gets here
            raise CorruptMetadata(
                f"{self._dir}: the tracker's epochs in disk.json inherit in a loop (through "
                f"{loop}); reset tracking on the disk and take a full backup")
        limit, floor, child = self.seq, 0, None
        for record in chain:
            if record.epoch == cid.epoch:
                if child is not None and cid.seq < floor:
                    raise StaleChangeId(
                        f"change ID {cid} comes before the point this disk was restored from "
                        f"({record.epoch}/{floor}): that history is another disk's; take a "
                        "full backup")
                if cid.seq <= limit:
                    return cid.seq
                if child is None:
                    raise InvalidChangeId(f"change ID {cid} lies in the future: the disk is at "
                                          f"{self.current_change_id}")
                raise StaleChangeId(
                    f"change ID {cid} was reverted past: on {child.created_at} the disk returned "
                    f"to point {limit} ({child.reason}); take a full backup")
            if record.inherits is not None:
                child, limit = record, min(limit, record.inherits[1])
                floor = record.inherits_floor
        for index, earlier in enumerate(self._epochs[:-1]):
            if earlier.epoch == cid.epoch:
                ended = self._epochs[index + 1]
                raise StaleChangeId(
                    f"change ID {cid} belongs to an earlier tracking epoch, ended "
                    f"{ended.created_at}: {ended.reason}; take a full backup")
        raise InvalidChangeId(f"change ID {cid} does not belong to this disk")

    def query(self, change_id: str, *, until_seq: int | None, size_bytes: int,
              start_offset: int, join_up_to: int = MAX_JOINED_GRANULES,
              max_extents: int | None = None) -> DiskChangeInfo:
        """The granules marked after ``change_id`` up to ``until_seq`` (None: up to now),
        inside [start_offset, size_bytes): at most ``max_extents`` areas (default
        `MAX_EXTENTS_PER_ANSWER`), the answer ending where the last of them does when there
        are more. A closed question (``until_seq``
        given) whose intervals hold at most ``join_up_to`` granules is answered whole once and
        kept (answers.py); any other, for the window asked."""
        _check_window(start_offset, size_bytes)
        return self._answer(self._joined(change_id, until_seq), until_seq, size_bytes,
                            start_offset, join_up_to, max_extents)

    def try_query(self, change_id: str, *, until_seq: int | None, size_bytes: int,
                  start_offset: int, max_granules: int,
                  max_extents: int | None = None) -> DiskChangeInfo | None:
        """`query`, when it joins at most ``max_granules`` marked granules (the sum of the
        intervals' counts inside its window, not their union: what answering costs grows with
        it; none for a closed question answered before, kept); else None."""
        _check_window(start_offset, size_bytes)
        joined = self._joined(change_id, until_seq)
        if until_seq is not None and (runs := self._answers.get(self._key(joined))) is not None:
            return self._from_runs(runs, size_bytes, start_offset, max_extents)
        lo, hi = self._granules(start_offset, size_bytes)
        bound = sum(self._intervals[s][1].range_cardinality(lo, hi) for s in joined)
        if until_seq is None:
            with self._marks_lock:
                bound += self._open.range_cardinality(lo, hi)
        if bound > max_granules:
            return None
        return self._answer(joined, until_seq, size_bytes, start_offset, max_granules,
                            max_extents)

    def first_kept_area(self, change_id: str, *, until_seq: int, size_bytes: int,
                        start_offset: int) -> tuple[int, int] | None:
        """The first area of the closed question's answer that ends past ``start_offset``,
        clipped to [start_offset, size_bytes): (offset, end); (size_bytes, size_bytes) when
        none does. Only from an answer kept whole (answers.py): None when it is not kept (then
        `query` or `try_query` answers). What `query` answers with ``max_extents=1``, without
        its arrays: QEMU asks a snapshot's dirty map one extent a request."""
        _check_window(start_offset, size_bytes)
        runs = self._answers.get(self._key(self._joined(change_id, until_seq)))
        if runs is None:
            return None
        firsts, ends = runs
        g = self.granularity
        i = int(ends.searchsorted(start_offset // g, side="right"))  # the first run ending past
        if i == len(ends) or int(firsts[i]) * g >= size_bytes:
            return size_bytes, size_bytes
        return max(int(firsts[i]) * g, start_offset), min(int(ends[i]) * g, size_bytes)

    def _answer(self, joined: range, until_seq: int | None, size_bytes: int, start_offset: int,
                join_up_to: int, max_extents: int | None) -> DiskChangeInfo:
        """`query`'s answer, the closed intervals it joins found (``joined``)."""
        if until_seq is not None and (runs := self._closed_runs(joined, join_up_to)) is not None:
            return self._from_runs(runs, size_bytes, start_offset, max_extents)
        max_extents = MAX_EXTENTS_PER_ANSWER if max_extents is None else max_extents
        lo, hi = self._granules(start_offset, size_bytes)
        sets = [_window(self._intervals[s][1], lo, hi) for s in joined]
        if until_seq is None:
            with self._marks_lock:  # writers go on marking it: a copy
                sets.append(_window(self._open, lo, hi, copy=True))
        union = BitMap.union(*sets) if len(sets) > 1 else (sets[0] if sets else BitMap())
        return _runs_to_change_info(runs_of(union, lo, hi), self.granularity, start_offset,
                                    size_bytes, max_extents)

    def _from_runs(self, runs: Runs, size_bytes: int, start_offset: int,
                   max_extents: int | None) -> DiskChangeInfo:
        """The answer for [start_offset, size_bytes) out of a closed question's whole runs."""
        max_extents = MAX_EXTENTS_PER_ANSWER if max_extents is None else max_extents
        lo, hi = self._granules(start_offset, size_bytes)
        return _runs_to_change_info(runs_within(runs, lo, hi, max_extents + 1),
                                    self.granularity, start_offset, size_bytes, max_extents)

    def _closed_runs(self, joined: range, join_up_to: int) -> Runs | None:
        """The runs of the closed intervals ``joined``, kept or joined now when they hold at
        most ``join_up_to`` granules; else None."""
        key = self._key(joined)
        runs = self._answers.get(key)
        if runs is None:
            sets = [self._intervals[s][1] for s in joined]
            if sum(len(b) for b in sets) > join_up_to:
                return None
            union = BitMap.union(*sets) if len(sets) > 1 else (sets[0] if sets else BitMap())
            runs = runs_of(union)
            self._answers.put(key, runs)
        return runs

    def _key(self, joined: range) -> tuple[str, int, int]:
        """What a closed question's answer is kept under (answers.py)."""
        return self.epoch, joined.start, joined.stop

    def _joined(self, change_id: str, until_seq: int | None) -> range:
        """The sequences of the closed intervals a question joins: after ``change_id``, up to
        ``until_seq`` (None: up to now; the open interval is joined too)."""
        since = self.resolve(change_id)
        end_seq = self.seq if until_seq is None else until_seq
        if since > end_seq:
            raise InvalidChangeId(
                f"change ID {change_id} is newer than the snapshot the query ends at")
        return range(since + 1, end_seq + 1)

    def _granules(self, start_offset: int, size_bytes: int) -> tuple[int, int]:
        """The granules [lo, hi) that bytes [start_offset, size_bytes) touch."""
        return start_offset // self.granularity, -(-size_bytes // self.granularity)

    def meta(self) -> dict[str, Any]:
        return {
            "format": TRACKER_FORMAT,
            "epoch": self.epoch,
            "seq": self.seq,
            "intent_region_bytes": self._intent.region_bytes,
            "intervals": [[s, self._intervals[s][0]] for s in sorted(self._intervals)],
            "epochs": [e.to_json() for e in self._epochs],
        }

    def files(self) -> set[str]:
        """The file names in the disk directory that this tracker references."""
        return {INTENT_FILE, OPEN_FILE} | {name for name, _ in self._intervals.values()}

    def memory_bytes(self) -> int:
        sets = [b for _, b in self._intervals.values()] + [self._open]
        return sum(len(b.serialize()) for b in sets)

    def close(self) -> None:
        self._intent.close()


@dataclass(slots=True)
class _History:
    intervals: dict[int, tuple[str, BitMap]]
    open_marks: BitMap
    intent: IntentLog


@dataclass(frozen=True, slots=True)
class _StoredTracker:
    """The tracker's part of disk.json, checked."""

    format: int
    epochs: list[EpochRecord]
    seq: int
    region: int
    intervals: list[tuple[int, str]]  # (seq, file name)

    @classmethod
    def parse(cls, meta: dict[str, Any], directory: str, granularity: int) -> _StoredTracker:
        """-> the checked fields; `UnsupportedFormat` for a newer format (looked at first),
        `CorruptMetadata` for anything missing, mistyped or out of range."""
        def damaged(why: str) -> CorruptMetadata:
            return CorruptMetadata(f"{directory}: the tracker state in disk.json is damaged "
                                   f"({why}); nothing was changed: restore disk.json from a copy")
        try:
            stored_format = int(meta["format"])
        except (KeyError, TypeError, ValueError) as exc:
            raise damaged(f"format: {exc!r}") from exc
        if stored_format > TRACKER_FORMAT:
            raise UnsupportedFormat(
                f"tracker format {stored_format} was written by a newer blocktrail "
                f"(this one reads up to {TRACKER_FORMAT})")
        try:
            epochs = [EpochRecord.from_json(e) for e in meta["epochs"]]
            seq, region = int(meta["seq"]), int(meta["intent_region_bytes"])
            intervals = [(int(s), str(name)) for s, name in meta["intervals"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise damaged(repr(exc)) from exc
        if not epochs:
            raise damaged("no epoch")
        if seq < 0:
            raise damaged(f"sequence {seq}")
        if region < granularity or region & (region - 1):
            raise damaged(f"write-intent region {region} is not a power of two of at least "
                          f"the granularity {granularity}")
        for interval_seq, name in intervals:
            if not 0 < interval_seq <= seq or not INTERVAL_NAME.fullmatch(name):
                raise damaged(f"interval {interval_seq} {name!r}")
        return cls(stored_format, epochs, seq, region, intervals)


def _inherited_chain(epochs: list[EpochRecord]) -> tuple[list[EpochRecord], str | None]:
    """The current epoch and the epochs it inherits from, newest first (an epoch not in the list
    ends the chain); and the epoch through which the chain runs back into itself, or None. No
    operation makes such a loop: only a damaged disk.json has it (a walk would never end)."""
    by_epoch = {e.epoch: e for e in epochs}
    chain: list[EpochRecord] = []
    seen: set[str] = set()
    record: EpochRecord | None = epochs[-1]
    while record is not None:
        if record.epoch in seen:
            return chain, record.epoch
        seen.add(record.epoch)
        chain.append(record)
        record = None if record.inherits is None else by_epoch.get(record.inherits[0])
    return chain, None


def _inheritance_loop(epochs: list[EpochRecord]) -> str | None:
    """A reason to restart if the current epoch's chain of inherited epochs runs in a loop."""
    _, loop = _inherited_chain(epochs)
    if loop is None:
        return None
    return f"tracker history damaged (its epochs inherit in a loop, through {loop})"


def _load_history(fileio: FileIO, directory: str, listed: list[tuple[int, str]], epoch: str,
                  seq: int, region: int, *, crashed: bool, granularity: int) -> _History | str:
    """Load intervals, checkpoint and intent log; -> the history, or a reason to restart."""
    intervals: dict[int, tuple[str, BitMap]] = {}
    try:
        for listed_seq, name in listed:
            data = fileio.read_file(os.path.join(directory, name))
            _, stored_seq, granules = interval_file.decode(data, name)
            if stored_seq != listed_seq:
                raise CorruptMetadata(f"{name}: holds interval {stored_seq}, not {listed_seq}")
            intervals[listed_seq] = (name, granules)
    except (OSError, CorruptMetadata) as exc:
        return f"tracker history damaged ({exc})"
    open_marks = BitMap()
    open_path = os.path.join(directory, OPEN_FILE)
    try:
        if fileio.exists(open_path):
            stored_epoch, stored_seq, granules = interval_file.decode(
                fileio.read_file(open_path), OPEN_FILE)
            if (stored_epoch, stored_seq) == (epoch, seq):
                open_marks = granules
            elif not crashed:
                return "tracker checkpoint does not match the disk"
        elif crashed:  # written since the epoch started: a checkpoint's marks may be lost
            return "unclean shutdown and the tracker checkpoint is missing"
        else:
            return "tracker checkpoint missing at a clean open"
    except (OSError, CorruptMetadata) as exc:
        return f"the tracker checkpoint is unreadable ({exc})"
    intent_path = os.path.join(directory, INTENT_FILE)
    try:
        intent = IntentLog.load(fileio, intent_path, region)
    except (OSError, CorruptMetadata) as exc:
        if crashed:
            return f"unclean shutdown and the write-intent log is unreadable ({exc})"
        intent = IntentLog.create(fileio, intent_path, region)
    if crashed:  # every granule of a region that may hold unrecorded writes counts as changed
        per_region = region // granularity
        for r in intent.set_regions:
            open_marks.add_range(r * per_region, (r + 1) * per_region)
    return _History(intervals, open_marks, intent)


def _check_window(start_offset: int, size_bytes: int) -> None:
    if not 0 <= start_offset < size_bytes:
        raise OutOfRange(f"start offset {start_offset} is outside the disk (size {size_bytes})")


def _window(granules: BitMap, lo: int, hi: int, *, copy: bool = False) -> BitMap:
    """The granules in [lo, hi): a slice when they are a small part of ``granules`` (a small
    window of a large, much-changed disk costs its own size, not the disk's: QEMU asks for one
    extent at a time), else the bitmap itself (``copy``: a copy of it), clipped later."""
    first = granules.rank(lo - 1) if lo > 0 else 0
    last = granules.rank(hi - 1) if hi > 0 else 0
    if (last - first) * WINDOW_SLICE_FRACTION < len(granules):
        return granules[first:last]
    return BitMap(granules) if copy else granules


def _runs_to_change_info(runs: Runs, granularity: int, start_offset: int, size_bytes: int,
                         max_extents: int) -> DiskChangeInfo:
    """The answer for [start_offset, size_bytes) from the runs of granules inside it."""
    starts, ends = runs
    if not len(starts):
        return DiskChangeInfo(start_offset, size_bytes - start_offset, ())
    end_offset = size_bytes
    if len(starts) > max_extents:
        starts, ends = starts[:max_extents], ends[:max_extents]
        end_offset = min(int(ends[-1]) * granularity, size_bytes)
    lo_b = np.maximum(starts * granularity, start_offset)
    hi_b = np.minimum(ends * granularity, end_offset)
    return DiskChangeInfo.from_arrays(start_offset, end_offset - start_offset, lo_b, hi_b - lo_b)
