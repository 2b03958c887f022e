"""A worker killed with SIGKILL in the middle of a job: the next run completes (it removes the
snapshot the killed run left on the host, takes over the disk's lease in the repository at once:
its holder is a gone process of this machine), and the repository checks clean, every byte read
back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hostproc import cli_json, require_tools, running_host

pytestmark = pytest.mark.interop


def _job_snapshots(api: str, disk: str) -> list[str]:
    return [s["name"] for s in cli_json("snapshot", "list", disk, "--host", api)
            if s["name"].startswith("blocktrail-job-")]


def test_a_killed_job_leaves_nothing_the_next_run_cannot_finish(tmp_path: Path) -> None:
    require_tools("qemu-io")
    repo = tmp_path / "repo"
    with running_host(tmp_path) as (api, nbd):
        cli_json("disk", "create", "d0", "--size", "16M", "--host", api)
        cli_json("repo", "init", str(repo))
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5c 0 16M",
                        f"nbd+unix:///d0?socket={nbd}"], check=True, capture_output=True)
        jobs = tmp_path / "jobs.toml"
        base = (f'[[job]]\nname = "j"\nhost = "{api}"\ndisks = ["d0"]\n'
                f'repository = "{repo}"\nevery = "1h"\nverify_every = "1h"\n')
        jobs.write_text(base + 'bandwidth = "4M"\n')  # about 4 s to read: time to kill it
        proc = subprocess.Popen([sys.executable, "-m", "blocktrail.cli.main", "worker",
                                 "--config", str(jobs), "--once"], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not _job_snapshots(api, "d0"):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1.0)  # in the middle of reading
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert _job_snapshots(api, "d0")  # left behind by the killed run
        assert cli_json("points", str(repo)) == []  # nothing half-published

        jobs.write_text(base)
        done = subprocess.run([sys.executable, "-m", "blocktrail.cli.main", "worker",
                               "--config", str(jobs), "--once", "--json"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert _job_snapshots(api, "d0") == []
        points = cli_json("points", str(repo))
        assert [(p["kind"], p["verify_state"]) for p in points] == [("full", "ok")]
        check = cli_json("check", str(repo), "--read-data")
        assert check["ok"], check
        restored = tmp_path / "d0.raw"
        cli_json("restore", str(repo), points[0]["id"], "--to", str(restored))
        assert restored.read_bytes() == b"\x5c" * (16 << 20)
