"""Snapshot names through the real CLI against a real `blocktrail host`: each name is one URL
path segment, so ``a%20b`` and ``a b`` are two snapshots, ``?`` and ``#`` are characters like
any other, and ``.``/``..`` never get as far as a URL. The reported reproductions first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from blocktrail.cli.main import main
from blocktrail.disk import Disk
from blocktrail.errors import ExitCode
from blocktrail.names import is_valid_disk_name, is_valid_snapshot_name
from blocktrail.nbd.blocking import BlockingNbdClient
from blocktrail.nbd.uri import NbdEndpoint, NbdUri
from hostproc import cli_in_process, running_host
from names_strategies import hostile_names

MiB = 1 << 20


@pytest.fixture
def host(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    with running_host(tmp_path) as endpoints:
        yield endpoints


def blocktrail(*args: str) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it."""
    return subprocess.run([sys.executable, "-m", "blocktrail.cli.main", *args],
                          capture_output=True, text=True, timeout=60)


def names(capsys: pytest.CaptureFixture[str], api: str) -> list[str]:
    assert main(["snapshot", "list", "d0", "--host", api, "--json"]) == 0
    return [s["name"] for s in json.loads(capsys.readouterr().out)]


def write(nbd: Path, data: bytes) -> None:
    with BlockingNbdClient.connect(NbdUri(NbdEndpoint(unix_path=str(nbd)), "d0")) as live:
        live.pwrite(data, 0)
        live.flush()


def read(nbd: Path, export: str = "d0") -> bytes:
    with BlockingNbdClient.connect(NbdUri(NbdEndpoint(unix_path=str(nbd)), export)) as client:
        return client.pread(8, 0)


