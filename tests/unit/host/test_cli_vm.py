"""`blocktrail vm` against a real host: define, list, snapshot every disk at once, remove."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from blocktrail.cli.main import main
from blocktrail.errors import ExitCode
from hostproc import running_host

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
