"""Repositories on a real distributed object store (SeaweedFS on loopback), with many writers:

- 4 backup processes back up 8 disks into one S3 repository while garbage collections and
  prunes run: every restore point restores bit-identical, `check --read-data` passes;
- a backup killed with SIGKILL: its lease runs out (or its process is seen gone), another process
  backs the disk up, nothing is lost, and its orphaned uploads are collected later;
- a backup stalled past its lease (SIGSTOP; SIGCONT once the lease was taken over) publishes
  nothing and says why;
- wrong credentials: a clear error at open, nothing written; the server stopped mid-backup:
  retries, then a clear error; the repository stays consistent, the next backup succeeds and
  does not upload again what was stored; a server that ignores If-None-Match (a proxy that
  strips it) is refused at init and open.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from blocktrail.disk import Disk
from blocktrail.errors import ExitCode
from blocktrail.repo import Repository, RetentionPolicy, S3Options
from blocktrail.repo.backend import BackendDenied, BucketNotFound
from blocktrail.repo.errors import ConditionalWritesUnsupported
from blocktrail.repo.leases import LEASE_VARIABLE, timing_from_environment
from s3server import (
    ACCESS_KEY,
    SECRET_KEY,
    TEST_ENCRYPTION,
    TEST_PASSWORD,
    TEST_TIMING,
    SeaweedFS,
)

MiB = 1 << 20
# the lease of the backup processes these tests start: long enough that its margin (5 s)
# outlasts a renewal slowed by the whole suite's load on two cores (one slower than the margin
# loses the lease, as it must, and the backup stops before the test is done with it)
LEASE_ENV = {LEASE_VARIABLE: "20"}
with mock.patch.dict(os.environ, LEASE_ENV):
    LEASE_TIMING = timing_from_environment()  # what those processes make of it
LEASE_EXPIRED_AFTER = LEASE_TIMING.lease_s + LEASE_TIMING.margin + 2  # + Last-Modified's second
# the many-writers test, larger by hand: BLOCKTRAIL_S3_DISK_MIB=64 BLOCKTRAIL_S3_ROUNDS=6
DISK_MIB = int(os.environ.get("BLOCKTRAIL_S3_DISK_MIB", "6"))
ROUNDS = int(os.environ.get("BLOCKTRAIL_S3_ROUNDS", "3"))

WORKER = r"""
import hashlib, json, os, random, sys, time
from blocktrail.backup.engine import BackupOptions, run_backup
from blocktrail.backup.sources.local import LocalDiskSource
from blocktrail.disk import Disk
from blocktrail.errors import ExitCode
from blocktrail.repo import Repository, S3Options, Timing
url, rounds, seed, disks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
rng = random.Random(seed)
shared = random.Random(0).randbytes(1 << 20)  # the same content on every disk: deduplicated
timing = Timing(lease_s=float(os.environ["BLOCKTRAIL_LEASE_SECONDS"]), margin_s=2.5)
for round_ in range(rounds):
    for path in disks:
        with Disk.open(path) as disk:
            for _ in range(rng.randrange(1, 6)):
                disk.pwrite(rng.randbytes(rng.choice((65536, 200000))),
                            rng.randrange(0, disk.size_bytes - 200000))
            disk.pwrite(shared, 2 << 20)
            digest = hashlib.sha256(disk.pread(disk.size_bytes, 0)).hexdigest()
            for attempt in range(40):
                try:
                    with Repository.open(url, s3=S3Options(), timing=timing,
                                         password="test-password") as repo:
                        report = run_backup(LocalDiskSource(disk), repo,
                                            BackupOptions(seed=round_))
                    break
                except Exception as exc:  # the disk's lease is busy: wait, as a scheduler would
                    if "cannot back up" not in str(exc):
                        raise
                    time.sleep(0.5)
            print("POINT", report.point.id, digest, report.kind, flush=True)
