"""Backup benchmarks, side by side with restic and borg in one run (Debian packages).

    .venv/bin/python -m bench.backup_bench [--size-gib 4] [--json]

A disk image like the compass figures (64 KiB blocks: 50% random, ~27% zeros, ~23% text); full
backup throughput, the incremental time and repository growth for 1% scattered 64 KiB changes,
restore throughput; then the same change on a 4x larger disk (blocktrail only: the cost must
track the change, not the disk).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass

from bench.peers import Borg, Peer, Restic
from bench.workload import BLOCK, apply_to_file, du_bytes, scattered_changes, write_image
from blocktrail.backup.engine import BackupOptions, run_backup
from blocktrail.backup.sources.local import LocalDiskSource
from blocktrail.disk import Disk
from blocktrail.disk.importer import import_raw
from blocktrail.repo import Encryption, Repository

MiB, GiB = 1 << 20, 1 << 30


@dataclass
class Result:
    tool: str
    full_s: float
    full_mib_s: float
    incremental_s: float
    growth_bytes: int
    restore_s: float
    restore_mib_s: float
    incremental_no_audit_s: float = 0.0


def _drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass  # not root: the page cache stays warm for every tool alike


def run_blocktrail(work: str, image: str, changes: list[tuple[int, bytes]]) -> Result:
    disk_dir, repo_dir = os.path.join(work, "disk"), os.path.join(work, "bt-repo")
    disk = import_raw(image, disk_dir)
    size = disk.size_bytes
    repo = Repository.init(repo_dir, encryption=Encryption.none())
    source = LocalDiskSource(disk)
    _drop_caches()
    start = time.perf_counter()
    run_backup(source, repo)
    full = time.perf_counter() - start
    before = du_bytes(repo_dir)
    for offset, data in changes:
        disk.pwrite(data, offset)
    disk.flush()
    _drop_caches()
    start = time.perf_counter()
    inc = run_backup(source, repo, BackupOptions(seed=1))
    incremental = time.perf_counter() - start
    growth = du_bytes(repo_dir) - before
    target = os.path.join(work, "bt-restore.raw")
    _drop_caches()
    start = time.perf_counter()
    repo.restore(inc.point.id, target)
    restore = time.perf_counter() - start
    with open(target, "rb") as f:
        assert f.read(BLOCK * 4) == disk.pread(BLOCK * 4, 0)
    os.unlink(target)
    no_audit = _incremental_without_audit(disk, repo, changes)
    repo.close()
    disk.close()
    return Result("blocktrail", full, size / MiB / full, incremental, growth, restore,
                  size / MiB / restore, no_audit)


def _incremental_without_audit(disk: Disk, repo: Repository,
                               changes: list[tuple[int, bytes]]) -> float:
    """The same number of changes again, with the sampled audit off: the tracker's part."""
    for offset, data in changes:
        disk.pwrite(data[::-1], offset)
    _drop_caches()
    start = time.perf_counter()
    run_backup(LocalDiskSource(disk), repo, BackupOptions(audit_percent=0, audit_minimum=0))
    return time.perf_counter() - start


def run_peer(peer: Peer, work: str, image: str, changes: list[tuple[int, bytes]]) -> Result:
    size = os.path.getsize(image)
    copy = os.path.join(work, f"{peer.name}-disk.raw")
    shutil.copyfile(image, copy)  # each tool gets its own image to change
    peer.init()
    _drop_caches()
    full = peer.backup(copy, "full").seconds
    before = du_bytes(peer.repo)
    apply_to_file(copy, changes)
    _drop_caches()
    incremental = peer.backup(copy, "incr").seconds
    growth = du_bytes(peer.repo) - before
    target = os.path.join(work, f"{peer.name}-restore")
    _drop_caches()
    restore = peer.restore("incr", target).seconds
    shutil.rmtree(target, ignore_errors=True)
    os.unlink(copy)
    return Result(peer.name, full, size / MiB / full, incremental, growth, restore,
                  size / MiB / restore)


def larger_disk(work: str, image: str, changes: list[tuple[int, bytes]],
                factor: int) -> tuple[float, float]:
    """The same data and change on a disk ``factor`` times as large: the incremental's time."""
    size = os.path.getsize(image)
    disk = Disk.create(os.path.join(work, "big-disk"), size * factor)
    with open(image, "rb") as f:
        for offset in range(0, size, 4 * MiB):
            data = f.read(4 * MiB)
            if data.count(0) != len(data):
                disk.pwrite(data, offset)
    repo = Repository.init(os.path.join(work, "big-repo"), encryption=Encryption.none())
    source = LocalDiskSource(disk)
    run_backup(source, repo)
    for offset, data in changes:
        disk.pwrite(data, offset)
    _drop_caches()
    start = time.perf_counter()
    run_backup(source, repo, BackupOptions(seed=1))
    seconds = time.perf_counter() - start
    no_audit = _incremental_without_audit(disk, repo, changes)
    repo.close()
    disk.close()
    return seconds, no_audit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-gib", type=float, default=4.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    size = int(args.size_gib * GiB) // BLOCK * BLOCK
    work = tempfile.mkdtemp(prefix="bt-backup-bench-",
                            dir=os.environ.get("BENCH_DIR", "/var/tmp"))
    try:
        image = os.path.join(work, "image.raw")
        counts = write_image(image, size)
        changes = scattered_changes(size, 0.01, seed=11)
        changed_bytes = len(changes) * BLOCK
        results = [run_blocktrail(work, image, changes)]
        for peer_class in (Restic, Borg):
            tool = peer_class.name
            if Peer.available(tool):
                results.append(run_peer(peer_class(os.path.join(work, f"{tool}-repo")), work,
                                        image, changes))
        big = larger_disk(work, image, changes, 4)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ours = results[0]
    if args.json:
        print(json.dumps({"image_blocks": counts, "changed_bytes": changed_bytes,
                          "results": [asdict(r) for r in results],
                          "incremental_on_4x_disk_s": big[0],
                          "incremental_on_4x_disk_no_audit_s": big[1]}, indent=2))
        return 0
    print(f"image {size / GiB:.1f} GiB: {counts}; change: {len(changes)} scattered 64 KiB "
          f"blocks = {changed_bytes / MiB:.1f} MiB")
    print(f"{'tool':<11}{'full s':>9}{'MiB/s':>9}{'incr s':>9}{'growth MiB':>12}"
          f"{'growth/chg':>11}{'restore s':>11}{'MiB/s':>9}")
    for r in results:
        print(f"{r.tool:<11}{r.full_s:>9.2f}{r.full_mib_s:>9.0f}{r.incremental_s:>9.2f}"
              f"{r.growth_bytes / MiB:>12.1f}{r.growth_bytes / changed_bytes:>11.2f}"
              f"{r.restore_s:>11.2f}{r.restore_mib_s:>9.0f}")
    for r in results[1:]:
        print(f"vs {r.tool}: full {r.full_s / ours.full_s:.2f}x faster, incremental "
              f"{ours.incremental_s / r.incremental_s:.3f}x of its time, restore "
              f"{r.restore_s / ours.restore_s:.2f}x faster")
    print(f"same change on a {4 * size / GiB:.1f} GiB disk: incremental {big[0]:.2f} s "
          f"(vs {ours.incremental_s:.2f} s on {size / GiB:.1f} GiB); with the 1% audit off "
          f"{big[1]:.2f} s (vs {ours.incremental_no_audit_s:.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
