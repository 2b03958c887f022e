"""Instant restore from a repository on S3 (SeaweedFS): the host reaches it with its own S3
settings; the disk equals the point before and after its fill, and the lease naming the point
is held while the fill reads it and released when the disk is local."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from blocktrail.backup.engine import BackupOptions, run_backup
from blocktrail.backup.sources.local import LocalDiskSource
from blocktrail.disk import Disk
from blocktrail.repo import Repository, RestorePoint
from blocktrail.repo.leases import list_leases
from hostproc import require_tools
from instantkit import CS, HostProcess, point_bytes, qemu_img_compare, qemu_io_once
from s3server import TEST_ENCRYPTION, TEST_PASSWORD, TEST_TIMING, SeaweedFS

pytestmark = pytest.mark.interop
MiB = 1 << 20


def test_instant_restore_from_s3(s3_server: SeaweedFS, tmp_path: Path) -> None:
    require_tools("qemu-img")
    content = point_bytes(8 * MiB, seed=41)
    url = s3_server.new_url("instant")
    point, image = _backed_up(content, s3_server, url, tmp_path)
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


def test_the_s3_server_stopped_mid_fill(own_server: SeaweedFS, tmp_path: Path) -> None:
    """The object store goes away mid-fill: what was fetched reads, what was not fails with
    EIO (never zeros), the fill pauses and retries, and completes once the store is back."""
    require_tools("qemu-io", "qemu-img")
    content = random.Random(43).randbytes(128 * CS)  # every chunk unique
    url = own_server.new_url("instant-stopped")
    point, image = _backed_up(content, own_server, url, tmp_path)
    with HostProcess(tmp_path / "host", env=own_server.env()) as host:
        host.restore((url, point.id), rate_bytes_per_second=16 * CS)
        host.wait_restore(lambda s: s["local_chunks"] >= 8)
        host.call("POST", "/disks/r0/fill", json={"paused": True})
        own_server.stop(crash=True)
        uri = host.uri("r0")
        out = qemu_io_once(uri, f"read -P {content[0]} 0 1")  # the fill goes from the start
        assert "read 1/1 bytes" in out, out
        out = qemu_io_once(uri, f"read {127 * CS} 4096")
        assert "read failed: Input/output error" in out, out
        host.call("POST", "/disks/r0/fill", json={"paused": False})
        paused = host.wait_restore(lambda s: s["retry_in_s"] is not None)
        assert point.id in paused["paused"] and "trying again" in paused["paused"], paused
        own_server.start()
        host.call("POST", "/disks/r0/fill", json={"rate_bytes_per_second": None})
        host.wait_local(timeout_s=120)
        done = qemu_img_compare(image, uri)
        assert done.returncode == 0, done.stdout + done.stderr


def _backed_up(content: bytes, server: SeaweedFS, url: str,
               tmp_path: Path) -> tuple[RestorePoint, Path]:
    """A disk holding content (its zero chunks left as holes) backed up into a new encrypted
    repository at url; returns the point and an image file of the content."""
    with Disk.create(tmp_path / "disk", len(content)) as disk:
        for offset in range(0, len(content), CS):
            if any(content[offset : offset + CS]):
                disk.pwrite(content[offset : offset + CS], offset)
        with Repository.init(url, s3=server.options(), timing=TEST_TIMING,
                             encryption=TEST_ENCRYPTION) as repo:
            point = run_backup(LocalDiskSource(disk), repo, BackupOptions()).point
    image = tmp_path / "expected.raw"
    image.write_bytes(content)
    return point, image
