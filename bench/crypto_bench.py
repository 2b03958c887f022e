"""Encryption's cost, side by side in one run: blocktrail unencrypted, encrypted (AES-256-GCM and
ChaCha20-Poly1305) and restic (which always encrypts).

    .venv/bin/python -m bench.crypto_bench [--size-gib 4] [--rounds N] [--json]

The disk image of `backup_bench` (64 KiB blocks: 50% random, ~27% zeros, ~23% text; default
0.25 GiB for a quick run): full backup, an incremental after 1% of the blocks changed
(scattered), a restore of the incremental; the ratios encrypted / unencrypted (goal >= 0.9x)
and restic / encrypted on the full backup (goal >= 2x); and the time to open an encrypted
repository with the default argon2id parameters (the KDF's cost, paid once per command).
``--rounds N`` runs our three modes N times in turn and reports each measure's median (a
virtual machine's disk varies from one minute to the next; restic runs once).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass

from bench.backup_bench import _drop_caches
from bench.measure import count
from bench.peers import Peer, Restic
from bench.workload import BLOCK, apply_to_file, du_bytes, scattered_changes, write_image
from blocktrail.backup.engine import BackupOptions, run_backup
from blocktrail.backup.sources.local import LocalDiskSource
from blocktrail.disk.importer import import_raw
from blocktrail.repo import Encryption, KdfParams, Repository

MiB, GiB = 1 << 20, 1 << 30
PASSWORD = "bench-password"
MODES = {"unencrypted": Encryption.none(),
         "aes-256-gcm": Encryption(PASSWORD, "aes-256-gcm"),
         "chacha20-poly1305": Encryption(PASSWORD, "chacha20-poly1305")}


@dataclass
class Result:
    tool: str
    full_s: float
    incremental_s: float
    restore_s: float
    repo_bytes: int
    open_s: float = 0.0  # opening the repository (the KDF, for an encrypted one)

    def mib_s(self, size: int, seconds: float) -> float:
        return size / MiB / seconds


def run_blocktrail(work: str, mode: str, image: str,
                   changes: list[tuple[int, bytes]]) -> Result:
    disk_dir, repo_dir = os.path.join(work, f"disk-{mode}"), os.path.join(work, f"repo-{mode}")
    disk = import_raw(image, disk_dir)
    Repository.init(repo_dir, encryption=MODES[mode]).close()
    opens = []
    for _ in range(3):
        start = time.perf_counter()
        Repository.open(repo_dir, password=PASSWORD).close()
        opens.append(time.perf_counter() - start)
    repo = Repository.open(repo_dir, password=PASSWORD)
    source = LocalDiskSource(disk)
    _drop_caches()
    start = time.perf_counter()
    run_backup(source, repo)
    full = time.perf_counter() - start
    for offset, data in changes:
        disk.pwrite(data, offset)
    disk.flush()
    _drop_caches()
    start = time.perf_counter()
    inc = run_backup(source, repo, BackupOptions(seed=1))
    incremental = time.perf_counter() - start
    target = os.path.join(work, f"restore-{mode}.raw")
    _drop_caches()
    start = time.perf_counter()
    repo.restore(inc.point.id, target)
    restore = time.perf_counter() - start
    with open(target, "rb") as f:
        if f.read(BLOCK * 4) != disk.pread(BLOCK * 4, 0):
            raise RuntimeError(f"{mode}: the restore differs from the disk")
    os.unlink(target)
    repo.close()
    disk.close()
    size = du_bytes(repo_dir)
    shutil.rmtree(disk_dir)
    shutil.rmtree(repo_dir)
    return Result(f"blocktrail {mode}", full, incremental, restore, size,
                  statistics.median(opens))


def median_result(runs: list[Result]) -> Result:
    """Each measure's median over rounds of the same tool."""
    return Result(runs[0].tool, statistics.median(r.full_s for r in runs),
                  statistics.median(r.incremental_s for r in runs),
                  statistics.median(r.restore_s for r in runs), runs[0].repo_bytes,
                  statistics.median(r.open_s for r in runs))


