"""`blocktrail vm` against a real host: define, list, snapshot every disk at once, remove."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from blocktrail.cli.main import main
from blocktrail.errors import ExitCode
from hostproc import running_host
from s3server import TEST_ENCRYPTION

MiB = 1 << 20


@pytest.fixture
def api(tmp_path: Path) -> Iterator[str]:
    with running_host(tmp_path) as (api, _):
        yield api


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_a_vm_is_snapshotted_and_released_as_one(api: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("web-root", "web-data"):
        assert run(capsys, "disk", "create", name, "--size", "4M", "--host", api)[0] == 0
    code, out = run(capsys, "vm", "define", "web", "web-root", "web-data", "--host", api)
    assert code == 0 and "web-root web-data" in out
    code, out = run(capsys, "vm", "list", "--host", api, "--json")
    assert code == 0 and json.loads(out) == [{"name": "web", "disks": ["web-root", "web-data"]}]
    code, out = run(capsys, "vm", "snapshot", "web", "nightly 1%", "--host", api, "--json")
    assert code == 0
    taken = json.loads(out)["snapshots"]
    assert sorted(taken) == ["web-data", "web-root"]
    for disk in taken:
        code, out = run(capsys, "snapshot", "list", disk, "--host", api, "--json")
        assert [s["name"] for s in json.loads(out)] == ["nightly 1%"]
    assert run(capsys, "vm", "remove-snapshot", "web", "nightly 1%", "--host", api)[0] == 0
    for disk in taken:
        code, out = run(capsys, "snapshot", "list", disk, "--host", api, "--json")
        assert json.loads(out) == []


def test_bad_vm_commands_are_clear_errors(api: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "vm", "list")
    assert code == ExitCode.USAGE and "--host" in out
    code, out = run(capsys, "vm", "define", "web/x", "d0", "--host", api)
    assert code == ExitCode.USAGE and "web/x" in out
    code, out = run(capsys, "vm", "define", "web", "missing", "--host", api)
    assert code == ExitCode.NOT_FOUND_OR_EXISTS and "missing" in out
    code, out = run(capsys, "vm", "snapshot", "nope", "s1", "--host", api)
    assert code == ExitCode.NOT_FOUND_OR_EXISTS and "nope" in out


def test_each_disk_of_a_vm_backed_up_at_the_vm_snapshot(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`backup --snapshot` backs up the snapshot someone took (here every disk of a VM at one
    instant), not the disk as it is by the time the backup reads it; the snapshot is kept."""
    from blocktrail.nbd.blocking import BlockingNbdClient
    from blocktrail.nbd.uri import NbdEndpoint, NbdUri
    from blocktrail.repo import Repository

    repo = str(tmp_path / "repo")
    Repository.init(repo, encryption=TEST_ENCRYPTION).close()
    (tmp_path / "h").mkdir()
    with running_host(tmp_path / "h") as (api, nbd):
        def write(disk: str, byte: bytes) -> None:
            uri = NbdUri(NbdEndpoint(unix_path=str(nbd)), disk)
            with BlockingNbdClient.connect(uri) as live:
                live.pwrite(byte * MiB, 0)
                live.flush()

        for name in ("a", "b"):
            assert run(capsys, "disk", "create", name, "--size", "4M", "--host", api)[0] == 0
            write(name, b"1")
        assert run(capsys, "vm", "define", "web", "a", "b", "--host", api)[0] == 0
        assert run(capsys, "vm", "snapshot", "web", "s1", "--host", api)[0] == 0
        for name in ("a", "b"):
            write(name, b"2")  # after the VM snapshot: not in its backup
        points = {}
        for name in ("a", "b"):
            code, out = run(capsys, "backup", name, "--host", api, "--repo", repo,
                            "--snapshot", "s1", "--json")
            assert code == 0, out
            points[name] = json.loads(out)["point"]["id"]
            code, out = run(capsys, "snapshot", "list", name, "--host", api, "--json")
            assert [s["name"] for s in json.loads(out)] == ["s1"]  # kept
        code, out = run(capsys, "backup", "a", "--host", api, "--repo", repo,
                        "--snapshot", "nope")
        assert code == ExitCode.SNAPSHOT_OR_POINT and "nope" in out
    for name, point in points.items():
        target = tmp_path / f"{name}.raw"
        assert run(capsys, "restore", repo, point, "--to", str(target))[0] == 0
        assert target.read_bytes()[:MiB] == b"1" * MiB


def test_snapshot_option_is_refused_for_an_nbd_uri(capsys: pytest.CaptureFixture[str],
                                                   tmp_path: Path) -> None:
    code, out = run(capsys, "backup", f"nbd+unix:///d0?socket={tmp_path}/s", "--repo",
                    str(tmp_path / "repo"), "--snapshot", "s1")
    assert code == ExitCode.USAGE and "--snapshot" in out
