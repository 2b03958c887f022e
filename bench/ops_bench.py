"""What operating costs: the worker's CPU time while its host is idle, and the host's /metrics
scrape time with 100 disks and 10,000 restore points.

    .venv/bin/python -m bench.ops_bench [--idle-seconds 60] [--json]

1. A host with one disk, a worker with one job on it (every hour) serving its /metrics (not
   scraped): after the first backup, the worker's CPU seconds (user + system, psutil, in clock
   ticks of 10 ms) over ``--idle-seconds``, scaled to a minute.
2. A host with 100 disks and a repository with 100 restore points of each (10,000 manifests,
   written by the repository's own writer), started with ``--repo``: the time of a cold scrape
   (every manifest read) and the median of 20 warm ones, over a unix socket.
(The console's page load time with 100 disks comes from the browser test: tests/interop/
test_console_browser.py::test_console_page_load_with_100_disks, run with -s.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from blocktrail.host.registry import DiskRegistry
from blocktrail.repo import Encryption, Repository

PASSWORD = "bench"  # the repositories are encrypted, as a user's are by default


def _host(root: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    api = f"unix:{root / 'api.sock'}"
    proc = subprocess.Popen([sys.executable, "-m", "blocktrail.cli.main", "host", "--data",
                             str(root / "data"), "--api", api, "--nbd",
                             f"unix:{root / 'nbd.sock'}", *extra], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (root / "api.sock").exists() or not (root / "nbd.sock").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the host did not start")
        time.sleep(0.05)
    time.sleep(0.3)
    return proc, api


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "blocktrail.cli.main", *args], check=True,
                   capture_output=True)


def idle_worker_cpu(root: Path, seconds: float) -> dict[str, float]:
    host, api = _host(root)
    try:
        _cli("disk", "create", "d0", "--size", "64M", "--host", api)
        _cli("repo", "init", str(root / "repo"))
        jobs = root / "jobs.toml"
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        jobs.write_text(f'[worker]\nmetrics = "127.0.0.1:{port}"\n\n'
                        f'[[job]]\nname = "j"\nhost = "{api}"\ndisks = ["d0"]\n'
                        f'repository = "{root / "repo"}"\nevery = "1h"\n')
        worker = subprocess.Popen([sys.executable, "-m", "blocktrail.cli.main", "worker",
                                   "--config", str(jobs), "--json"], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL)
        assert worker.stdout is not None
        for raw in worker.stdout:  # wait for the first run to end
            if json.loads(raw)["event"] in ("succeeded", "failed"):
                break
        proc = psutil.Process(worker.pid)
        before = proc.cpu_times()
        time.sleep(seconds)
        after = proc.cpu_times()
        worker.terminate()
        worker.wait(timeout=60)
    finally:
        host.terminate()
        host.wait(timeout=60)
    used = (after.user - before.user) + (after.system - before.system)
    return {"idle_seconds": seconds, "cpu_seconds": round(used, 4),
            "cpu_seconds_per_minute": round(used * 60 / seconds, 4)}


def scrape_100_disks_10000_points(root: Path) -> dict[str, float]:
    registry = DiskRegistry(str(root / "data"))
    repo = Repository.init(root / "repo", encryption=Encryption(PASSWORD))
    try:
        for i in range(100):
            disk = registry.create(f"disk{i:03d}", 1 << 20, 65536)
            for n in range(100):
                writer = repo.begin(disk.disk_id, disk.size_bytes, parent=None)
                writer.commit(kind="full" if n == 0 else "incremental",
                              change_id=f"{disk.current_change_id}",
                              fallback_reason="no earlier verified restore point of this disk"
                              if n == 0 else None, stats={"bytes_stored": 1000 + n})
    finally:
        repo.close()
        registry.close()
    host, api = _host(root, "--repo", str(root / "repo"))
    try:
        client = httpx.Client(transport=httpx.HTTPTransport(uds=api.removeprefix("unix:")),
                              base_url="http://host", timeout=120)
        started = time.perf_counter()
        first = client.get("/metrics")
        cold = time.perf_counter() - started
        warm = []
        for _ in range(20):
            started = time.perf_counter()
            client.get("/metrics").raise_for_status()
            warm.append(time.perf_counter() - started)
        series = sum(1 for line in first.text.splitlines() if line and line[0] != "#")
    finally:
        host.terminate()
        host.wait(timeout=60)
    return {"cold_scrape_s": round(cold, 3), "warm_scrape_median_s":
            round(statistics.median(warm), 4), "warm_scrape_max_s": round(max(warm), 4),
            "series": series, "bytes": len(first.content)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ["BLOCKTRAIL_PASSWORD"] = PASSWORD  # every command, the host and the worker
    base = Path(tempfile.mkdtemp(prefix="ops-bench-", dir=os.environ.get("BENCH_DIR",
                                                                         "/var/tmp")))
    try:
        (base / "idle").mkdir()
        (base / "scrape").mkdir()
        results = {"idle_worker": idle_worker_cpu(base / "idle", args.idle_seconds),
                   "metrics_scrape": scrape_100_disks_10000_points(base / "scrape")}
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    idle, scrape = results["idle_worker"], results["metrics_scrape"]
    per_minute = idle["cpu_seconds_per_minute"]
    shown = f"{per_minute}" if idle["cpu_seconds"] else \
        f"< {0.01 * 60 / idle['idle_seconds']:.3f} (no 10 ms clock tick used)"
    print(f"worker, one idle host: {shown} CPU s per minute "
          f"({idle['cpu_seconds']} s over {idle['idle_seconds']} s)")
    print(f"/metrics, 100 disks and 10,000 points: cold {scrape['cold_scrape_s']} s, warm "
          f"median {scrape['warm_scrape_median_s']} s (max {scrape['warm_scrape_max_s']} s), "
          f"{scrape['series']} series, {scrape['bytes']} bytes")


if __name__ == "__main__":
    main()
