"""Tables people read (`points`, `snapshot list`) and progress (a bar on a terminal, JSON lines
with --json, nothing otherwise); --json output unchanged."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from blocktrail.cli.main import main
from blocktrail.cli.progress import JsonLines, line, progress_bar
from blocktrail.cli.tables import age, points_table, snapshots_table

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def test_ages_in_human_units() -> None:
    def ago(**kw: float) -> str:
        return age((NOW - timedelta(**kw)).isoformat(), NOW)
    assert ago(seconds=42) == "42s ago"
    assert ago(minutes=5) == "5m ago"
    assert ago(hours=3) == "3h ago"
    assert ago(days=2) == "2d ago"
    assert ago(days=50) == "7w ago"
    assert age("garbage", NOW) == "?"


def test_points_table_names_disks_and_says_why_full() -> None:
    base = {"kind": "full", "change_id": "c/1", "verify_state": "ok", "size_bytes": 8 << 30,
            "parent": None, "tracker_trusted": True, "bytes_stored": 3 << 20}
    rows = [{**base, "id": "20260501T110000000Z-aaaa", "disk_id":
             "6be1c721-7981-4525-8f75-c81a7fcde633", "created_at":
             (NOW - timedelta(hours=1)).isoformat(), "fallback_reason": "no earlier point"},
            {**base, "id": "20260501T115900000Z-bbbb", "kind": "incremental",
             "disk_id": "nbd+unix:///vm1?socket=/s", "created_at":
             (NOW - timedelta(seconds=30)).isoformat(), "fallback_reason": None,
             "tracker_trusted": False, "verify_state": "unverified"}]
    text = points_table(rows, {"6be1c721-7981-4525-8f75-c81a7fcde633": "vm1"}, NOW)
    header, rule, first, second, total = text.splitlines()
    assert header.split() == ["ID", "DISK", "KIND", "AGE", "SIZE", "STORED", "VERIFY", "NOTE"]
    assert set(rule) <= {"-", " "}
    assert "vm1 (6be1c721)" in first and "8.0 GiB" in first and "3.0 MiB" in first
    assert "1h ago" in first and "no earlier point" in first
    assert "nbd+unix:///vm1?socket=/s" in second and "AUDIT MISMATCH" in second
    assert total == "2 restore points"
    assert points_table([], {}) == "(no restore points)"


def test_snapshots_table() -> None:
    snaps = [{"name": "nightly", "change_id": "e/1", "created_at":
              (NOW - timedelta(minutes=3)).isoformat(), "size_bytes": 1 << 30}]
    text = snapshots_table(snaps, "d0", NOW)
    assert text.splitlines()[0].split() == ["SNAPSHOT", "AGE", "SIZE", "CHANGE", "ID"]
    assert "nightly" in text and "3m ago" in text and "1.0 GiB" in text
    assert snapshots_table([], "d0") == "(no snapshots of d0)"


def test_points_and_snapshot_list_on_the_command_line(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    disk, repo = str(tmp_path / "d0"), str(tmp_path / "repo")
    assert main(["disk", "create", disk, "--size", "1M"]) == 0
    assert main(["repo", "init", repo]) == 0
    assert main(["snapshot", "create", disk, "s1"]) == 0
    assert main(["backup", disk, "--repo", repo]) == 0
    capsys.readouterr()
    assert main(["points", repo]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ID ") and "full" in out and "1 restore points" in out
    assert main(["points", repo, "--json"]) == 0
    (point,) = json.loads(capsys.readouterr().out)
    assert set(point) == {"id", "disk_id", "kind", "change_id", "created_at", "verify_state",
                          "size_bytes", "parent", "fallback_reason", "tracker_trusted"}
    assert main(["snapshot", "list", disk]) == 0
    assert capsys.readouterr().out.startswith("SNAPSHOT ")
    assert main(["snapshot", "list", disk, "--json"]) == 0
    assert [s["name"] for s in json.loads(capsys.readouterr().out)] == ["s1"]


def test_progress_json_lines_at_most_once_a_second() -> None:
    out = io.StringIO()
    clock = iter([0.0, 0.5, 1.2, 1.3, 2.5]).__next__
    report = JsonLines("backup", 65536, out, clock=clock)
    for done in (1, 2, 3, 4):
        report(done, 10)
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [x["done_bytes"] for x in lines] == [2 * 65536, 4 * 65536]
    assert lines[0] == line("backup", 2 * 65536, 10 * 65536, 1.2)
    assert lines[0]["total_bytes"] == 655360 and lines[0]["eta_s"] is not None


def test_progress_is_quiet_off_a_terminal() -> None:
    with progress_bar("restore", False, stream=io.StringIO()) as report:
        assert report is None
    with progress_bar("restore", True, stream=io.StringIO()) as report:
        assert report is not None


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_and_spinner_on_a_terminal() -> None:
    from blocktrail.cli.progress import spinner
    out = _Terminal()
    with progress_bar("backup", False, unit_bytes=1 << 20, stream=out) as report:
        assert report is not None
        report(3, 10)
    assert "backup" in out.getvalue() and "MB" in out.getvalue()  # bytes, not chunks
    out = _Terminal()
    with spinner("check", False, stream=out):
        pass
    assert "check" in out.getvalue()
    quiet = _Terminal()
    with spinner("check", True, stream=quiet):  # --json: stdout's one answer stays clean
        pass
    assert quiet.getvalue() == ""
