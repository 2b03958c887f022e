"""Backups of a disk on our host daemon (HostDiskSource: snapshots through the control API, data
and changed areas over NBD), with the guest's writes made by qemu-io through the NBD export."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from blocktrail.cli.main import main
from hostproc import cli_in_process, require_tools, running_host

pytestmark = pytest.mark.interop
MiB = 1 << 20
CHUNK = 64 << 10


@pytest.fixture
def host(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    require_tools("qemu-io", "qemu-img")
    with running_host(tmp_path) as endpoints:
        yield endpoints


cli = cli_in_process


def qemu_io(nbd: Path, *commands: str) -> None:
    args = ["qemu-io", "-f", "raw"]
    for command in commands:
        args += ["-c", command]
    subprocess.run([*args, f"nbd+unix:///disk0?socket={nbd}"], check=True, capture_output=True,
                   timeout=60)


def test_full_incremental_restore_and_reset(host: tuple[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    api, nbd = host
    repo = str(tmp_path / "repo")
    cli(capsys, "repo", "init", repo)
    cli(capsys, "disk", "create", "disk0", "--size", "32M", "--host", api)
    qemu_io(nbd, "write -P 0x11 0 3M", "write -P 0x12 16M 1M")
    full = cli(capsys, "backup", "disk0", "--host", api, "--repo", repo)
    assert full["kind"] == "full" and full["bytes_read"] == 4 * MiB
    qemu_io(nbd, "write -P 0x22 8M 192k", "write -z 0 64k", "discard 16M 128k")
    inc = cli(capsys, "backup", "disk0", "--host", api, "--repo", repo)
    assert inc["kind"] == "incremental" and inc["fallback_reason"] is None
    assert inc["bytes_read"] == (192 << 10) + CHUNK + (128 << 10)
    # the incremental restores to exactly what a snapshot taken now holds (nothing was written)
    cli(capsys, "snapshot", "create", "disk0", "check", "--host", api)
    restored = tmp_path / "restored.raw"
    cli(capsys, "restore", repo, inc["point"]["id"], "--to", str(restored))  # type: ignore[index]
    compare = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(restored),
                              f"nbd+unix:///disk0@check?socket={nbd}"], capture_output=True,
                             text=True, timeout=60)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    verdict = cli(capsys, "verify", repo, inc["point"]["id"], "--against",  # type: ignore[index]
                  "disk0@check", "--host", api)
    assert verdict["identical"]
    snapshots = cli(capsys, "disk", "info", "disk0", "--host", api)["snapshots"]
    assert [s["name"] for s in snapshots] == ["check"]  # type: ignore[union-attr,index]
    # a reset makes every earlier change ID stale: the next backup is full, with the reason
    cli(capsys, "cbt", "reset", "disk0", "--host", api)
    qemu_io(nbd, "write -P 0x33 20M 64k")
    after = cli(capsys, "backup", "disk0", "--host", api, "--repo", repo)
    assert after["kind"] == "full"
    reason = str(after["fallback_reason"])
    assert "refused" in reason and "earlier tracking epoch" in reason and "reset" in reason


def test_an_nbd_uri_of_the_hosts_snapshot_export_with_its_change_id(
        host: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Our own export read as "any NBD export": the dirty context of NAME@SNAPSHOT is the
    change ID's, so --bitmap CHANGE_ID gives the same incremental the host source does."""
    api, nbd = host
    repo = str(tmp_path / "repo")
    cli(capsys, "repo", "init", repo)
    cli(capsys, "disk", "create", "disk0", "--size", "16M", "--host", api)
    qemu_io(nbd, "write -P 0x11 0 2M")
    first = str(cli(capsys, "snapshot", "create", "disk0", "s1", "--host", api)["change_id"])
    qemu_io(nbd, "write -P 0x22 4M 128k")
    cli(capsys, "snapshot", "create", "disk0", "s2", "--host", api)
    s1, s2 = (f"nbd+unix:///disk0@{s}?socket={nbd}" for s in ("s1", "s2"))
    full = cli(capsys, "backup", s1, "--repo", repo, "--disk-id", "disk0", "--bitmap", first)
    assert full["point"]["change_id"] == f"qemu:dirty-bitmap:{first}"  # type: ignore[index]
    inc = cli(capsys, "backup", s2, "--repo", repo, "--disk-id", "disk0", "--bitmap", first)
    assert inc["kind"] == "incremental" and inc["bytes_read"] == 128 << 10
    point = inc["point"]["id"]  # type: ignore[index]
    code = main(["verify", repo, point, "--against", s2])  # the URI is another disk ID
    assert code == 2 and "give verify the same --disk-id" in capsys.readouterr().err
    verdict = cli(capsys, "verify", repo, point, "--against", s2, "--disk-id", "disk0")
    assert verdict["identical"]
    code = main(["backup", "disk0", "--repo", repo, "--bitmap", "bm0"])
    assert code == 2 and "--bitmap and --disk-id are for NBD URIs" in capsys.readouterr().err
