"""The CLI: JSON output, exit codes for typed errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blocktrail.cli.main import main
from blocktrail.disk import Disk


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().out


def test_create_snapshot_query_roundtrip(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    disk_dir = str(tmp_path / "d0")
    code, out = run(capsys, "disk", "create", disk_dir, "--size", "4M", "--granularity", "4K",
                    "--json")
    assert code == 0
    start = json.loads(out)["current_change_id"]
    with Disk.open(disk_dir) as disk:
        disk.pwrite(b"x" * 100, 8192 + 5)
    code, out = run(capsys, "snapshot", "create", disk_dir, "s1", "--json")
    assert code == 0 and json.loads(out)["name"] == "s1"
    code, out = run(capsys, "cbt", "query", disk_dir, "--since", start, "--snapshot", "s1",
                    "--json")
    assert code == 0
    assert json.loads(out)["changed_areas"] == [{"offset": 8192, "length": 4096}]
    code, out = run(capsys, "snapshot", "list", disk_dir, "--json")
    assert [s["name"] for s in json.loads(out)] == ["s1"]
    code, out = run(capsys, "cbt", "reset", disk_dir, "--json")
    assert code == 0
    code, out = run(capsys, "cbt", "query", disk_dir, "--since", start, "--json")
    assert code == 4 and json.loads(out)["error"] == "StaleChangeId"


def test_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    disk_dir = str(tmp_path / "d0")
    assert run(capsys, "disk", "create", disk_dir, "--size", "1M")[0] == 0
    assert run(capsys, "disk", "create", disk_dir, "--size", "1M")[0] == 6  # exists
    assert run(capsys, "disk", "info", str(tmp_path / "nope"))[0] == 6  # not found
    assert run(capsys, "cbt", "query", disk_dir, "--since", "garbage")[0] == 4
    assert run(capsys, "cbt", "query", disk_dir, "--since", "*", "--start", "1M")[0] == 3
    assert run(capsys, "snapshot", "remove", disk_dir, "nope")[0] == 5
    assert run(capsys, "disk", "create", str(tmp_path / "d1"), "--size", "1M",
               "--granularity", "3000")[0] == 2
    assert run(capsys, "disk", "create", str(tmp_path / "d2"), "--size", "lots")[0] == 2


def test_import_raw_counts_data_as_changed(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(4 << 20)
        f.seek(1 << 20)
        f.write(b"\x01" * 70000)
    code, out = run(capsys, "disk", "import", str(raw), str(tmp_path / "d"), "--json")
    assert code == 0
    info = json.loads(out)
    epoch_start = info["epochs"][0]["epoch"] + "/0"
    with Disk.open(tmp_path / "d") as disk:
        assert disk.pread(4 << 20, 0) == raw.read_bytes()
        for since in ("*", epoch_start):
            areas = disk.query_changed_areas(since).changed_areas
            assert [(e.offset, e.length) for e in areas] == [(1 << 20, 131072)]
