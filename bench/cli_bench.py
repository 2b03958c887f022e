"""What a user waits for at the command line, as whole commands, side by side in one run.

    .venv/bin/python -m bench.cli_bench [--size-gib 4] [--history N] [--json]

- start-up: ``blocktrail --help`` and ``blocktrail points REPO`` (best of five), against the
  interpreter doing nothing (``python -c pass``) and ``restic version``; and the start-up of
  ``points`` and of the incremental ``backup`` themselves: from launching the command to its
  first open of the repository's ``config.json`` (seen through inotify, nothing added to the
  command), where its own work begins;
- an incremental backup of a 1% change (scattered 64 KiB blocks) of a local disk as a whole
  command (``blocktrail backup DIR --repo R``), against ``restic backup`` of the same change to
  the same image file (restic 0.14 from Debian; page cache warm for both, as the change was just
  written; written back first, so that neither waits behind what the other wrote, such as
  restic's copy of the image and its repository), ``--incrementals`` rounds, each a new change
  (the median reported, each printed); then as many again without the audit
  (``--audit-sample 0``), what the audit's reads of unchanged chunks cost; with
  ``--history N``, then again once the repository also holds N restore points of N/20
  other disks, taken after the disk's last backup (what a long history of many disks costs
  the command: its choice of the base, its chunk index), against the command's own median
  before;
  the repository is encrypted (the default: argon2id t=3 m=64 MiB p=4, as a user gets), as
  restic's is, so both pay their key derivation once per command;
- a full backup of a local disk against a raw sequential read of its file, through the page
  cache (``cat FILE > /dev/null``) and past it (``dd bs=4M iflag=direct``, as the backup
  reads a disk), page caches dropped before each (as root), ``--full-pairs`` times in turn
  (medians reported: the throughput of a virtual machine's disk varies from run to run); the
  backup both into a repository on the disk's own device (which then also writes what is
  stored) and, where /dev/shm has room, into one in memory (as on another device: the disk's
  device only reads, as for the raw reads).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import blocktrail
from bench.measure import count, count_or_none
from bench.peers import Restic
from bench.workload import apply_to_file, du_bytes, scattered_changes, write_image
from blocktrail.disk import Disk
from blocktrail.disk.importer import import_raw

GiB, MiB = 1 << 30, 1 << 20
BT = [sys.executable, "-m", "blocktrail.cli.main"]
PASSWORD = "bench"


def bt_env() -> dict[str, str]:
    """The environment of every blocktrail command: the repository's password."""
    return {**os.environ, "BLOCKTRAIL_PASSWORD": PASSWORD}


@dataclass
class Row:
    name: str
    ours: float
    peer: float
    unit: str
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.ours / self.peer if self.peer else float("nan")


def _drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def _run(cmd: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=env if env is not None else bt_env())
    return time.perf_counter() - start


def _best(cmd: list[str], times: int = 5, env: dict[str, str] | None = None) -> float:
    return min(_run(cmd, env) for _ in range(times))


IN_OPEN = 0x20


