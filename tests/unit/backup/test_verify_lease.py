"""verify reads a point as a restore does: a forget meanwhile that would remove the point keeps
it (verify's lease names it), and a prune deletes nothing verify reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from blocktrail.backup.engine import run_backup
from blocktrail.backup.sources.local import LocalDiskSource
from blocktrail.backup.verify import verify_point
from blocktrail.disk import Disk
from blocktrail.repo import Repository, RetentionPolicy, layout
from s3server import TEST_ENCRYPTION, TEST_PASSWORD

MiB = 1 << 20


def test_a_point_being_verified_is_kept_from_forget_and_prune(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", encryption=TEST_ENCRYPTION)
    other = Repository.open(tmp_path / "repo", password=TEST_PASSWORD)  # another process's
    with Disk.create(tmp_path / "d0", 4 * MiB, 65536) as disk:
        disk.pwrite(b"first" * 100_000, 0)
        first = run_backup(LocalDiskSource(disk), repo).point
        snapshot = disk.create_snapshot("then")  # the state verify compares with
        disk.pwrite(b"second" * 100_000, 0)
        run_backup(LocalDiskSource(disk), repo)  # the newest: `keep_last=1` keeps it alone
        meanwhile: list[Any] = []

        def progress(done: int, total: int) -> None:
            if not meanwhile:
                meanwhile.append(other.forget_points(RetentionPolicy(keep_last=1),
                                                     first.disk_id))
                meanwhile.append(other.prune())

        report = verify_point(repo, first.id, LocalDiskSource(disk), snapshot.name,
                              progress=progress)
    assert report.point.verify_state == "ok" and not report.damaged_areas
    forgot, pruned = meanwhile
    assert [p.id for p in forgot.kept_as_base] == [first.id] and forgot.forgotten == ()
    assert pruned.packs_deleted == 0
    assert not list(repo.backend.list(layout.LEASES))  # released