def test_remove_a_percent_20_b_removes_exactly_that_one(
        host: tuple[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    api, _ = host
    cli_in_process(capsys, "disk", "create", "d0", "--size", "1M", "--host", api)
    for name in ("a b", "a%20b"):
        cli_in_process(capsys, "snapshot", "create", "d0", name, "--host", api)
    removed = blocktrail("snapshot", "remove", "d0", "a%20b", "--host", api)
    assert removed.returncode == 0, removed.stderr
    assert names(capsys, api) == ["a b"]


def test_revert_to_x_percent_20_y_reverts_to_it(host: tuple[str, Path],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    api, nbd = host
    cli_in_process(capsys, "disk", "create", "d0", "--size", "1M", "--host", api)
    for name, data in (("x y", b"x y....."), ("x%20y", b"x%20y...")):
        write(nbd, data)
        cli_in_process(capsys, "snapshot", "create", "d0", name, "--host", api)
    write(nbd, b"newest..")
    reverted = blocktrail("snapshot", "revert", "d0", "x%20y", "--host", api, "--json")
    assert reverted.returncode == 0, reverted.stderr
    assert json.loads(reverted.stdout)["discarded_snapshots"] == []
    assert read(nbd) == b"x%20y..."  # not "x y": newer writes were not thrown away for it
    assert names(capsys, api) == ["x y", "x%20y"]


def test_question_marks_and_hashes_work_end_to_end(host: tuple[str, Path],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    api, nbd = host
    cli_in_process(capsys, "disk", "create", "d0", "--size", "1M", "--host", api)
    tricky = ["?x", "#", "a?b#c", "%", "%3F", "#?"]
    for index, name in enumerate(tricky):
        write(nbd, f"{index:08}".encode())
        assert cli_in_process(capsys, "snapshot", "create", "d0", name, "--host",
                              api)["name"] == name
    assert names(capsys, api) == tricky
    for index, name in enumerate(tricky):
        assert read(nbd, f"d0@{name}") == f"{index:08}".encode()
        query = cli_in_process(capsys, "cbt", "query", "d0", "--since", "*", "--snapshot", name,
                               "--host", api)
        assert query["changed_areas"]
    reverted = cli_in_process(capsys, "snapshot", "revert", "d0", "%", "--host", api)
    assert reverted["discarded_snapshots"] == ["%3F", "#?"]
    assert read(nbd) == b"00000003"
    for name in ("?x", "#", "a?b#c", "%"):
        assert cli_in_process(capsys, "snapshot", "remove", "d0", name, "--host",
                              api) == {"removed": name}
    assert names(capsys, api) == []


@pytest.mark.parametrize("name", [".", ".."])
def test_dot_names_are_refused_at_creation(host: tuple[str, Path], name: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    api, _ = host
    cli_in_process(capsys, "disk", "create", "d0", "--size", "1M", "--host", api)
    refused = blocktrail("snapshot", "create", "d0", name, "--host", api)
    assert refused.returncode == ExitCode.USAGE
    assert "'.' and '..' are not names" in refused.stderr and "Traceback" not in refused.stderr
    for command in ("remove", "revert"):
        assert main(["snapshot", command, "d0", name, "--host", api]) == ExitCode.USAGE
    assert names(capsys, api) == []


def test_importing_what_is_not_a_raw_image_creates_nothing(
        host: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    api, _ = host
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for source in ("/proc/self/environ", str(fifo), "/dev/zero"):
        refused = blocktrail("disk", "import", source, "d9", "--host", api)
        assert refused.returncode == ExitCode.USAGE, refused.stderr
        assert "Traceback" not in refused.stderr and refused.stderr.count("\n") == 1
    assert main(["disk", "info", "d9", "--host", api]) == ExitCode.NOT_FOUND_OR_EXISTS
    assert not list((tmp_path / "data" / "disks").iterdir())


# ------------------------------------------------------------------ hostile names, every command

# (the command's words and options, its arguments after "--"; which kind of name "{}" is)
HOST_COMMANDS: list[tuple[list[str], list[str], str]] = [
    (["snapshot", "create"], ["d0", "{}"], "snapshot"),
    (["snapshot", "remove"], ["d0", "{}"], "snapshot"),
    (["snapshot", "revert"], ["d0", "{}"], "snapshot"),
    (["cbt", "query", "--since", "*", "--snapshot={}"], ["d0"], "snapshot"),
    (["disk", "create", "--size", "1M"], ["{}"], "disk"),
    (["disk", "info"], ["{}"], "disk"),
    (["snapshot", "list"], ["{}"], "disk"),
    (["cbt", "reset"], ["{}"], "disk"),
    (["snapshot", "create"], ["{}", "s1"], "disk"),
]


@given(name=hostile_names(nul=False))  # no command line can hold a NUL
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_a_refused_name_is_exit_2_and_nothing_is_sent(
        name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Against an address nobody answers at: a name the CLI refuses never gets as far as
    trying (2, not 10), and a valid one does."""
    for words, arguments, kind in HOST_COMMANDS:
        args = [*(w.replace("{}", name) for w in words), "--host", "unix:/nonexistent/api.sock",
                "--", *(name if a == "{}" else a for a in arguments)]
        valid = is_valid_disk_name(name) if kind == "disk" else is_valid_snapshot_name(name)
        code = main(args)
        out, err = capsys.readouterr()
        assert code == (ExitCode.UNREACHABLE if valid else ExitCode.USAGE), (args, err)
        assert "Traceback" not in out + err and err.strip()


@given(name=hostile_names(nul=False))
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_hostile_names_on_a_local_disk_change_nothing(
        name: str, tmp_path_factory: pytest.TempPathFactory,
        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path_factory.mktemp("local") / "d0"
    Disk.create(path, MiB).close()
    before = _files(path)
    for command in ("create", "remove", "revert"):
        code = main(["snapshot", command, "--json", "--", str(path), name])
        out, err = capsys.readouterr()
        if command == "create" and is_valid_snapshot_name(name):
            assert code == 0 and json.loads(out)["name"] == name
            with Disk.open(path) as disk:
                assert [s.name for s in disk.snapshots] == [name]
            return
        assert code in (ExitCode.USAGE, ExitCode.SNAPSHOT_OR_POINT), (command, name, err)
        assert "Traceback" not in err and set(json.loads(out)) == {"error", "message"}
    assert _files(path) == before


def _files(path: Path) -> Any:
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir()
                  if p.name != "lock")