def _until_open(cmd: list[str], path: str) -> float:
    """Seconds from launching ``cmd`` to its first open of ``path`` (inotify: the command runs
    as it always does); the command must open it."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_CLOEXEC)
    if fd < 0 or libc.inotify_add_watch(fd, os.fsencode(path), IN_OPEN) < 0:
        raise OSError(ctypes.get_errno(), f"inotify on {path}")
    try:
        start = time.perf_counter()
        with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=bt_env()) as proc:
            ready, _, _ = select.select([fd], [], [], 60)
            opened = time.perf_counter()
            if proc.wait() != 0 or not ready:
                raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}, "
                                   f"{'opened' if ready else 'never opened'} {path}")
        return opened - start
    finally:
        os.close(fd)


def startup(repo: str, backup_start: float) -> list[Row]:
    python = _best([sys.executable, "-c", "pass"], env=dict(os.environ))
    restic = (_best(["restic", "version"], env=dict(os.environ)) if shutil.which("restic")
              else float("nan"))
    help_s = _best([*BT, "--help"])
    points = _best([*BT, "points", repo])
    points_start = min(_until_open([*BT, "points", repo], os.path.join(repo, "config.json"))
                       for _ in range(5))
    return [Row("blocktrail --help (ms)", help_s * 1000, python * 1000, "ms",
                "peer: python -c pass (the interpreter's own start-up)"),
            Row("blocktrail points REPO (ms)", points * 1000, restic * 1000, "ms",
                "peer: restic version"),
            Row("blocktrail points REPO: start-up (ms)", points_start * 1000, python * 1000,
                "ms", "until it opens the repository (best of 5; its key derivation follows); "
                "peer: python -c pass"),
            Row("incremental backup of a 1% change: start-up (ms)", backup_start * 1000,
                python * 1000, "ms", "until it opens the repository (best of 3, after "
                "the incrementals below); peer: python -c pass")]


def incremental(work: str, image: str, size: int, rounds: int
                ) -> tuple[list[Row], str, float]:
    """``rounds`` incrementals, each of a new 1% change, by both (restic's copy of the image
    gets the same changes); -> (rows, our repository, the start-up of ours: best of three
    more, with nothing changed)."""
    disk_dir, repo = os.path.join(work, "disk"), os.path.join(work, "repo")
    import_raw(image, disk_dir).close()
    subprocess.run([*BT, "repo", "init", repo], check=True, stdout=subprocess.DEVNULL,
                   env=bt_env())
    command = [*BT, "backup", disk_dir, "--repo", repo]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=bt_env())
    restic = Restic(os.path.join(work, "restic-repo")) if shutil.which("restic") else None
    copy = os.path.join(work, "restic-disk.raw")
    if restic is not None:
        shutil.copyfile(image, copy)
        restic.init()
        restic.backup(copy, "full")
    ours, peers = [], []
    for round_ in range(rounds):
        changes = _change(disk_dir, size, seed=11 + round_)
        ours.append(_run(command))
        if restic is not None:
            apply_to_file(copy, changes)
            os.sync()
            peers.append(restic.backup(copy, f"incr-{round_}").seconds)
    start = min(_until_open(command, os.path.join(repo, "config.json")) for _ in range(3))
    unaudited = []  # the same command without its audit: what the audit's reads cost
    for round_ in range(rounds):
        _change(disk_dir, size, seed=911 + round_)
        unaudited.append(_run([*command, "--audit-sample", "0"]))
    if restic is not None:
        each = ", ".join(f"{o:.2f}/{p:.2f}" for o, p in zip(ours, peers, strict=True))
        peer, missing = statistics.median(peers), ""
    else:  # our times alone, and why the peer's are missing
        each = ", ".join(f"{o:.2f}" for o in ours)
        peer, missing = float("nan"), " (not run: no restic; apt-get install restic)"
    return [Row("incremental backup of a 1% change, whole command (s)",
                statistics.median(ours), peer, "s",
                f"median of {rounds} (each: {each}); {len(changes)} scattered 64 KiB blocks of "
                f"{size / GiB:g} GiB each; peer: restic backup{missing}"),
            Row("the same, without the audit (--audit-sample 0), whole command (s)",
                statistics.median(unaudited), peer, "s",
                f"median of {rounds} (each: {', '.join(f'{u:.2f}' for u in unaudited)}), "
                "each of a new change; the audit re-reads 1% of the unchanged chunks from the "
                "disk and from the repository")], repo, start


def _change(disk_dir: str, size: int, *, seed: int) -> list[tuple[int, bytes]]:
    """Write a new 1% change (scattered 64 KiB blocks) to the disk, and write it back, so that
    the command timed next does not wait behind that writeback; -> the change."""
    changes = scattered_changes(size, 0.01, seed=seed)
    with Disk.open(disk_dir) as disk:
        for offset, data in changes:
            disk.pwrite(data, offset)
    os.sync()
    return changes


def with_history(work: str, repo: str, size: int, rounds: int, points: int, disks: int,
                 without: float) -> Row:
    """The incremental again, once the repository also holds ``points`` restore points of
    ``disks`` other (small) disks, written after the disk's last backup (the first backup
    after them is not timed: it makes the disk's point the newest again): what a repository's
    history costs the command (its base choice, its index). ``without``: the command's median
    before (the peer)."""
    from blocktrail.repo import Repository

    disk_dir = os.path.join(work, "disk")
    command = [*BT, "backup", disk_dir, "--repo", repo]
    with Repository.open(repo, password=PASSWORD.encode()) as opened:
        chunk = opened.chunk_size
        for n in range(points):
            writer = opened.begin(f"other-{n % disks:04d}", 2 * chunk, None, reload=False)
            writer.put_chunk(0, n.to_bytes(8, "little") * (chunk // 8))
            writer.commit(kind="full", change_id=None)
    times = []
    for round_ in range(rounds + 1):  # the first makes the disk's point the newest again
        _change(disk_dir, size, seed=101 + round_)
        times.append(_run(command))
    each = ", ".join(f"{t:.2f}" for t in times[1:])
    return Row(f"incremental backup of a 1% change, whole command, the repository also "
               f"holding {points} points of {disks} other disks (s)",
               statistics.median(times[1:]), without, "s",
               f"median of {rounds} (each: {each}); peer: the same command before they were "
               "added (the median above)")


def full_vs_raw_read(work: str, image: str, size: int, pairs: int) -> list[Row]:
    """``pairs`` rounds of two raw reads (through the page cache, ``cat``, and past it, ``dd
    iflag=direct``, as the backup reads) and a full backup into a new repository, in turn
    (the virtual disks these run on vary from one second to the next): the medians, and each
    round."""
    disk_dir = os.path.join(work, "full-disk")
    import_raw(image, disk_dir).close()
    layer = max((os.path.join(disk_dir, n) for n in os.listdir(disk_dir)
                 if n.endswith(".img")), key=os.path.getsize)
    reads = {"cat": ["sh", "-c", f"cat {layer} > /dev/null"],
             "dd iflag=direct": ["dd", f"if={layer}", "of=/dev/null", "bs=4M", "iflag=direct",
                                 "status=none"]}
    raws: dict[str, list[float]] = {name: [] for name in reads}
    ours, floors, in_memory = [], [], []
    memory = _memory_directory(size)
    for pair in range(pairs):
        repo = os.path.join(work, f"full-repo-{pair}")
        subprocess.run([*BT, "repo", "init", repo], check=True, stdout=subprocess.DEVNULL,
                       env=bt_env())
        for name, cmd in reads.items():
            _drop_caches()
            raws[name].append(_run(cmd))
        _drop_caches()
        ours.append(_run([*BT, "backup", disk_dir, "--repo", repo]))
        stored = du_bytes(repo)
        shutil.rmtree(repo)
        floors.append(_read_and_write(layer, os.path.join(work, "written.raw"), stored))
        if memory is not None:
            in_memory.append(_backup_into_memory(disk_dir, memory))
    our = statistics.median(ours)
    raw_medians = {name: statistics.median(times) for name, times in raws.items()}
    rows = []
    if in_memory:
        mem = statistics.median(in_memory)
        each = ", ".join(f"{m:.2f}" for m in in_memory)
        for name, raw in raw_medians.items():
            rows.append(Row(f"full backup into a repository in memory vs raw read ({name}) "
                            "(MiB/s)", size / MiB / mem, size / MiB / raw, "MiB/s",
                            f"median of {pairs}: {mem:.2f} s vs {raw:.2f} s (each: {each}); "
                            f"the repository in {memory} (tmpfs), as on another device: the "
                            "disk's device only reads, as for the raw read"))
    for name, times in raws.items():
        raw = raw_medians[name]
        each = ", ".join(f"{o:.2f}/{r:.2f}" for o, r in zip(ours, times, strict=True))
        rows.append(Row(f"full backup vs raw read ({name}) of the disk file (MiB/s)",
                        size / MiB / our, size / MiB / raw, "MiB/s",
                        f"median of {pairs}: {our:.2f} s vs {raw:.2f} s (each round: {each}); "
                        "caches dropped before each; higher is better"))
    floor = statistics.median(floors)
    rows.append(Row("full backup vs the device's floor: the raw read and a raw write of what "
                    "the backup stored, at once (MiB/s)", size / MiB / our, size / MiB / floor,
                    "MiB/s", f"median of {pairs}: {our:.2f} s vs {floor:.2f} s (each: "
                    f"{', '.join(f'{f:.2f}' for f in floors)}); the repository shares the "
                    "disk's device, so no backup into it beats this"))
    return rows


def _memory_directory(size: int) -> str | None:
    """/dev/shm when it is a tmpfs with room for a repository of a disk of ``size`` bytes
    (and some to spare); else None."""
    try:
        found = os.statvfs("/dev/shm")
    except OSError:
        return None
    return "/dev/shm" if found.f_bavail * found.f_frsize > 2 * size else None


def _backup_into_memory(disk_dir: str, memory: str) -> float:
    """Seconds of a full backup of ``disk_dir`` into a new repository in ``memory``, caches
    dropped first (the repository is removed after)."""
    repo = tempfile.mkdtemp(prefix="bt-bench-repo-", dir=memory)
    os.rmdir(repo)  # a repository is made in a new directory
    try:
        subprocess.run([*BT, "repo", "init", repo], check=True, stdout=subprocess.DEVNULL,
                       env=bt_env())
        _drop_caches()
        return _run([*BT, "backup", disk_dir, "--repo", repo])
    finally:
        shutil.rmtree(repo, ignore_errors=True)


def _read_and_write(layer: str, target: str, count: int) -> float:
    """Seconds for ``dd iflag=direct`` of ``layer`` and ``dd oflag=direct`` of ``count`` bytes
    into ``target`` (on the repository's file system) at once, caches dropped first: what the
    device allows a backup that reads the disk and writes its repository beside it."""
    _drop_caches()
    blocks = max(1, -(-count // (4 * MiB)))
    start = time.perf_counter()
    procs = [subprocess.Popen(["dd", f"if={layer}", "of=/dev/null", "bs=4M", "iflag=direct",
                               "status=none"]),
             subprocess.Popen(["dd", "if=/dev/zero", f"of={target}", "bs=4M",
                               f"count={blocks}", "oflag=direct", "status=none"])]
    for proc in procs:
        if proc.wait() != 0:
            raise RuntimeError(f"{proc.args!r} failed")
    seconds = time.perf_counter() - start
    os.unlink(target)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-gib", type=float, default=4)
    parser.add_argument("--incrementals", type=count, default=3, metavar="N",
                        help="incremental backups by both, each of a new change (median)")
    parser.add_argument("--full-pairs", type=count, default=3, metavar="N",
                        help="raw reads and full backups, in turn (medians reported)")
    parser.add_argument("--history", type=count_or_none, default=0, metavar="N",
                        help="then N restore points of N/20 other disks in the repository, "
                             "and the incrementals again (default 0: not run; each point "
                             "takes a commit with its fsyncs)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    size = int(args.size_gib * GiB)
    # As ./run does: the sources byte-compiled, so no command compiles its modules first.
    subprocess.run([sys.executable, "-m", "compileall", "-q",
                    os.path.dirname(blocktrail.__file__)], check=True,
                   stdout=subprocess.DEVNULL)
    work = tempfile.mkdtemp(prefix="bt-cli-bench-", dir=os.environ.get("BENCH_DIR", "/var/tmp"))
    try:
        image = os.path.join(work, "img.raw")
        write_image(image, size)
        inc_rows, repo, backup_start = incremental(work, image, size, args.incrementals)
        rows = startup(repo, backup_start) + inc_rows
        if args.history > 0:
            rows.append(with_history(work, repo, size, args.incrementals, args.history,
                                     max(1, args.history // 20), inc_rows[0].ours))
        rows += full_vs_raw_read(work, image, size, args.full_pairs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps([{**asdict(r), "ratio": r.ratio} for r in rows], indent=2))
        return 0
    width = max(len(r.name) for r in rows)
    print(f"{'':<{width}}  {'ours':>10} {'peer':>10} {'ratio':>7}")
    for r in rows:
        print(f"{r.name:<{width}}  {r.ours:>10.2f} {r.peer:>10.2f} {r.ratio:>7.3f}  {r.note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
