"""The committed disks of every format version must keep opening and reading the same
(docs/disk-format.md)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from blocktrail.disk import Disk
from blocktrail.errors import StaleChangeId
from blocktrail.tracking import interval_file

DISKS = Path(__file__).resolve().parents[1] / "data" / "disks"
VERSIONS = sorted(int(p.name[1:]) for p in DISKS.glob("v*"))


@pytest.fixture(params=VERSIONS, ids=lambda v: f"v{v}")
def golden(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    source = DISKS / f"v{request.param}"
    target = tmp_path / "disk"
    shutil.copytree(source / "disk", target)
    return target, json.loads((source / "expected.json").read_text())


def test_every_format_version_has_a_golden_disk() -> None:
    from blocktrail.disk.meta import FORMAT_VERSION
    assert list(range(1, FORMAT_VERSION + 1)) == VERSIONS


def test_golden_reads_the_same(golden: tuple[Path, dict[str, Any]]) -> None:
    path, expected = golden
    with Disk.open(path) as disk:
        assert disk.size_bytes == expected["size_bytes"]
        live = disk.pread(disk.size_bytes, 0)
        assert hashlib.sha256(live).hexdigest() == expected["live_sha256"]
        snap = disk.open_snapshot("golden-1").pread(disk.size_bytes, 0)
        assert hashlib.sha256(snap).hexdigest() == expected["snapshot_sha256"]
        assert [s.to_json() for s in disk.snapshots] == [expected["snapshot"]]


def test_golden_copied_disk_refuses_old_change_ids(
        golden: tuple[Path, dict[str, Any]]) -> None:
    """A copy has new inodes and times: files changed outside blocktrail -> new epoch."""
    path, expected = golden
    with Disk.open(path) as disk:
        with pytest.raises(StaleChangeId, match="changed outside blocktrail"):
            disk.query_changed_areas(expected["start_change_id"])
        allocated = disk.query_changed_areas("*").changed_areas
        assert allocated, "'*' still answers from the layers"


@pytest.mark.parametrize("version", VERSIONS)
def test_golden_tracker_files_decode(version: int) -> None:
    golden = DISKS / f"v{version}"
    expected = json.loads((golden / "expected.json").read_text())
    meta = json.loads((golden / "disk" / "disk.json").read_text())
    assert meta["format_version"] == version and meta["tracker"]["format"] == 1
    [[seq, name]] = meta["tracker"]["intervals"]
    epoch, stored_seq, granules = interval_file.decode(
        (golden / "disk" / name).read_bytes(), name)
    assert (epoch, stored_seq) == (meta["tracker"]["epoch"], seq)
    assert sorted(granules) == [1, 2, 3]  # bytes 5000..15000 at 4 KiB granularity
    _, _, open_marks = interval_file.decode((golden / "disk" / "open.roar").read_bytes(),
                                            "open")
    since_snapshot = {o // 4096 + i for o, n in expected["since_snapshot"]
                      for i in range(n // 4096)}
    assert set(open_marks) == since_snapshot
