"""Instant restore from a repository on S3 (SeaweedFS): the host reaches it with its own S3
settings; the disk equals the point before and after its fill, and the lease naming the point
is held while the fill reads it and released when the disk is local."""

from __future__ import annotations

from pathlib import Path

import pytest

from blocktrail.backup.engine import BackupOptions, run_backup
from blocktrail.backup.sources.local import LocalDiskSource
from blocktrail.disk import Disk
from blocktrail.repo import Repository
from blocktrail.repo.leases import list_leases
from hostproc import require_tools
from instantkit import CS, HostProcess, point_bytes, qemu_img_compare
from s3server import TEST_ENCRYPTION, TEST_PASSWORD, TEST_TIMING, SeaweedFS

pytestmark = pytest.mark.interop
MiB = 1 << 20


def test_instant_restore_from_s3(s3_server: SeaweedFS, tmp_path: Path) -> None:
    require_tools("qemu-img")
    content = point_bytes(8 * MiB, seed=41)
    url = s3_server.new_url("instant")
    with Disk.create(tmp_path / "disk", len(content)) as disk:
        for offset in range(0, len(content), CS):
            if any(content[offset : offset + CS]):
                disk.pwrite(content[offset : offset + CS], offset)
        with Repository.init(url, s3=s3_server.options(), timing=TEST_TIMING,
                             encryption=TEST_ENCRYPTION) as repo:
            point = run_backup(LocalDiskSource(disk), repo, BackupOptions()).point
    image = tmp_path / "expected.raw"
    image.write_bytes(content)
    with HostProcess(tmp_path / "host", env=s3_server.env()) as host:
        host.restore((url, point.id), paused=True)
        uri = host.uri("r0")
        done = qemu_img_compare(image, uri, offset=2 * MiB, size=2 * MiB)  # fetched on demand
        assert done.returncode == 0, done.stdout + done.stderr
        with Repository.open(url, s3=s3_server.options(), password=TEST_PASSWORD) as repo:
            assert [lease.base for lease in list_leases(repo.backend)] == [point.id]
        host.call("POST", "/disks/r0/fill", json={"paused": False})
        host.wait_local()
        done = qemu_img_compare(image, uri)
        assert done.returncode == 0, done.stdout + done.stderr
        with Repository.open(url, s3=s3_server.options(), password=TEST_PASSWORD) as repo:
            assert list_leases(repo.backend) == []
