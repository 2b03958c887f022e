"""The end-to-end demo (`./run demo`): incremental backups of a disk under live writes.

A guest thread keeps writing, zeroing and trimming a tracked disk while, round after round, the
demo takes a snapshot, backs it up incrementally (only the areas the tracker reports, plus a
sampled audit of the rest), restores the new restore point and compares it byte for byte with the
snapshot, then removes the previous snapshot — a consolidation under the guest's writes: the ESXi
6.0 scenario, run for real. It ends with `check --read-data` of the repository.
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

from blocktrail.backup.engine import BackupOptions, run_backup
from blocktrail.backup.sources.local import LocalDiskSource
from blocktrail.disk import Disk
from blocktrail.repo import Repository

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


def _digest(read: Callable[[int, int], bytes], size: int) -> str:
    h = hashlib.sha256()
    for offset in range(0, size, 4 * MiB):
        h.update(read(min(4 * MiB, size - offset), offset))
    return h.hexdigest()


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            h.update(block)
    return h.hexdigest()


def run(workdir: str, size: int, rounds: int, seed: int) -> bool:
    say = print
    say(f"blocktrail demo in {workdir}")
    disk = Disk.create(os.path.join(workdir, "disk0"), size)
    repo = Repository.init(os.path.join(workdir, "repo"))
    source = LocalDiskSource(disk)
    rng = random.Random(seed)
    for _ in range(256):
        disk.pwrite(rng.randbytes(256 * 1024), rng.randrange(0, size // MiB - 1) * MiB)
    say(f"disk0: {size // MiB} MiB tracked disk, 64 MiB written; repository created")
    guest = GuestWriter(disk, seed)
    guest.start()
    ok, previous = True, None
    for n in range(rounds + 1):
        time.sleep(0.3)
        snap = disk.create_snapshot(f"round-{n}")
        report = run_backup(source, repo, BackupOptions(snapshot=snap.name, seed=n))
        target = os.path.join(workdir, "restored.raw")
        started = time.perf_counter()
        repo.restore(report.point.id, target)
        restore_s = time.perf_counter() - started
        same = _file_digest(target) == _digest(disk.open_snapshot(snap.name).pread, size)
        os.unlink(target)
        ok &= same
        how = report.kind + (f" ({report.fallback_reason})" if report.fallback_reason else "")
        say(f"round {n}: {how} backup of {snap.name}: read {report.bytes_read / MiB:.1f} MiB, "
            f"stored {report.point.stats['bytes_stored'] / MiB:.1f} MiB in "
            f"{report.seconds:.2f} s; audit re-read {report.audit.sampled_chunks} unchanged "
            f"chunks: {'all match' if report.audit.tracker_trusted else 'MISMATCH'}; "
            f"restored in {restore_s:.2f} s: {'identical' if same else 'DIFFERENT'}")
        if previous is not None:
            started = time.perf_counter()
            disk.remove_snapshot(previous)  # consolidation while the guest writes on
            say(f"         consolidated {previous} in {time.perf_counter() - started:.2f} s "
                f"under live writes ({guest.writes} guest writes so far)")
        previous = snap.name
    guest.stop()
    check = repo.check(read_data=True)
    say(f"guest wrote {guest.writes} times ({guest.bytes / MiB:.1f} MiB); repository check "
        f"--read-data: {check.points} points, {check.chunks_read} chunks, "
        f"{'no problems' if check.ok else f'{len(check.problems)} PROBLEMS'}")
    repo.close()
    disk.close()
    ok &= check.ok
    say("identical" if ok else "DIFFERENT: a restore point does not equal its snapshot")
    return ok


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
