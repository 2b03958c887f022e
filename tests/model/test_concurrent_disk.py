"""Several guest threads write, zero, trim, flush and read one disk at once (overlapping ranges;
half the writes first through the NBD server's path that does a write at once or not at all,
`Disk.try_pwrite` and `Disk.try_zero`) while another thread takes snapshots, removes them
(consolidation), and grows and shrinks the disk. Checked against a linearizability model per
512-byte sector:

- every read (during the run, of the live disk or of a snapshot, and at the end) returns, in
  each sector, what some serial order of the writes consistent with their real-time order would
  give: a write that returned before another began is older than it (a read that runs beside a
  write of the same sector may see a mix of the versions it may see, word by word, as a read of
  any file may: `torn_words`);
- every changed-areas query from one point to a later snapshot covers every write that began
  after the first point was taken and returned before the snapshot began (and every grown range).

Every write's sectors carry its own tag, so the checker knows which write a sector came from.
"""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from blocktrail.disk import Disk
from blocktrail.errors import OutOfRange, SnapshotNotFound

SECTOR = 512
GRANULARITY = 4096
CLUSTER = 16384
SIZE = 1 << 20
OPS = int(os.environ.get("BLOCKTRAIL_CONCURRENT_OPS", "250"))
WRITERS = 4


@dataclass
class Op:
    """A write (data: tag per sector; None: zeros), or a shrink (zeros past ``offset``)."""

    id: int
    offset: int
    length: int
    zeros: bool
    start: float
    end: float = float("inf")
    ok: bool = False
    shrink: bool = False  # not a write: the tracker clips it (a later grow is reported)


@dataclass
class Point:
    name: str | None  # None: the disk's first change ID
    change_id: str
    start: float
    end: float
    size: int


@dataclass
class Log:
    lock: threading.Lock = field(default_factory=threading.Lock)
    ops: list[Op] = field(default_factory=list)
    reads: list[tuple[float, float, int, bytes, str | None]] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)
    grows: list[tuple[float, float, int, int]] = field(default_factory=list)  # start end from to
    next_id: int = 1

    def new_op(self, offset: int, length: int, zeros: bool) -> Op:
        with self.lock:
            op = Op(self.next_id, offset, length, zeros, time.monotonic())
            self.next_id += 1
            self.ops.append(op)
            return op