"""


def make_disks(root: Path, count: int, size: int, seed: int) -> list[Path]:
    rng = random.Random(seed)
    disks = []
    for i in range(count):
        path = root / f"disk{i}"
        with Disk.create(path, size) as disk:
            disk.pwrite(rng.randbytes(size // 4), 0)
        disks.append(path)
    return disks


def restore_digest(repo: Repository, point_id: str, tmp: Path) -> str:
    target = tmp / "restored.raw"
    repo.restore(point_id, str(target))
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    target.unlink()
    return digest


def cli(server: SeaweedFS, *args: str, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "blocktrail.cli.main", *args],
                          env=env or server.env(**LEASE_ENV), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_four_backup_processes_eight_disks_with_gc_and_prune(s3_server: SeaweedFS,
                                                            tmp_path: Path) -> None:
    url = s3_server.new_url("many")
    Repository.init(url, s3=s3_server.options(), timing=TEST_TIMING,
                    encryption=TEST_ENCRYPTION).close()
    disks = make_disks(tmp_path, 8, DISK_MIB * MiB, seed=1)
    env = s3_server.env(**LEASE_ENV)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, url, str(ROUNDS), str(i),
                               str(disks[2 * i]), str(disks[2 * i + 1])],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(4)]
    collections = 0
    try:
        while any(p.poll() is None for p in procs):  # collect garbage all along
            with Repository.open(url, s3=s3_server.options(), timing=TEST_TIMING,
                                 password=TEST_PASSWORD) as repo:
                repo.forget(RetentionPolicy(keep_last=2))
                repo.prune()
            collections += 1
            time.sleep(0.5)
        outputs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    published = {}
    for out, _ in outputs:
        for line in out.splitlines():
            _, point_id, digest, _ = line.split()
            published[point_id] = digest
    assert len(published) == 8 * ROUNDS and collections >= 2
    with Repository.open(url, s3=s3_server.options(), timing=TEST_TIMING,
                         password=TEST_PASSWORD) as repo:
        report = repo.prune()  # no writer left: everything condemned before is decided now
        assert report.packs_waiting == 0
        check = repo.check(read_data=True)
        assert check.ok, check.problems
        assert check.unreferenced_files == 0  # the garbage is gone
        listed = {p.id: p for p in repo.points()}
        assert len(listed) >= 16  # at least the 2 newest of each disk
        for point_id, point in listed.items():
            assert restore_digest(repo, point_id, tmp_path) == published[point_id], point.disk_id


def _start_backup(server: SeaweedFS, url: str, disk: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "blocktrail.cli.main", "backup", str(disk),
                             "--repo", url, "--json", *extra], env=server.env(**LEASE_ENV),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_uploads(server: SeaweedFS, url: str, proc: subprocess.Popen[str],
                      packs: int = 2) -> None:
    """Until the backup has uploaded a few packs (checkpoint index files name them); fails
    with what the backup said if it ended first."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    client = server.client()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/index/").get("KeyCount")
        if found and found >= packs:
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the backup ended (exit {proc.returncode}) before it "
                                 f"uploaded {packs} index files: {out}{err}")
        time.sleep(0.05)
    raise AssertionError(f"the backup uploaded fewer than {packs} index files in 120 s")


def _big_disk(tmp_path: Path, name: str = "big") -> Path:
    path = tmp_path / name
    with Disk.create(path, 96 * MiB) as disk:
        disk.pwrite(random.Random(5).randbytes(96 * MiB), 0)  # incompressible: many packs
    return path


