"""Two workers never back up one disk into one repository at once: the first holds the disk's
lease in the repository from its snapshot to its retention, and the second (another job file,
another state file) is refused with RepositoryBusy before it takes a snapshot; once the first
is done, the second's retry completes (incrementally, from the first's point). On a local
directory and on S3 (SeaweedFS, the job file's endpoint and region keys)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from blocktrail.errors import ExitCode
from hostproc import cli_json, require_tools, running_host

pytestmark = pytest.mark.interop


def _job_snapshots(api: str, disk: str) -> list[str]:
    return [s["name"] for s in cli_json("snapshot", "list", disk, "--host", api)
            if s["name"].startswith("blocktrail-job-")]


def _events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_two_workers_never_back_up_one_disk_at_once(kind: str, tmp_path: Path,
                                                   request: pytest.FixtureRequest) -> None:
    require_tools("qemu-io")
    env = check_env = {**os.environ}
    s3_keys = ""
    if kind == "s3":
        server = request.getfixturevalue("s3_server")
        repo = server.new_url("two-workers")
        env = server.env(BLOCKTRAIL_LEASE_SECONDS="8")
        check_env = {**env}
        del env["AWS_ENDPOINT_URL"], env["AWS_REGION"]  # from the job file instead
        s3_keys = f'endpoint = "{server.endpoint}"\nregion = "us-east-1"\n'
        init = ["repo", "init", repo, "--endpoint", server.endpoint]
    else:
        repo = str(tmp_path / "repo")
        init = ["repo", "init", repo]
    assert subprocess.run([sys.executable, "-m", "blocktrail.cli.main", *init], env=env,
                          capture_output=True).returncode == 0

    def worker(name: str, extra: str = "") -> list[str]:
        jobs = tmp_path / f"{name}.toml"
        jobs.write_text(f'[[job]]\nname = "{name}"\nhost = "{api}"\ndisks = ["d0"]\n'
                        f'repository = "{repo}"\nevery = "1h"\n{s3_keys}{extra}')
        return [sys.executable, "-m", "blocktrail.cli.main", "worker", "--config", str(jobs),
                "--once", "--json"]

    with running_host(tmp_path) as (api, nbd):
        cli_json("disk", "create", "d0", "--size", "16M", "--host", api)
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x3a 0 16M",
                        f"nbd+unix:///d0?socket={nbd}"], check=True, capture_output=True)
        slow = subprocess.Popen(worker("first", 'bandwidth = "1M"\n'), env=env,  # ~16 s: the
                                # second worker's start and refusal fit in, on a loaded machine
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not _job_snapshots(api, "d0"):
            assert slow.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        second_worker = worker("second", 'retry_backoff = "1s"\n')
        refused = subprocess.run(second_worker, env=env, capture_output=True, text=True, timeout=60)
        assert slow.poll() is None, "the first run ended before the second was refused"
        assert len(_job_snapshots(api, "d0")) == 1  # the second took no snapshot
        out, err = slow.communicate(timeout=120)
        assert slow.returncode == 0, out + err
        time.sleep(1.0)  # its backoff: then the failed run is due again
        again = subprocess.run(second_worker, env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stdout + again.stderr
        assert _job_snapshots(api, "d0") == []

    assert refused.returncode == ExitCode.BUSY, refused.stdout + refused.stderr
    (failed,) = [e for e in _events(refused.stdout) if e["event"] == "failed"]
    assert failed["error"] == "RepositoryBusy" and "back up disk" in failed["message"]
    (first,) = [e for e in _events(out) if e["event"] == "succeeded"]
    (second,) = [e for e in _events(again.stdout) if e["event"] == "succeeded"]
    assert first["disks"][0]["kind"] == "full"
    assert second["disks"][0]["kind"] == "incremental"  # from the first worker's point
    check = subprocess.run([sys.executable, "-m", "blocktrail.cli.main", "check", repo,
                            "--read-data", "--json"], env=check_env, capture_output=True,
                           text=True, timeout=120)
    assert json.loads(check.stdout)["ok"], check.stdout + check.stderr
