"""The daemon as a real process, driven by the CLI's --host over a 0600 unix socket."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blocktrail.disk import Disk
from hostproc import running_host


@pytest.fixture
def host(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    with running_host(tmp_path, nbd=False) as (api, _):
        yield api, tmp_path / "data"


def cli(*args: str) -> tuple[int, object]:
    out = subprocess.run([sys.executable, "-m", "blocktrail.cli.main", *args, "--json"],
                         capture_output=True, text=True, timeout=60)
    return out.returncode, json.loads(out.stdout) if out.stdout.strip() else out.stderr


def test_cli_through_host(host: tuple[str, Path]) -> None:
    endpoint, data = host
    sock = endpoint.removeprefix("unix:")
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    code, info = cli("disk", "create", "disk0", "--size", "8M", "--host", endpoint)
    assert code == 0, info
    start = info["current_change_id"]  # type: ignore[index]
    code, snap = cli("snapshot", "create", "disk0", "s1", "--host", endpoint)
    assert code == 0 and snap["name"] == "s1"  # type: ignore[index]
    code, snaps = cli("snapshot", "list", "disk0", "--host", endpoint)
    assert [s["name"] for s in snaps] == ["s1"]  # type: ignore[union-attr,index]
    assert set(snaps[0]) >= {"name", "change_id", "created_at"}  # type: ignore[index]
    code, areas = cli("cbt", "query", "disk0", "--since", start, "--snapshot", "s1",
                      "--host", endpoint)
    assert code == 0 and areas["changed_areas"] == []  # type: ignore[index]
    code, err = cli("cbt", "query", "disk0", "--since", "nonsense", "--host", endpoint)
    assert code == 4 and err["error"] == "InvalidChangeId"  # type: ignore[index]
    code, _ = cli("snapshot", "remove", "disk0", "s1", "--host", endpoint)
    assert code == 0
    code, err = cli("disk", "info", "nope", "--host", endpoint)
    assert code == 6
    # while the host owns the disk, nobody else can open it
    code, err = cli("disk", "info", str(data / "disk0"))
    assert code == 7 and err["error"] == "DiskBusy"  # type: ignore[index]


def test_host_closes_disks_cleanly(host: tuple[str, Path]) -> None:
    endpoint, data = host
    assert cli("disk", "create", "d1", "--size", "1M", "--host", endpoint)[0] == 0
    proc_disk = data / "d1"
    assert json.loads((proc_disk / "disk.json").read_text())["state"] == "open"


def test_closed_after_sigterm(tmp_path: Path) -> None:
    sock, data = tmp_path / "api.sock", tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "-m", "blocktrail.cli.main", "host", "--data",
                             str(data), "--api", f"unix:{sock}"])
    while not sock.exists():
        time.sleep(0.05)
    time.sleep(0.2)
    assert cli("disk", "create", "d1", "--size", "1M", "--host", f"unix:{sock}")[0] == 0
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert json.loads((data / "d1" / "disk.json").read_text())["state"] == "closed"
    with Disk.open(data / "d1") as disk:
        assert disk.size_bytes == 1 << 20
