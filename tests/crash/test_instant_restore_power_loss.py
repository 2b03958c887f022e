"""An instant restore losing power at every durability point of it (CrashMonkey style).

The disk is created with its content at once (`Disk.create_restored`): its base reads chunks
from the restore point until a background fill made them all local, and the guest writes above
it, flushing each write. Here it runs on the simulated file system, once per durability
operation, losing power just before the N-th (once dropping what no fsync made durable, once
tearing it: `SimulatedFileIO.torn`). When the machine is back:

- an interrupted create leaves no disk, or a whole one;
- the disk opens and reads as the point with the guest's flushed writes on it (the sectors of
  a write the loss cut may hold either bytes): a chunk the fill had fetched and marked, whose
  data the loss took, would read as zeros, which is what this catches;
- the point's change ID still answers, reporting every granule the guest changed;
- the fill then completes, the base becomes a plain one, and all of that holds after a
  reopen.

The kill sweep (test_crash_points.py) covers the same steps for a killed process, whose written
data the kernel keeps.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from blocktrail.disk import Disk
from blocktrail.errors import DiskNotFound
from faulty import reported_granules

sys.path.insert(0, str(Path(__file__).parent))
from powercut import PowerCutFileIO, PowerLoss

PATH = "/sim/restored"
CHUNK = 4096
GRANULARITY = 4096
CLUSTER = 4096
SECTOR = 512
POINT_ID = "0b8e6c1f-2d5a-4f27-9b1e-6f3a0d7c9e42/3"
IMAGE = bytes(CHUNK) + random.Random(7).randbytes(5 * CHUNK) + bytes(2 * CHUNK) + \
    random.Random(8).randbytes(4 * CHUNK + 1000)


class PointSource:
    """IMAGE as a restore point in memory."""

    chunk_size = CHUNK
    size_bytes = len(IMAGE)

    @staticmethod
    def opener(info: dict[str, Any]) -> PointSource:
        return PointSource()

    def holes(self) -> list[bool]:
        return [not any(IMAGE[i : i + CHUNK]) for i in range(0, len(IMAGE), CHUNK)]

    def fetch(self, indexes: list[int]) -> Any:
        return ((i, IMAGE[i * CHUNK : (i + 1) * CHUNK]) for i in indexes)

    def describe(self) -> dict[str, Any]:
        return {"point": "memory"}

    def close(self) -> None:
        pass


# The guest's writes (offset, length), each flushed, between fill steps of two chunks.
WRITES = [(5000, 3000), (100, 700), (9 * CHUNK + 17, 2 * CHUNK), (len(IMAGE) - 900, 900)]


def _data(index: int, length: int) -> bytes:
    return random.Random(100 + index).randbytes(length)


class Run:
    """The workload, step by step; ``before`` and ``after`` are the content a step started
    from and the one it makes (a fill step changes nothing the guest can see)."""

    def __init__(self, fs: PowerCutFileIO) -> None:
        self.fs = fs
        self.before = self.after = IMAGE
        self.disk: Disk | None = None

    def step(self, after: bytes, action: Callable[[], object]) -> None:
        self.before, self.after = self.after, after
        action()
        self.before = after

    def run(self) -> None:
        self.disk = Disk.create_restored(PATH, PointSource(), POINT_ID, granularity=GRANULARITY,
                                         cluster_size=CLUSTER, fileio=self.fs)
        disk = self.disk
        for index, (offset, length) in enumerate(WRITES):
            data = _data(index, length)
            content = self.after[:offset] + data + self.after[offset + length :]
            self.step(content, lambda d=data, o=offset: (disk.pwrite(d, o), disk.flush()))
            self.step(self.after, lambda: disk.fill(2))
        while disk.fill(2) is not None:
            pass
        self.step(self.after, disk.close)


def _check(disk: Disk, candidates: tuple[bytes, bytes]) -> None:
    content = disk.pread(disk.size_bytes, 0)
    assert len(content) == len(IMAGE)
    for lo in range(0, len(content), SECTOR):
        assert any(c[lo : lo + SECTOR] == content[lo : lo + SECTOR] for c in candidates), \
            f"sector at {lo} is neither its content before nor after the interrupted step"
    reported = reported_granules(disk, POINT_ID, GRANULARITY)
    for g in range(-(-len(IMAGE) // GRANULARITY)):
        lo, hi = g * GRANULARITY, (g + 1) * GRANULARITY
        if content[lo:hi] != IMAGE[lo:hi]:
            assert g in reported, f"granule {g} changed since the point but is not reported"


def _reopen(fs: PowerCutFileIO) -> Disk:
    return Disk.open(PATH, fileio=fs, chunk_sources=PointSource.opener)


def _fill_to_the_end(disk: Disk) -> None:
    while disk.fill(3) is not None:
        pass


def _recover_through_a_second_loss(after: PowerCutFileIO, candidates: tuple[bytes, bytes],
                                   torn: int | None) -> int:
    """On copies of the disk ``after`` the first loss left: the recovery (the reopen) and the
    rest of the fill lose power too, before their 1st durability operation, their 2nd, ...
    until they complete; after each, the disk must read as before. -> the cuts made."""
    cut_at = 1
    while True:
        copy = PowerCutFileIO(0, None if torn is None else torn + cut_at)
        copy.copy_disk_from(after)
        copy.count, copy.cut_at = 0, cut_at
        try:
            with _reopen(copy) as disk:
                _fill_to_the_end(disk)
            return cut_at - 1
        except PowerLoss:
            copy.restart()
        with _reopen(copy) as disk:
            _check(disk, candidates)
            _fill_to_the_end(disk)
            _check(disk, candidates)
        cut_at += 1


@pytest.mark.parametrize("recovery_cut", [False, True], ids=["once", "again in recovery"])
@pytest.mark.parametrize("torn", [False, True], ids=["unsynced lost", "unsynced torn"])
def test_an_instant_restore_losing_power_anywhere_reads_as_the_point(torn: bool,
                                                                    recovery_cut: bool) -> None:
    """``recovery_cut``: after each loss, the reopen and the rest of the fill lose power too,
    at each of their durability operations in turn (compound failures)."""
    cut_at, outcomes = 1, {"absent": 0, "restoring": 0, "local": 0}
    while True:
        fs = PowerCutFileIO(0, cut_at if torn else None)
        fs.makedirs("/sim")
        fs.count, fs.cut_at = 0, cut_at
        run = Run(fs)
        try:
            run.run()
        except PowerLoss:
            if run.disk is not None:
                run.disk.abandon()
            fs.restart()
            try:
                disk = _reopen(fs)
            except DiskNotFound:
                assert run.disk is None, f"cut {cut_at}: the disk made was lost"
                outcomes["absent"] += 1
                cut_at += 1
                continue
            outcomes["local" if disk.restore_progress is None else "restoring"] += 1
            where = f"power lost before durability operation {cut_at}"
            if recovery_cut:
                disk.close()  # (its reads and closing make nothing durable it had not)
                _recover_through_a_second_loss(fs, (run.before, run.after),
                                               cut_at * 1000 if torn else None)
                disk = _reopen(fs)
            try:
                _check(disk, (run.before, run.after))
                _fill_to_the_end(disk)
                assert disk.restore_progress is None, where
                final = disk.pread(disk.size_bytes, 0)
                _check(disk, (run.before, run.after))
            finally:
                disk.close()
            with _reopen(fs) as again:
                assert again.pread(again.size_bytes, 0) == final, where
                _check(again, (run.before, run.after))
            cut_at += 1
            continue
        break
    assert outcomes["restoring"] and outcomes["local"], outcomes
    assert cut_at > 20, f"only {cut_at - 1} durability operations"
