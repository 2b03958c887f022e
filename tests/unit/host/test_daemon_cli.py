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
from blocktrail.host.client import HostClient
from hostproc import free_tcp_port, running_host


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
    code, err = cli("disk", "info", str(data / "disks" / "disk0"))
    assert code == 7 and err["error"] == "DiskBusy"  # type: ignore[index]


def test_host_closes_disks_cleanly(host: tuple[str, Path]) -> None:
    endpoint, data = host
    assert cli("disk", "create", "d1", "--size", "1M", "--host", endpoint)[0] == 0
    proc_disk = data / "disks" / "d1"
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
    assert json.loads((data / "disks" / "d1" / "disk.json").read_text())["state"] == "closed"
    with Disk.open(data / "disks" / "d1") as disk:
        assert disk.size_bytes == 1 << 20


def test_a_second_host_on_the_same_data_is_refused_before_it_binds(tmp_path: Path) -> None:
    with running_host(tmp_path) as (api, nbd):
        holder = json.loads((tmp_path / "data" / "host.lock").read_text())
        os.kill(holder["pid"], 0)  # the first host, alive
        for second_api, second_nbd in ((tmp_path / "api2.sock", tmp_path / "nbd2.sock"),
                                       (Path(api.removeprefix("unix:")), nbd)):
            second = subprocess.run(
                [sys.executable, "-m", "blocktrail.cli.main", "host", "--data",
                 str(tmp_path / "data"), "--api", f"unix:{second_api}", "--nbd",
                 f"unix:{second_nbd}"], capture_output=True, text=True, timeout=60)
            assert second.returncode == 7, second.stderr
            assert "Traceback" not in second.stderr
            assert f"is served by another blocktrail host (pid {holder['pid']}, API {api}, " \
                   f"since {holder['since']})" in second.stderr
        assert not (tmp_path / "api2.sock").exists() and not (tmp_path / "nbd2.sock").exists()
        code, _ = cli("disk", "create", "d0", "--size", "1M", "--host", api)  # still served
        assert code == 0


def test_disks_named_like_the_hosts_files_with_a_tcp_api(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    names = ("api-token", "lock", "x.tmp", "host.lock", "host.json", "disks", "vms.json")
    for _ in range(2):  # and the host starts again with them
        api = f"tcp:127.0.0.1:{free_tcp_port()}"
        with running_host(tmp_path, api=api, nbd=False):
            url = "http://" + api.removeprefix("tcp:")
            token = (tmp_path / "data" / "api-token").read_text().strip()
            monkeypatch.setenv("BLOCKTRAIL_TOKEN", token)
            client = HostClient(url, token)
            try:
                there = {d["name"] for d in client.call("GET", "/disks")}
                for name in sorted(set(names) - there):
                    client.call("POST", "/disks", json={"name": name, "size_bytes": 1 << 20})
                assert sorted(d["name"] for d in client.call("GET", "/disks")) == sorted(names)
            finally:
                client.close()
            code, listed = cli("disk", "info", "api-token", "--host", url)
            assert code == 0 and listed["name"] == "api-token"  # type: ignore[index]
            monkeypatch.delenv("BLOCKTRAIL_TOKEN")
            code, err = cli("disk", "info", "lock", "--host", url)
            assert code == 9, err  # no token: unauthorized
    assert sorted(p.name for p in (tmp_path / "data" / "disks").iterdir()) == sorted(names)


def test_a_version_1_data_directory_is_upgraded_at_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    before = {}
    for name in ("d0", "api-token"):
        with Disk.create(data / name, 1 << 20, 4096) as disk:
            disk.pwrite(b"x" * 4096, 0)
            disk.create_snapshot("s1")
            before[name] = disk.current_change_id
    with running_host(tmp_path, nbd=False) as (api, _):
        for name, change_id in before.items():
            code, info = cli("disk", "info", name, "--host", api)
            assert code == 0, info
            assert info["current_change_id"] == change_id  # type: ignore[index]
            assert len(info["epochs"]) == 1  # type: ignore[index]
    assert json.loads((data / "host.json").read_text())["version"] == 2
    assert sorted(p.name for p in (data / "disks").iterdir()) == ["api-token", "d0"]
