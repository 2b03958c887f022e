"""Tracked-disk benchmarks: tracking on vs off, write-intent cost, query time and memory,
consolidation with and without concurrent writes. Side by side in one run, ratios printed.

    .venv/bin/python -m bench.disk_bench [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from blocktrail.disk import Disk
from blocktrail.tracking import ChangeTracker

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


class NoTracking(ChangeTracker):
    """Baseline: the same disk with the tracker's work removed (a mark never waits either, so
    the NBD server writes at once where the disk lets it, as with a tracker whose intent is
    durable already)."""

    def mark(self, offset: int, length: int) -> None:
        pass

    def try_mark(self, offset: int, length: int) -> bool:
        return not self.checkpoint_due


class MarksWithoutIntent(ChangeTracker):
    """Fine marks only: isolates the cost of the durable write intent."""

    def mark(self, offset: int, length: int) -> None:
        g = self.granularity
        self._open.add_range(offset // g, (offset + length - 1) // g + 1)

    def try_mark(self, offset: int, length: int) -> bool:
        if self.checkpoint_due:
            return False
        self.mark(offset, length)
        return True


@dataclass
class Row:
    name: str
    value: float
    unit: str
    note: str = ""


def _tmpdir() -> str:
    return tempfile.mkdtemp(prefix="bt-bench-", dir=os.environ.get("BENCH_DIR", "/var/tmp"))


def _writes(disk_write: Callable[[bytes, int], None], pattern: list[int], buf: bytes) -> float:
    os.sync()  # earlier runs' dirty pages must not be written back during this one
    start = time.perf_counter()
    for offset in pattern:
        disk_write(buf, offset)
    return time.perf_counter() - start


def write_throughput(count_random: int, seq_bytes: int) -> list[Row]:
    rows: list[Row] = []
    size = 2 * TiB
    rng = random.Random(1)
    random_pattern = [rng.randrange(0, size // 4096) * 4096 for _ in range(count_random)]
    seq_pattern = list(range(0, seq_bytes, MiB))
    for label, pattern, buf in (("4 KiB random", random_pattern, os.urandom(4 * KiB)),
                                ("1 MiB sequential", seq_pattern, os.urandom(MiB))):
        results: dict[str, tuple[float, int]] = {}
        for _round in range(2):  # interleaved, best of two
            for variant, cls in (("off", NoTracking),
                                 ("fine marks, no intent", MarksWithoutIntent),
                                 ("on", ChangeTracker)):
                d = _tmpdir()
                disk = Disk.create(os.path.join(d, "disk"), size, tracker_class=cls)
                seconds = _writes(disk.pwrite, pattern, buf)
                if variant not in results or seconds < results[variant][0]:
                    results[variant] = (seconds, disk.tracker.intent_fsyncs)
                disk.abandon()
                shutil.rmtree(d)
        d = _tmpdir()  # the floor: the same pwrites to a plain sparse file
        fd = os.open(os.path.join(d, "raw"), os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, size)
        raw = _writes(lambda b, o, fd=fd: os.pwrite(fd, b, o), pattern, buf)
        os.close(fd)
        shutil.rmtree(d)
        n, nbytes = len(pattern), len(pattern) * len(buf)
        off, on = results["off"][0], results["on"][0]
        rows += [
            Row(f"{label}: raw file pwrite", nbytes / raw / MiB, "MiB/s", f"{n / raw:,.0f} IOPS"),
            Row(f"{label}: tracking off", nbytes / off / MiB, "MiB/s", f"{n / off:,.0f} IOPS"),
            Row(f"{label}: tracking on", nbytes / on / MiB, "MiB/s",
                f"{n / on:,.0f} IOPS, {n} writes in {on:.2f} s"),
            Row(f"{label}: on/off time ratio", on / off, "x"),
            Row(f"{label}: write-intent fsyncs", results["on"][1], "fsyncs",
                f"intent share of time {(on - results['fine marks, no intent'][0]) / on:.0%}"),
        ]
    return rows


def delta_writes(count: int) -> list[Row]:
    """4 KiB random writes into a delta layer (a snapshot exists): copy-on-write of clusters."""
    rows = []
    for variant, cls in (("off", NoTracking), ("on", ChangeTracker)):
        d = _tmpdir()
        disk = Disk.create(os.path.join(d, "disk"), 64 * GiB, tracker_class=cls)
        disk.create_snapshot("s")
        rng = random.Random(3)
        pattern = [rng.randrange(0, 8 * GiB // 4096) * 4096 for _ in range(count)]
        seconds = _writes(disk.pwrite, pattern, os.urandom(4 * KiB))
        rows.append(Row(f"4 KiB random into a delta (8 GiB range): tracking {variant}",
                        count / seconds, "IOPS"))
        disk.abandon()
        shutil.rmtree(d)
    off_iops, on_iops = rows[0].value, rows[1].value
    rows.append(Row("delta writes: on/off time ratio", off_iops / on_iops, "x"))
    return rows


_QUERY_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[3])
load_tracker = sys.argv[2] == "1"
def rss(): return int(open("/proc/self/statm").read().split()[1]) * 4096
import numpy, pyroaring, blocktrail.disk  # the same imports either way
from blocktrail.disk import Disk
before = rss()
out = {"rss_before": before}
if load_tracker:
    disk = Disk.open(sys.argv[1])
    out["rss_after_open"] = rss()
    cids = json.loads(open(sys.argv[1] + "/../ids.json").read())
    for name, cid in cids.items():
        t = time.perf_counter(); start = 0; n = 0; changed = 0
        while start < disk.size_bytes:
            info = disk.query_changed_areas(cid, start)
            n += len(info); changed += info.changed_bytes; start = info.end
        out["query_" + name] = [time.perf_counter() - t, n, changed]
    t = time.perf_counter(); areas = disk.query_changed_areas(cids["epoch start"]).changed_areas
    out["materialize_extents"] = [time.perf_counter() - t, len(areas)]
    out["tracker_bytes"] = disk.tracker.memory_bytes()
    out["rss_after_query"] = rss()
    disk.abandon()
print(json.dumps(out))
"""


