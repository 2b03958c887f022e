"""`blocktrail worker` against a real host while qemu-io writes over NBD: incremental jobs on
schedule, the metrics scraped and parsed with Prometheus' own text parser, and a webhook (a
local HTTP server) told of the failure of a job whose repository became unreachable."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hostproc import cli_json, free_tcp_port, require_tools, running_host

pytestmark = pytest.mark.interop


class Hook:
    """A webhook receiver on 127.0.0.1: the JSON bodies it was sent."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        received = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    receiver = Hook()
    yield receiver
    receiver.close()


def qemu_write(nbd: Path, disk: str, pattern: int, offset: int, length: int) -> None:
    subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} {length}",
                    f"nbd+unix:///{disk}?socket={nbd}"], check=True, capture_output=True,
                   timeout=60)


def scrape(port: int) -> dict[str, list[Any]]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list[Any]], name: str, **labels: str) -> float:
    found = [s.value for s in samples.get(name, [])
             if all(s.labels.get(k) == v for k, v in labels.items())]
    assert found, (name, labels, sorted(samples))
    return float(sum(found))


def until(condition: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_scheduled_incrementals_metrics_and_a_failure_webhook(tmp_path: Path,
                                                              hook: Hook) -> None:
    require_tools("qemu-io")
    repo, broken = tmp_path / "repo", tmp_path / "gone"
    port = free_tcp_port()
    with running_host(tmp_path) as (api, nbd):
        for disk in ("d0", "d1"):
            cli_json("disk", "create", disk, "--size", "4M", "--host", api)
        cli_json("repo", "init", str(repo))
        cli_json("repo", "init", str(broken))
        qemu_write(nbd, "d0", 0x11, 0, 1 << 20)
        jobs = tmp_path / "jobs.toml"
        jobs.write_text(f"""
[worker]
max_jobs = 2
metrics = "127.0.0.1:{port}"

[[job]]
name = "often"
host = "{api}"
disks = ["d0", "d1"]
repository = "{repo}"
every = "2s"
keep = {{ last = 3 }}
audit_sample = 50
verify_every = "1h"
notify = {{ webhook = "{hook.url}" }}

[[job]]
name = "doomed"
host = "{api}"
disks = ["d1"]
repository = "{broken}"
every = "1h"
retries = 1
retry_backoff = "1s"
notify = {{ webhook = "{hook.url}" }}
""")
        broken.rename(tmp_path / "moved-away")  # the doomed job's repository is unreachable
        log = tmp_path / "worker.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "blocktrail.cli.main", "worker",
                                     "--config", str(jobs), "--json"], stdout=out,
                                    stderr=subprocess.STDOUT)
        try:
            until(lambda: (repo / "points").exists() and len(list(
                (repo / "points").glob("*.json"))) >= 2)
            for pattern in (0x22, 0x33):  # the guest keeps writing; the jobs keep up
                qemu_write(nbd, "d0", pattern, 1 << 20, 64 << 10)
                time.sleep(2.5)
            until(lambda: value(scrape(port), "blocktrail_job_backups_total", job="often",
                                disk="d0", kind="incremental") >= 2)
            until(lambda: any(b["event"] == "failure" for b in hook.bodies), timeout=30)
            samples = scrape(port)
        finally:
            proc.terminate()
            assert proc.wait(timeout=60) == 0, log.read_text()
        events = [json.loads(line) for line in log.read_text().splitlines()
                  if line.startswith("{")]
        points = cli_json("points", str(repo))
        check = cli_json("check", str(repo), "--read-data")

    # scheduled incrementals, each verified or audited, retention applied
    d0 = [p for p in points if p["kind"] == "incremental"]
    assert d0, points
    assert len({p["disk_id"] for p in points}) == 2
    assert len(points) <= 2 * 3 + 2  # keep last 3 per disk (+ runs that ended meanwhile)
    assert check["ok"], check
    done = [e for e in events if e["event"] == "succeeded" and e["task"] == "often/d0"]
    assert done[0]["disks"][0]["kind"] == "full" and done[0]["disks"][0]["verify"] == \
        "identical"
    assert any(d["disks"][0]["kind"] == "incremental" for d in done[1:])
    # the metrics, as Prometheus parses them
    assert value(samples, "blocktrail_job_backups_total", job="often", disk="d0",
                 kind="full", full_reason="first") >= 1
    assert value(samples, "blocktrail_job_runs_total", job="often", target="d0",
                 result="success") >= 3
    assert value(samples, "blocktrail_job_last_success_timestamp_seconds", job="often",
                 target="d0") > time.time() - 600
    assert value(samples, "blocktrail_job_read_bytes_total", job="often", disk="d0") >= 1 << 20
    assert value(samples, "blocktrail_job_audit_chunks_total", job="often", disk="d0") > 0
    assert value(samples, "blocktrail_job_audit_mismatches_total", job="often", disk="d0") == 0 \
        if samples.get("blocktrail_job_audit_mismatches_total") else True
    assert value(samples, "blocktrail_job_verifies_total", job="often", disk="d0",
                 result="identical") == 1
    assert value(samples, "blocktrail_repository_restore_points", repository=str(repo)) >= 2
    assert value(samples, "blocktrail_repository_size_bytes", repository=str(repo)) > 0
    assert value(samples, "blocktrail_job_runs_total", job="doomed", target="d1",
                 result="failure") >= 2  # the run and its one retry
    assert value(samples, "blocktrail_worker_notifications_total", event="failure",
                 delivery="sent") >= 1
    # the webhook's body
    failure = next(b for b in hook.bodies if b["event"] == "failure")
    assert failure["job"] == "doomed" and failure["target"] == "d1"
    assert failure["repository"] == str(broken)
    assert "RepositoryNotFound" in failure["message"]
    assert failure["details"]["attempts"] == 2
    assert not [b for b in hook.bodies if b["job"] == "often"]  # nothing wrong there