def tag(op_id: int, length: int) -> bytes:
    return op_id.to_bytes(8, "little") * (length // 8)


def sector_tag(data: bytes) -> int:
    """0 for zeros, else the id of the write whose sector this is (-1: a mix: torn)."""
    if not any(data):
        return 0
    first = int.from_bytes(data[:8], "little")
    return first if data == tag(first, len(data)) else -1


def allowed(ops_here: list[Op], a: float, b: float) -> set[int]:
    """Tags a sector may hold when read in [a, b]: writes that began before b and were not
    overwritten by a write that began after they returned and itself returned before a."""
    out = {0} if not any(o.end < a for o in ops_here) else set()
    for op in ops_here:
        if op.start >= b:
            continue
        if any(o.start > op.end and o.end < a for o in ops_here):
            continue
        out.add(0 if op.zeros else op.id)
    return out


def guest(disk: Disk, log: Log, seed: int, stop: threading.Event) -> None:
    rng = random.Random(seed)
    for _ in range(OPS):
        size = disk.size_bytes
        sectors = rng.choice((1, 2, 8, 31, 32, 33, 64, 128))
        offset = rng.randrange(0, max(1, size // SECTOR - sectors)) * SECTOR
        length = sectors * SECTOR
        kind = rng.random()
        if kind < 0.12:
            start = time.monotonic()
            try:
                data = disk.pread(length, offset)
            except OutOfRange:
                continue
            with log.lock:
                log.reads.append((start, time.monotonic(), offset, data, None))
            continue
        if kind < 0.17:
            disk.flush()
            continue
        zeros = kind < 0.27
        op = log.new_op(offset, length, zeros)
        try:
            # half of them first as the NBD server's event loop asks: at once or not at all
            # (`try_zero` stands for a zero and a trim alike), then, if not, waiting
            at_once = rng.random() < 0.5
            if zeros:
                if not (at_once and disk.try_zero(length, offset)):
                    (disk.zero if kind < 0.22 else disk.trim)(length, offset)
            else:
                data = tag(op.id, length)
                if not (at_once and disk.try_pwrite(data, offset)):
                    disk.pwrite(data, offset)
            if rng.random() < 0.2:  # FUA
                disk.flush()
            op.ok = True
        except OutOfRange:  # the disk shrank meanwhile: nothing was written
            pass
        op.end = time.monotonic()
    stop.set()


def structure(disk: Disk, log: Log, seed: int, stops: list[threading.Event]) -> None:
    rng = random.Random(seed)
    n = 0
    while not all(s.is_set() for s in stops):
        choice = rng.random()
        names = [s.name for s in disk.snapshots]
        if choice < 0.45 or not names:
            n += 1
            start = time.monotonic()
            snap = disk.create_snapshot(f"s{n}")
            log.points.append(Point(snap.name, snap.change_id, start, time.monotonic(),
                                    snap.size_bytes))
        elif choice < 0.7:
            name = rng.choice(names[:-1] or names)
            try:
                removal = disk.begin_remove_snapshot(name)
            except SnapshotNotFound:
                continue
            while not removal.step(max_clusters=4):
                time.sleep(0.001)
        else:
            old = disk.size_bytes
            new = rng.choice((SIZE - 64 * 1024 - 512, SIZE, SIZE + 40960 + 512))
            if new < old:
                op = log.new_op(new, old - new, True)  # a shrink zeroes what it cuts
                op.shrink = True
                disk.resize(new)
                op.ok, op.end = True, time.monotonic()
            elif new > old:
                start = time.monotonic()
                disk.resize(new)
                log.grows.append((start, time.monotonic(), old, new))
        time.sleep(rng.random() * 0.01)


def by_sector(ops: list[Op], size: int) -> list[list[Op]]:
    out: list[list[Op]] = [[] for _ in range(-(-size // SECTOR))]
    for op in ops:
        if op.ok:
            for s in range(op.offset // SECTOR, min(len(out), (op.offset + op.length) // SECTOR)):
                out[s].append(op)
    return out


def check_image(data: bytes, offset: int, ops_by_sector: list[list[Op]], a: float, b: float,
                what: str) -> None:
    for i in range(0, len(data), SECTOR):
        s = (offset + i) // SECTOR
        sector = data[i : i + SECTOR]
        got = sector_tag(sector)
        ops_here = ops_by_sector[s] if s < len(ops_by_sector) else []
        may = allowed(ops_here, a, b)
        if got == -1:  # a mix: only of writes the read ran beside (see `torn_words`)
            words = torn_words(sector)
            assert any(o.start < b and o.end > a for o in ops_here) and words <= may, \
                f"{what}: sector {s} is torn: words of {sorted(words)}, allowed {sorted(may)}"
            continue
        assert got in may, f"{what}: sector {s} holds write {got}, not one of {sorted(may)}"


def torn_words(sector: bytes) -> set[int]:
    """The writes whose 8-byte words make up a sector. A read that runs beside a write of
    the same bytes may see a mix of their old and new contents, as from any file: Linux copies
    page-cache pages without excluding readers (a plain file shows it too); what it may never
    see is a word of a write it could not see whole."""
    return {int.from_bytes(sector[j : j + 8], "little") for j in range(0, len(sector), 8)}


def check_tracking(disk: Disk, log: Log) -> int:
    """-> how many (point, snapshot) pairs were checked."""
    live = {s.name: s for s in disk.snapshots}
    later = [p for p in log.points if p.name in live]
    checked = 0
    for first in log.points:
        for snap in later:
            if snap.start <= first.end:
                continue
            reported: set[int] = set()
            start = 0
            while start < snap.size:
                info = disk.query_changed_areas(first.change_id, start, snap.name)
                for e in info.changed_areas:
                    reported.update(range(e.offset // GRANULARITY, (e.end - 1) // GRANULARITY + 1))
                start = info.end
            must: set[int] = set()
            for op in log.ops:
                if op.ok and not op.shrink and op.start > first.end and op.end < snap.start:
                    end = min(op.offset + op.length, snap.size)
                    if end > op.offset:
                        must.update(range(op.offset // GRANULARITY,
                                          (end - 1) // GRANULARITY + 1))
            for start_t, end_t, old, new in log.grows:
                if start_t > first.end and end_t < snap.start:
                    end = min(new, snap.size)
                    if end > old:
                        must.update(range(old // GRANULARITY, (end - 1) // GRANULARITY + 1))
            missed = {g for g in must if g * GRANULARITY < snap.size} - reported
            assert not missed, f"granules {sorted(missed)[:10]} changed between " \
                               f"{first.change_id} and {snap.name} but are not reported"
            checked += 1
    return checked


@pytest.mark.parametrize("seed", range(3))
def test_concurrent_writers_during_structure_changes(tmp_path: Path, seed: int) -> None:
    disk = Disk.create(tmp_path / "d", SIZE, GRANULARITY, cluster_size=CLUSTER)
    log = Log()
    log.points.append(Point(None, disk.current_change_id, 0.0, time.monotonic(), SIZE))
    stops = [threading.Event() for _ in range(WRITERS)]
    errors: list[BaseException] = []

    def run(fn: object, *args: object) -> threading.Thread:
        def body() -> None:
            try:
                fn(*args)  # type: ignore[operator]
            except BaseException as exc:  # surfaced below
                errors.append(exc)
                for s in stops:
                    s.set()
        thread = threading.Thread(target=body)
        thread.start()
        return thread

    threads = [run(guest, disk, log, seed * 100 + i, stops[i]) for i in range(WRITERS)]
    threads.append(run(structure, disk, log, seed, stops))
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    start = time.monotonic()
    final_snap = disk.create_snapshot("final")
    log.points.append(Point("final", final_snap.change_id, start, time.monotonic(),
                            final_snap.size_bytes))
    ops = by_sector(log.ops, max(SIZE + 40960 + 512, disk.size_bytes))
    for start, end, offset, data, _ in log.reads:
        check_image(data, offset, ops, start, end, "a read during the run")
    final = disk.pread(disk.size_bytes, 0)
    check_image(final, 0, ops, float("inf"), float("inf"), "the disk afterwards")
    for point in log.points:
        if point.name is not None and point.name in {s.name for s in disk.snapshots}:
            content = disk.open_snapshot(point.name).pread(point.size, 0)
            check_image(content, 0, ops, point.start, point.end, f"snapshot {point.name}")
    assert check_tracking(disk, log) >= len(log.points) - 1
    disk.close()
    with Disk.open(tmp_path / "d") as again:
        assert again.pread(again.size_bytes, 0) == final