def query_and_memory(extents: int) -> list[Row]:
    d = _tmpdir()
    path = os.path.join(d, "disk")
    disk = Disk.create(path, 2 * TiB, 64 * KiB)
    rng = random.Random(5)
    ids = {"epoch start": disk.current_change_id}
    granules = 2 * TiB // (64 * KiB)
    per_interval = extents // 4
    for k in range(4):  # marks made straight through the tracker: no data written
        with disk._lock:
            for _ in range(per_interval):
                g = rng.randrange(0, granules - 16)
                disk.tracker.mark(g * 64 * KiB, rng.randrange(1, 8) * 64 * KiB)
        snap = disk.create_snapshot(f"s{k}")
        if k == 1:
            ids["middle snapshot"] = snap.change_id
    ids["*"] = "*"
    disk.close()
    with open(os.path.join(d, "ids.json"), "w") as f:
        json.dump(ids, f)
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    runs = [json.loads(subprocess.run([sys.executable, "-c", _QUERY_CHILD, path, flag, src],
                                      capture_output=True, text=True, check=True).stdout)
            for flag in ("0", "1")]
    shutil.rmtree(d)
    base, full = runs
    rows = []
    for name in ("epoch start", "middle snapshot", "*"):
        seconds, n, changed = full["query_" + name]
        rows.append(Row(f"2 TiB query since {name}", seconds * 1000, "ms",
                        f"{n:,} extents, {changed / GiB:.1f} GiB, all pages"))
    seconds, n = full["materialize_extents"]
    rows.append(Row("  + building the Extent objects (first page)", seconds * 1000, "ms",
                    f"{n:,} extents"))
    rows.append(Row("tracker resident memory (RSS delta)",
                    (full["rss_after_query"] - base["rss_before"]) / MiB, "MiB",
                    f"serialized bitmaps {full['tracker_bytes'] / MiB:.2f} MiB; "
                    f"process baseline {base['rss_before'] / MiB:.0f} MiB"))
    return rows


def consolidation(delta_bytes: int) -> list[Row]:
    rows = []
    for concurrent in (False, True):
        d = _tmpdir()
        disk = Disk.create(os.path.join(d, "disk"), 64 * GiB)
        disk.create_snapshot("s")
        chunk = os.urandom(MiB)
        for offset in range(0, delta_bytes, MiB):
            disk.pwrite(chunk, offset * 3 % (48 * GiB) // MiB * MiB)
        disk.create_snapshot("t")  # the 1 GiB delta is now frozen
        stop = threading.Event()
        writes = [0]

        stall = [0.0]

        def writer(disk: Disk = disk, stop: threading.Event = stop,
                   writes: list[int] = writes, stall: list[float] = stall) -> None:
            rng = random.Random(9)
            buf = os.urandom(4 * KiB)
            while not stop.is_set():
                t = time.perf_counter()
                disk.pwrite(buf, rng.randrange(0, 16 * GiB // 4096) * 4096)
                stall[0] = max(stall[0], time.perf_counter() - t)
                writes[0] += 1

        thread = threading.Thread(target=writer)
        if concurrent:
            thread.start()
        start = time.perf_counter()
        longest = 0.0
        for name in ("s", "t"):
            c = disk.begin_remove_snapshot(name)
            while True:
                t = time.perf_counter()
                done = c.step()
                longest = max(longest, time.perf_counter() - t)
                if done:
                    break
        seconds = time.perf_counter() - start
        stop.set()
        if concurrent:
            thread.join()
        label = "with" if concurrent else "without"
        note = f"longest step {longest * 1000:.0f} ms"
        if concurrent:
            note += (f"; writer {writes[0] / seconds:,.0f} IOPS during it, longest write "
                     f"{stall[0] * 1000:.0f} ms")
        rows.append(Row(f"consolidate {delta_bytes // MiB} MiB delta {label} concurrent writes",
                        seconds, "s", note))
        disk.close()
        shutil.rmtree(d)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, < 1 minute")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    q = args.quick
    started = time.perf_counter()
    rows = write_throughput(10_000 if q else 100_000, (256 if q else 1024) * MiB)
    rows += delta_writes(2_000 if q else 20_000)
    rows += query_and_memory(20_000 if q else 100_000)
    rows += consolidation((128 if q else 1024) * MiB)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        width = max(len(r.name) for r in rows)
        for r in rows:
            print(f"{r.name:<{width}}  {r.value:>12,.2f} {r.unit:<6} {r.note}")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"(total {time.perf_counter() - started:.0f} s; bench process peak RSS "
              f"{peak:.0f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
