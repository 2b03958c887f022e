"""Writes tests/data/disks/vN/ (N: the current disk format version): a small closed disk with a
snapshot, a delta layer, tracker intervals and a checkpoint; and expected.json describing what it
must read.

Run once per released format version; the output is committed and must keep opening."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

from blocktrail.disk import Disk
from blocktrail.disk.meta import FORMAT_VERSION


def main(out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    disk = Disk.create(out / "disk", 256 * 1024, 4096, cluster_size=8192)
    start = disk.current_change_id
    disk.pwrite(b"\x11" * 10000, 5000)
    snap = disk.create_snapshot("golden-1")
    disk.pwrite(b"\x22" * 3000, 9000)
    disk.zero(8192, 65536)
    disk.close()
    with Disk.open(out / "disk") as d:
        expected = {
            "size_bytes": d.size_bytes,
            "start_change_id": start,
            "snapshot": snap.to_json(),
            "live_sha256": hashlib.sha256(d.pread(d.size_bytes, 0)).hexdigest(),
            "snapshot_sha256": hashlib.sha256(
                d.open_snapshot("golden-1").pread(d.size_bytes, 0)).hexdigest(),
            "since_start": [list(e) for e in d.query_changed_areas(start).changed_areas],
            "since_snapshot": [list(e) for e in
                               d.query_changed_areas(snap.change_id).changed_areas],
        }
    (out / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
    (out / "disk" / "lock").unlink()


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else
         Path(__file__).parent / f"v{FORMAT_VERSION}")
