"""Real crashes: a worker writing and consolidating is killed with SIGKILL at a random moment.

After each kill the disk is reopened (crash recovery) and checked against the worker's event
log: 0 lost flushed writes, every sector holds a write that may legally be there, every
snapshot still listed holds its content, and the tracker reports every granule touched since the
start and since every snapshot by a write that returned or whose data reached the disk — 0 missed
granules.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from blocktrail.disk import Disk

sys.path.insert(0, str(Path(__file__).parent))
from sigkill_worker import GRANULARITY, SECTOR, SIZE, tag

from faulty import reported_granules

WORKER = Path(__file__).with_name("sigkill_worker.py")
TRIALS = int(os.environ.get("BLOCKTRAIL_SIGKILL_TRIALS", "200"))


@dataclass
class Log:
    start: str = ""
    writes: list[tuple[int, int, int]] = field(default_factory=list)  # (id, offset, length)
    durable_upto: int = 0  # every write with id <= this was flushed
    snapshots: list[tuple[str, str, int]] = field(default_factory=list)  # (name, cid, #writes)
    acked: set[int] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)
    removing: set[str] = field(default_factory=set)

    @classmethod
    def parse(cls, text: str) -> Log:
        log = cls()
        lines = text.split("\n")
        for line in lines[:-1]:  # the last one may be cut by the kill
            kind, *args = line.split()
            if kind == "READY":
                log.start = args[0]
            elif kind == "W":
                log.writes.append((int(args[0]), int(args[1]), int(args[2])))
            elif kind == "A":
                log.acked.add(int(args[0]))
            elif kind == "F":
                log.durable_upto = max(log.durable_upto, int(args[0]))
            elif kind == "S":
                log.snapshots.append((args[0], args[1], len(log.writes)))
                if log.writes:
                    log.durable_upto = max(log.durable_upto, log.writes[-1][0])
            elif kind == "C":
                log.removing.add(args[0])
            elif kind == "D":
                log.removed.add(args[0])
        return log


def run_worker(directory: Path, seed: int, tracker: str, kill_after: float) -> Log:
    disk_dir = directory / "disk"
    proc = subprocess.Popen([sys.executable, str(WORKER), str(disk_dir), str(seed), tracker],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first.startswith(b"READY"), proc.stderr.read() if proc.stderr else first
    time.sleep(kill_after)
    proc.send_signal(signal.SIGKILL)
    rest = proc.stdout.read()  # the same buffered reader: nothing read ahead is lost
    assert proc.wait(timeout=60) == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    return Log.parse((first + rest).decode())


def _sector_tags(content: bytes) -> list[bytes]:
    return [content[i : i + 8] if content[i : i + SECTOR] == content[i : i + 8] * (SECTOR // 8)
            else b"?" for i in range(0, len(content), SECTOR)]


def _describe(sector_tag: bytes) -> str:
    return "torn data" if sector_tag == b"?" else f"write {int.from_bytes(sector_tag, 'little')}"


def _expected_after(writes: list[tuple[int, int, int]]) -> list[bytes]:
    """Sector tags after applying ``writes`` in order."""
    sectors = [bytes(8)] * (SIZE // SECTOR)
    for write_id, offset, length in writes:
        for s in range(offset // SECTOR, (offset + length) // SECTOR):
            sectors[s] = tag(write_id)
    return sectors


def _granules(writes: list[tuple[int, int, int]]) -> set[int]:
    return {g for _, offset, length in writes
            for g in range(offset // GRANULARITY, (offset + length - 1) // GRANULARITY + 1)}


def check(disk: Disk, log: Log) -> list[str]:
    """-> the problems found (empty: the crash lost nothing and the tracker missed nothing)."""
    problems: list[str] = []
    actual = _sector_tags(disk.pread(SIZE, 0))
    allowed: list[set[bytes]] = [{bytes(8)} for _ in actual]
    for write_id, offset, length in log.writes:
        for s in range(offset // SECTOR, (offset + length) // SECTOR):
            if write_id <= log.durable_upto:
                allowed[s] = {tag(write_id)}  # flushed: nothing older may show
            else:
                allowed[s].add(tag(write_id))  # in flight: present or absent
    lost = [s for s, t in enumerate(actual) if t not in allowed[s]]
    if lost:
        first = lost[0]
        history = [(w, w in log.acked, w <= log.durable_upto) for w, o, n in log.writes
                   if o // SECTOR <= first < (o + n) // SECTOR]
        problems.append(
            f"{len(lost)} sectors hold data they may not (first: sector {first} holds "
            f"{_describe(actual[first])}; writes to it (id, returned, flushed): {history})")
    # a write that returned passed the tracker; one cut short by the kill must be reported
    # only if some of its data reached the disk
    visible = {t for t in actual if t != b"?"}
    reached = [w for w in log.writes if w[0] in log.acked or tag(w[0]) in visible]
    for name, change_id, issued in [("start", log.start, 0), *log.snapshots]:
        after = [w for w in reached if w in log.writes[issued:]]
        missed = _granules(after) - reported_granules(disk, change_id, GRANULARITY)
        if missed:
            problems.append(f"{len(missed)} granules written after {name} not reported "
                            f"(first: {min(missed)})")
    for snap in disk.snapshots:
        known = [s for s in log.snapshots if s[0] == snap.name]
        if not known:
            continue  # created just before the kill, its log line lost
        if snap.name in log.removed:
            problems.append(f"snapshot {snap.name} came back after its removal finished")
        expected = _expected_after(log.writes[: known[0][2]])
        got = _sector_tags(disk.open_snapshot(snap.name).pread(SIZE, 0))
        wrong = [i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b]
        if wrong:
            first = wrong[0]
            problems.append(f"snapshot {snap.name} does not hold its content: sector {first} "
                            f"holds {_describe(got[first])}, not {_describe(expected[first])}")
    return problems


@pytest.mark.parametrize("trial", range(TRIALS))
def test_sigkill_loses_nothing_and_misses_nothing(tmp_path: Path, trial: int) -> None:
    rng = random.Random(trial)
    log = run_worker(tmp_path, trial, "good", kill_after=rng.uniform(0.05, 1.0))
    assert log.writes, "the worker was killed before it wrote anything"
    with Disk.open(tmp_path / "disk") as disk:
        assert check(disk, log) == []
    with Disk.open(tmp_path / "disk") as disk:  # and again after a clean close
        assert check(disk, log) == []


def test_sigkill_trials_find_the_consolidation_tracking_bug(tmp_path: Path) -> None:
    """The ESXi 6.0 bug re-created: the same trials must catch it."""
    found: list[str] = []
    for trial in range(20):
        directory = tmp_path / str(trial)
        log = run_worker(directory, 1000 + trial, "drops-marks-during-consolidation",
                         kill_after=0.6)
        with Disk.open(directory / "disk") as disk:
            found += [p for p in check(disk, log) if "not reported" in p]
        if found:
            break
    assert found, "20 killed runs with a tracker that drops marks during consolidation passed"
