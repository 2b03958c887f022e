"""The write-intent bitmap: what a sync sets, durably, and what it never sets."""

from __future__ import annotations

from pathlib import Path

from blocktrail.fileio import OsFileIO
from blocktrail.tracking.intent import AHEAD_REGIONS, MAX_REGIONS, IntentLog

REGION = 1 << 20


def _log(tmp_path: Path) -> tuple[IntentLog, str]:
    path = str(tmp_path / "intent")
    return IntentLog.create(OsFileIO(), path, REGION), path


def test_a_writer_going_on_in_order_finds_the_next_regions_durable(tmp_path: Path) -> None:
    log, path = _log(tmp_path)
    regions = 4 * (1 + AHEAD_REGIONS)
    for offset in range(0, regions * REGION, 64 * 1024):
        log.ensure(offset, 64 * 1024, regions * REGION)
    assert log.fsync_count == 4  # one sync per 1 + AHEAD_REGIONS regions, not one per region
    assert log.set_regions == frozenset(range(regions))
    log.close()
    again = IntentLog.load(OsFileIO(), path, REGION)  # what memory trusts is on disk
    assert again.set_regions == frozenset(range(regions))
    again.close()


def test_bits_ahead_stop_at_the_end_of_the_disk_and_of_the_bitmap(tmp_path: Path) -> None:
    log, path = _log(tmp_path)
    log.ensure(5 * REGION + 100, 10, 6 * REGION + 1)  # the disk ends in region 6
    assert log.set_regions == {5, 6}
    log.ensure((MAX_REGIONS - 1) * REGION, 1)  # no disk size: the bitmap's end
    assert log.set_regions == {5, 6, MAX_REGIONS - 1}
    log.close()
    assert IntentLog.load(OsFileIO(), path, REGION).set_regions == {5, 6, MAX_REGIONS - 1}


def test_a_write_across_regions_and_a_clear(tmp_path: Path) -> None:
    log, path = _log(tmp_path)
    log.ensure(2 * REGION - 1, 2, 100 * REGION)  # regions 1 and 2, then the ones after 2
    assert log.set_regions == frozenset(range(1, 3 + AHEAD_REGIONS))
    assert log.fsync_count == 1
    log.ensure(3 * REGION, 1, 100 * REGION)  # set ahead already: no sync
    assert log.fsync_count == 1
    log.clear()
    assert log.set_regions == frozenset()
    log.close()
    assert IntentLog.load(OsFileIO(), path, REGION).set_regions == frozenset()
