"""The host's catalog of restore points (console and metrics) reads a repository again when a
manifest or a verify record changed, and only then."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("url", ["s3://", "s3://b/p", "s3://bkt/../x", "s3://bkt/p%25",
                                 "s3://bkt/p?x=1", "s3://bkt/p"])
def test_a_bad_or_unreachable_s3_repository_is_a_problem_shown(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``host --repo s3://...`` with a URL no repository can have, or an endpoint nothing
    answers at: the console and the metrics show why, and nothing raises."""
    for name, value in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
                        "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_REGION": "us-east-1",
                        "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(name, value)
    catalog = PointCatalog((url,))
    try:
        (path,) = catalog.paths
        assert path == url  # an S3 URL is not taken for a relative path
        view = catalog.view(path)
        assert view.problem and view.points == (), view
    finally:
        catalog.close()