def _pretend_other_machine(server: SeaweedFS, url: str) -> None:
    """Rewrite the leases as if their holders ran on another machine: only expiry frees them."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    client = server.client()
    for item in client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/leases/").get(
            "Contents", []):
        body = json.loads(client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read())
        body["process"] = "another-boot/pid:[1]/1/1"
        client.put_object(Bucket=bucket, Key=item["Key"], Body=json.dumps(body).encode())


def test_a_killed_backup_expires_and_its_uploads_are_collected(s3_server: SeaweedFS,
                                                              tmp_path: Path) -> None:
    url = s3_server.new_url("killed")
    Repository.init(url, s3=s3_server.options(), timing=TEST_TIMING,
                    encryption=TEST_ENCRYPTION).close()
    disk = _big_disk(tmp_path)
    proc = _start_backup(s3_server, url, disk)
    _wait_for_uploads(s3_server, url, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _pretend_other_machine(s3_server, url)  # so that only the lease's expiry can free it
    busy = cli(s3_server, "backup", str(disk), "--repo", url)
    assert busy.returncode == 7 and "cannot back up disk" in busy.stderr
    time.sleep(LEASE_EXPIRED_AFTER)
    done = cli(s3_server, "backup", str(disk), "--repo", url, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["bytes_stored"] < 80 * MiB  # what the killed one uploaded was not sent again
    with Repository.open(url, s3=s3_server.options(), timing=TEST_TIMING,
                         password=TEST_PASSWORD) as repo:
        with Disk.open(disk) as d:
            expected = hashlib.sha256(d.pread(d.size_bytes, 0)).hexdigest()
        assert restore_digest(repo, result["point"]["id"], tmp_path) == expected
        repo.forget(RetentionPolicy(keep_last=1))
        repo.prune()
        check = repo.check(read_data=True)
        assert check.ok and check.unreferenced_files == 0  # the orphans were collected


def test_a_stalled_backup_publishes_nothing(s3_server: SeaweedFS, tmp_path: Path) -> None:
    url = s3_server.new_url("stalled")
    Repository.init(url, s3=s3_server.options(), timing=TEST_TIMING,
                    encryption=TEST_ENCRYPTION).close()
    disk = _big_disk(tmp_path)
    twin = tmp_path / "twin"  # the same disk (its ID), as another host would read it
    shutil.copytree(disk, twin)
    stalled = _start_backup(s3_server, url, disk)
    _wait_for_uploads(s3_server, url, stalled)
    stalled.send_signal(signal.SIGSTOP)
    try:
        time.sleep(LEASE_EXPIRED_AFTER)  # its lease runs out
        # a GC meanwhile: the stalled writer is gone for it, its packs may go
        with Repository.open(url, s3=s3_server.options(), timing=TEST_TIMING,
                             password=TEST_PASSWORD) as repo:
            repo.prune()
        other = cli(s3_server, "backup", str(twin), "--repo", url, "--json", timeout=300)
        assert other.returncode == 0, other.stderr
    finally:
        stalled.send_signal(signal.SIGCONT)
    out, err = stalled.communicate(timeout=300)
    assert stalled.returncode == 7, (out, err)
    assert "lease" in err and "nothing was published" in err, err
    with Repository.open(url, s3=s3_server.options(), timing=TEST_TIMING,
                         password=TEST_PASSWORD) as repo:
        points = repo.points()
        assert [p.id for p in points] == [json.loads(other.stdout)["point"]["id"]]
        with Disk.open(twin) as d:
            expected = hashlib.sha256(d.pread(d.size_bytes, 0)).hexdigest()
        assert restore_digest(repo, points[0].id, tmp_path) == expected
        repo.prune()
        assert repo.check(read_data=True).ok


def test_wrong_credentials_are_a_clear_error_and_write_nothing(s3_server: SeaweedFS,
                                                               tmp_path: Path) -> None:
    url = s3_server.new_url("creds")
    Repository.init(url, s3=s3_server.options(), timing=TEST_TIMING,
                    encryption=TEST_ENCRYPTION).close()
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    before = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)["KeyCount"]
    env = s3_server.env(AWS_SECRET_ACCESS_KEY="not-the-secret", **LEASE_ENV)
    for args in (["points", url], ["repo", "init", s3_server.new_url("creds2")],
                 ["backup", str(_big_disk(tmp_path)), "--repo", url]):
        done = cli(s3_server, *args, env=env)
        assert done.returncode == 9, done.stderr
        assert done.stderr.count("\n") == 1 and "refused the credentials" in done.stderr
    assert s3_server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)["KeyCount"] == before
    with pytest.raises(BackendDenied, match="refused the credentials"):
        _open_with_secret(s3_server, url, "wrong")


def test_a_bucket_that_does_not_exist_is_named_at_open(s3_server: SeaweedFS) -> None:
    """Not "not a blocktrail repository (no config.json)": the bucket itself is missing."""
    url = f"s3://no-such-bucket-{os.getpid()}/repo"
    with pytest.raises(BucketNotFound, match=r"bucket no-such-bucket-\d+ does not exist at "
                                             r"http://.*repo init` creates it") as missing:
        Repository.open(url, s3=s3_server.options(), timing=TEST_TIMING,
                        password=TEST_PASSWORD).close()
    assert missing.value.exit_code == ExitCode.NOT_FOUND_OR_EXISTS


def _open_with_secret(server: SeaweedFS, url: str, secret: str) -> None:
    saved = os.environ["AWS_SECRET_ACCESS_KEY"]
    os.environ["AWS_SECRET_ACCESS_KEY"] = secret
    try:
        Repository.open(url, s3=server.options(), timing=TEST_TIMING,
                        password=TEST_PASSWORD).close()
    finally:
        os.environ["AWS_SECRET_ACCESS_KEY"] = saved


def test_the_server_stopped_mid_backup(own_server: SeaweedFS, tmp_path: Path) -> None:
    url = own_server.new_url("stopped")
    Repository.init(url, s3=own_server.options(), timing=TEST_TIMING,
                    encryption=TEST_ENCRYPTION).close()
    disk = _big_disk(tmp_path)
    proc = _start_backup(own_server, url, disk)
    _wait_for_uploads(own_server, url, proc)
    own_server.stop(crash=True)
    started = time.monotonic()
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 10, (out, err)  # unreachable, after the retries
    err = "".join(line for line in err.splitlines(keepends=True)
                  if not line.startswith('{"progress": '))  # --json: progress lines on stderr
    assert err.count("\n") == 1 and "cannot be reached" in err and "gave up" in err
    assert time.monotonic() - started < 120
    own_server.start()
    with Repository.open(url, s3=own_server.options(), timing=TEST_TIMING,
                         password=TEST_PASSWORD) as repo:
        check = repo.check(read_data=True)
        assert check.ok and repo.points() == []
    done = cli(own_server, "backup", str(disk), "--repo", url, "--json", timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["bytes_stored"] < 90 * MiB  # resumed: what was stored is not sent again
    with Repository.open(url, s3=own_server.options(), timing=TEST_TIMING,
                         password=TEST_PASSWORD) as repo:
        with Disk.open(disk) as d:
            expected = hashlib.sha256(d.pread(d.size_bytes, 0)).hexdigest()
        assert restore_digest(repo, result["point"]["id"], tmp_path) == expected
        assert repo.check(read_data=True).ok


class _StripConditions(http.server.BaseHTTPRequestHandler):
    """Forwards S3 requests to the real server without If-None-Match, signed again (as a
    server or proxy that does not know the header would behave)."""

    upstream = ""
    protocol_version = "HTTP/1.1"

    def _forward(self) -> None:
        import urllib3
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        keep = {k: v for k, v in self.headers.items()
                if k.lower() in ("range", "if-match", "content-type", "content-md5")}
        request = AWSRequest(method=self.command, url=self.upstream + self.path, data=body,
                             headers=keep)
        S3SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "s3", "us-east-1").add_auth(request)
        prepared = request.prepare()
        response = urllib3.PoolManager().request(
            self.command, prepared.url, body=body or None, headers=dict(prepared.headers),
            preload_content=True, redirect=False)
        self.send_response(response.status)
        for key, value in response.headers.items():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(response.data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.data)

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _forward

    def log_message(self, *args: Any) -> None:
        pass


def test_a_store_that_ignores_if_none_match_is_refused(s3_server: SeaweedFS) -> None:
    handler = type("Handler", (_StripConditions,), {"upstream": s3_server.endpoint})
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{proxy.server_address[1]}"
        through = S3Options(endpoint=endpoint, region="us-east-1")
        with pytest.raises(ConditionalWritesUnsupported, match="If-None-Match"):
            Repository.init(s3_server.new_url("strip"), s3=through, timing=TEST_TIMING,
                            encryption=TEST_ENCRYPTION)
        url = s3_server.new_url("strip-open")
        Repository.init(url, s3=s3_server.options(), timing=TEST_TIMING,
                        encryption=TEST_ENCRYPTION).close()
        with pytest.raises(ConditionalWritesUnsupported):
            Repository.open(url, s3=through, timing=TEST_TIMING, password=TEST_PASSWORD)
        done = cli(s3_server, "points", url, "--endpoint", endpoint)
        assert done.returncode == 8 and "conditional writes" in done.stderr
        assert Repository.open(url, s3=s3_server.options(), timing=TEST_TIMING,
                               password=TEST_PASSWORD).points() == []
    finally:
        proxy.shutdown()
        proxy.server_close()
