"""The end-to-end demo (`./run demo`): incremental copies of a disk under live writes.

A guest thread keeps writing to a tracked disk while, round after round, the demo takes a
snapshot, asks for the areas changed since the previous snapshot, copies only those into a replica
image, and removes the previous snapshot (consolidation, while the guest writes on). At the end
the replica must equal the last snapshot byte for byte: the ESXi 6.0 consolidation scenario, run
for real.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence

from blocktrail.disk import Disk
from blocktrail.extents import Extent, total_length

Reader = Callable[[int, int], bytes]

MiB = 1 << 20


class GuestWriter(threading.Thread):
    """Random 4-64 KiB writes, zeroes and trims until stopped."""

    def __init__(self, disk: Disk, seed: int) -> None:
        super().__init__(daemon=True)
        self._disk, self._rng = disk, random.Random(seed)
        self._halt = threading.Event()
        self.writes = 0
        self.bytes = 0

    def run(self) -> None:
        size = self._disk.size_bytes
        while not self._halt.is_set():
            length = self._rng.choice((4096, 8192, 65536))
            offset = self._rng.randrange(0, size - length) & ~511
            kind = self._rng.random()
            if kind < 0.9:
                self._disk.pwrite(self._rng.randbytes(length), offset)
            elif kind < 0.95:
                self._disk.zero(length, offset)
            else:
                self._disk.trim(length, offset)
            self.writes += 1
            self.bytes += length
            time.sleep(0.0002)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _digest_view(read: Reader, size: int) -> str:
    h = hashlib.sha256()
    for offset in range(0, size, 4 * MiB):
        h.update(read(min(4 * MiB, size - offset), offset))
    return h.hexdigest()


def run(workdir: str, size: int, rounds: int, seed: int) -> bool:
    disk_dir, replica_path = os.path.join(workdir, "disk0"), os.path.join(workdir, "replica.raw")
    say = print
    say(f"blocktrail demo in {workdir}")
    disk = Disk.create(disk_dir, size)
    rng = random.Random(seed)
    for _ in range(256):  # some initial content
        disk.pwrite(rng.randbytes(256 * 1024), rng.randrange(0, size // MiB - 1) * MiB)
    say(f"created a {size // MiB} MiB tracked disk (granularity {disk.granularity // 1024} KiB)"
        f" and wrote 64 MiB of initial data")
    guest = GuestWriter(disk, seed)
    guest.start()
    previous = disk.create_snapshot("round-0")
    started = time.perf_counter()
    full = disk.query_changed_areas("*", snapshot=previous.name)
    copy_areas(disk, previous.name, full.changed_areas, replica_path, size)
    say(f"full copy of round-0: {total_length(full.changed_areas) // MiB} MiB allocated, "
        f"{time.perf_counter() - started:.2f} s")
    ok = True
    for n in range(1, rounds + 1):
        time.sleep(0.3)
        snap = disk.create_snapshot(f"round-{n}")
        t0 = time.perf_counter()
        areas = changed_since(disk, previous.change_id, snap.name)
        copy_areas(disk, snap.name, areas, replica_path, size)
        t1 = time.perf_counter()
        disk.remove_snapshot(previous.name)  # consolidation while the guest writes
        t2 = time.perf_counter()
        same = _digest_view(disk.open_snapshot(snap.name).pread, size) == _digest_view(
            _file_reader(replica_path), size)
        ok &= same
        say(f"round {n}: {len(areas)} changed areas, {total_length(areas) / MiB:.1f} MiB copied "
            f"in {t1 - t0:.2f} s; consolidated {previous.name} in {t2 - t1:.2f} s under "
            f"{guest.writes} guest writes so far; replica == {snap.name}: "
            f"{'identical' if same else 'DIFFERENT'}")
        previous = snap
    guest.stop()
    disk.close()
    say(f"guest wrote {guest.writes} times ({guest.bytes / MiB:.1f} MiB) during the demo")
    say("identical" if ok else "DIFFERENT: an incremental copy missed a change")
    return ok


def changed_since(disk: Disk, change_id: str, snapshot: str) -> list[Extent]:
    """All pages of QueryChangedDiskAreas-style answers."""
    areas: list[Extent] = []
    start = 0
    size = disk.open_snapshot(snapshot).size_bytes
    while start < size:
        info = disk.query_changed_areas(change_id, start, snapshot)
        areas += info.changed_areas
        start = info.end
    return areas


def copy_areas(disk: Disk, snapshot: str, areas: Sequence[Extent], path: str,
               size: int) -> None:
    view = disk.open_snapshot(snapshot)
    with open(path, "r+b" if os.path.exists(path) else "w+b") as out:
        out.truncate(size)
        for area in areas:
            for offset in range(area.offset, area.end, 4 * MiB):
                n = min(4 * MiB, area.end - offset)
                out.seek(offset)
                out.write(view.pread(n, offset))


def _file_reader(path: str) -> Reader:
    def read(count: int, offset: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(count)
    return read


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blocktrail-demo", description=__doc__)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="blocktrail-demo-")
    try:
        return 0 if run(workdir, args.size_mib * MiB, args.rounds, args.seed) else 1
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
