"""The host's catalog of restore points (console and metrics) reads a repository again when a
manifest or a verify record changed, and only then."""

from __future__ import annotations

import os
import time
from pathlib import Path

from blocktrail.backup.engine import BackupOptions, run_backup
from blocktrail.backup.sources.local import LocalDiskSource
from blocktrail.disk import Disk
from blocktrail.host.points import PointCatalog
from blocktrail.repo import Repository
from s3server import TEST_ENCRYPTION

OLD = time.time() - 100  # one fixed time: directories set to it look unchanged


def _age(repo: Path) -> None:
    """Every directory of the repository modified at OLD (settled: a view may be kept)."""
    old = OLD
    for root, dirs, _files in os.walk(repo):
        for name in dirs:
            os.utime(os.path.join(root, name), (old, old))


def test_verify_records_and_forgets_invalidate_the_cached_view(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    with Disk.create(tmp_path / "d", 1 << 20, 65536) as disk, \
            Repository.init(path, encryption=TEST_ENCRYPTION) as repo:
        first = run_backup(LocalDiskSource(disk), repo, BackupOptions()).point
        catalog = PointCatalog((str(path),))
        try:
            _age(path)
            view = catalog.view(str(path))
            assert [p.verify_state for p in view.points] == ["unverified"]
            assert catalog.view(str(path)) is view  # nothing changed: kept
            repo.set_verify_state(first.id, "ok")  # a new verify/POINT/ directory
            _age(path)
            assert [p.verify_state for p in catalog.view(str(path)).points] == ["ok"]
            repo.set_verify_state(first.id, "failed")  # a second record in that directory
            os.utime(path / "points", (OLD, OLD))
            os.utime(path / "verify", (OLD, OLD))
            assert [p.verify_state for p in catalog.view(str(path)).points] == ["failed"]
            disk.pwrite(b"\x01" * 65536, 0)
            second = run_backup(LocalDiskSource(disk), repo, BackupOptions()).point
            assert [p.id for p in catalog.view(str(path)).points] == [first.id, second.id]
        finally:
            catalog.close()