def run_restic(work: str, image: str, changes: list[tuple[int, bytes]]) -> Result:
    peer = Restic(os.path.join(work, "restic-repo"))
    copy = os.path.join(work, "restic-disk.raw")
    shutil.copyfile(image, copy)
    peer.init()
    _drop_caches()
    full = peer.backup(copy, "full").seconds
    apply_to_file(copy, changes)
    _drop_caches()
    incremental = peer.backup(copy, "incr").seconds
    target = os.path.join(work, "restic-restore")
    _drop_caches()
    restore = peer.restore("incr", target).seconds
    size = du_bytes(peer.repo)
    shutil.rmtree(target, ignore_errors=True)
    os.unlink(copy)
    return Result("restic", full, incremental, restore, size)


def kdf_seconds() -> float:
    """The default argon2id parameters alone, on this machine (median of 3)."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        KdfParams().derive(PASSWORD.encode(), bytes(32))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-gib", type=float, default=0.25)
    parser.add_argument("--rounds", type=count, default=1, metavar="N",
                        help="our three modes N times, in turn (medians reported)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    size = int(args.size_gib * GiB) // BLOCK * BLOCK
    work = tempfile.mkdtemp(prefix="bt-crypto-bench-",
                            dir=os.environ.get("BENCH_DIR", "/var/tmp"))
    try:
        image = os.path.join(work, "image.raw")
        counts = write_image(image, size)
        changes = scattered_changes(size, 0.01, seed=11)
        rounds: dict[str, list[Result]] = {mode: [] for mode in MODES}
        for _ in range(args.rounds):  # in turn: a slow minute of the disk hits every mode
            for mode in MODES:
                rounds[mode].append(run_blocktrail(work, mode, image, changes))
        results = [median_result(runs) for runs in rounds.values()]
        if Peer.available("restic"):
            results.append(run_restic(work, image, changes))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    kdf = kdf_seconds()
    plain, enc = results[0], results[1]
    ratios = {
        "encrypted_vs_unencrypted_full": plain.full_s / enc.full_s,
        "encrypted_vs_unencrypted_incremental": plain.incremental_s / enc.incremental_s,
        "encrypted_vs_unencrypted_restore": plain.restore_s / enc.restore_s,
        **({"restic_vs_encrypted_full": results[-1].full_s / enc.full_s,
            "restic_vs_encrypted_incremental": results[-1].incremental_s / enc.incremental_s,
            "restic_vs_encrypted_restore": results[-1].restore_s / enc.restore_s}
           if results[-1].tool == "restic" else {})}
    if args.json:
        print(json.dumps({"size_bytes": size, "image_blocks": counts,
                          "results": [asdict(r) for r in results], "ratios": ratios,
                          "kdf_default_s": kdf}, indent=2))
        return 0
    print(f"image {size / GiB:.2f} GiB: {counts}; change: {len(changes)} scattered 64 KiB "
          f"blocks; CPUs: {os.cpu_count()}; ours: median of {args.rounds} round(s)")
    print(f"{'':<30}{'full s':>8}{'MiB/s':>8}{'incr s':>8}{'restore s':>10}{'MiB/s':>8}"
          f"{'repo MiB':>10}{'open s':>8}")
    for r in results:
        print(f"{r.tool:<30}{r.full_s:>8.2f}{r.mib_s(size, r.full_s):>8.0f}"
              f"{r.incremental_s:>8.2f}{r.restore_s:>10.2f}{r.mib_s(size, r.restore_s):>8.0f}"
              f"{r.repo_bytes / MiB:>10.1f}{r.open_s:>8.3f}")
    print(f"encrypted ({enc.tool.split()[1]}) / unencrypted throughput: full "
          f"{ratios['encrypted_vs_unencrypted_full']:.2f}x, incremental "
          f"{ratios['encrypted_vs_unencrypted_incremental']:.2f}x, restore "
          f"{ratios['encrypted_vs_unencrypted_restore']:.2f}x (goal >= 0.9x)")
    if "restic_vs_encrypted_full" in ratios:
        print(f"encrypted vs restic: full {ratios['restic_vs_encrypted_full']:.2f}x faster "
              f"(goal >= 2x), incremental {ratios['restic_vs_encrypted_incremental']:.2f}x, "
              f"restore {ratios['restic_vs_encrypted_restore']:.2f}x")
    print(f"opening an encrypted repository: {enc.open_s:.3f} s ("
          f"{KdfParams().describe()} alone: {kdf:.3f} s); unencrypted: {plain.open_s:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
