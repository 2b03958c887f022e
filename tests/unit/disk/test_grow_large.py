"""Growing a disk by hundreds of GiB: the grown range is counted as changed, durably, without a
write-intent bit per region (which once cost seconds per resize and stalled the host's API)."""

from __future__ import annotations

import os
from pathlib import Path

from blocktrail.disk import Disk
from blocktrail.extents import Extent

MiB, GiB = 1 << 20, 1 << 30
GROWN = 731_519_645_837  # an odd size, as a client may ask for


def test_a_grown_range_is_changed_durably_and_cheaply(tmp_path: Path) -> None:
    path = tmp_path / "d0"
    with Disk.create(path, MiB) as disk:
        disk.pwrite(b"x" * 4096, 0)
        since = disk.create_snapshot("s1").change_id
    pid = os.fork()
    if pid == 0:  # the grow, then a crash: no close, no checkpoint at exit
        disk = Disk.open(path)
        syncs = disk.tracker._intent.fsync_count
        disk.resize(GROWN)
        os._exit(0 if disk.tracker._intent.fsync_count == syncs else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0  # no write-intent sync for the grown range
    with Disk.open(path) as disk:
        assert disk.size_bytes == GROWN
        info = disk.query_changed_areas(since)
        assert info.changed_areas == (Extent(MiB, GROWN - MiB),)
