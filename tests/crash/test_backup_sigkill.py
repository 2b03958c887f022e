"""Real SIGKILL during backups and prunes: the repository always checks clean and every point
that was published restores to the content it recorded."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blocktrail.repo import Repository
from s3server import TEST_ENCRYPTION, TEST_PASSWORD

WORKER = r"""
import hashlib, json, os, random, sys
from blocktrail.backup.engine import run_backup
from blocktrail.backup.sources.local import LocalDiskSource
from blocktrail.disk import Disk
from blocktrail.repo import Repository, RetentionPolicy
root, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
disk = Disk.open(root + "/disk")
repo = Repository.open(root + "/repo", password="test-password")
source = LocalDiskSource(disk)
print("READY", flush=True)
while True:
    for _ in range(rng.randrange(1, 30)):
        disk.pwrite(rng.randbytes(rng.choice((4096, 65536, 300000))),
                    rng.randrange(0, disk.size_bytes - 300000))
    snapshot_digest = hashlib.sha256(disk.pread(disk.size_bytes, 0)).hexdigest()
    report = run_backup(source, repo)
    print("POINT", report.point.id, snapshot_digest, flush=True)
    if rng.random() < 0.4:
        repo.forget(RetentionPolicy(keep_last=2))
        print("PRUNE-START", flush=True)
        repo.prune()
        print("PRUNE-END", flush=True)
"""
TRIALS = int(os.environ.get("BLOCKTRAIL_BACKUP_SIGKILL_TRIALS", "30"))


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from blocktrail.disk import Disk

    root = tmp_path_factory.mktemp("seed")
    with Disk.create(root / "disk", 32 << 20) as disk:
        disk.pwrite(random.Random(0).randbytes(8 << 20), 0)
    Repository.init(root / "repo", encryption=TEST_ENCRYPTION).close()
    return root


@pytest.mark.parametrize("trial", range(TRIALS))
def test_sigkill_during_backup_and_prune(seeded: Path, tmp_path: Path, trial: int) -> None:
    import shutil

    root = tmp_path / "t"
    shutil.copytree(seeded, root)
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(root), str(trial)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith(b"READY")
    time.sleep(random.Random(trial).uniform(0.05, 1.5))
    proc.send_signal(signal.SIGKILL)
    out = proc.stdout.read().decode()
    assert proc.wait() == -signal.SIGKILL
    published = {}
    for line in out.split("\n")[:-1]:
        if line.startswith("POINT"):
            _, point_id, digest = line.split()
            published[point_id] = digest
    with Repository.open(root / "repo", password=TEST_PASSWORD) as repo:
        report = repo.check(read_data=True)
        assert report.ok, report.problems
        listed = {p.id for p in repo.points()}
        for point_id, digest in published.items():
            if point_id not in listed:
                continue  # forgotten by a later forget
            target = tmp_path / "restore.raw"
            repo.restore(point_id, str(target))
            assert hashlib.sha256(target.read_bytes()).hexdigest() == digest
            target.unlink()
    # the disk itself came through its crash too: it opens and backs up again
    from blocktrail.backup.engine import run_backup
    from blocktrail.backup.sources.local import LocalDiskSource
    from blocktrail.disk import Disk

    with Disk.open(root / "disk") as disk, Repository.open(root / "repo",
                                                           password=TEST_PASSWORD) as repo:
        report_after = run_backup(LocalDiskSource(disk), repo)
        target = tmp_path / "after.raw"
        repo.restore(report_after.point.id, str(target))
        assert target.read_bytes() == disk.pread(disk.size_bytes, 0)
