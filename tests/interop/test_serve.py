"""`blocktrail serve`: restore points read-only over NBD, for real tools: nbdinfo (the export,
base:allocation from the point's holes), nbdcopy and qemu-img (the whole image, equal to the
point), a write refused, a damaged chunk an EIO that names it (never zeros in its place), a
point that does not exist a clear error before anything is served."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from blocktrail.backup.engine import BackupOptions, run_backup
from blocktrail.backup.sources.local import LocalDiskSource
from blocktrail.disk import Disk
from blocktrail.repo import Repository
from hostproc import require_tools
from instantkit import CS, Point, damage_chunk, make_point, point_bytes
from nbdraw import BLOCK_STATUS, READ, WRITE, RawClient
from s3server import TEST_ENCRYPTION, SeaweedFS

pytestmark = pytest.mark.interop


@contextmanager
def serving(tmp_path: Path, repo: Path | str, *points: str,
            env: dict[str, str] | None = None) -> Iterator[Path]:
    sock = tmp_path / "nbd.sock"
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "blocktrail.cli.main", "serve", str(repo),
                                 *points, "--nbd", f"unix:{sock}", "--json"], stdout=out,
                                stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 30
        while not log.read_text().strip():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "serve did not start in 30 s"
            time.sleep(0.05)
        started = json.loads(log.read_text().splitlines()[0])
        assert set(started["exports"]) == set(points)
        yield sock
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    assert not sock.exists()


def uri(sock: Path, point: str) -> str:
    return f"nbd+unix:///{point}?socket={sock}"


@pytest.fixture(scope="module")
def point(tmp_path_factory: pytest.TempPathFactory) -> Point:
    root = tmp_path_factory.mktemp("serve")
    size = 96 * CS + 4321  # a last chunk that is not whole
    return make_point(root, size=size, seed=11)


def test_tools_read_the_point(tmp_path: Path, point: Point) -> None:
    require_tools("nbdinfo", "nbdcopy", "qemu-img")
    expected = tmp_path / "expected.raw"
    expected.write_bytes(point.content)
    with serving(tmp_path, point.repo, point.id) as sock:
        info = json.loads(subprocess.run(["nbdinfo", "--json", uri(sock, point.id)],
                                         capture_output=True, text=True, check=True).stdout)
        export = info["exports"][0]
        assert export["export-size"] == len(point.content)
        assert export["is_read_only"] is True and "base:allocation" in export["contexts"]
        mapped = json.loads(subprocess.run(["nbdinfo", "--map", "--json", uri(sock, point.id)],
                                           capture_output=True, text=True, check=True).stdout)
        holes = {i for e in mapped if e["type"] == 3
                 for i in range(e["offset"] // CS, -(-(e["offset"] + e["length"]) // CS))}
        assert holes == {i for i in range(-(-len(point.content) // CS))
                         if not any(point.chunk(i))}
        copy = tmp_path / "copy.raw"
        subprocess.run(["nbdcopy", uri(sock, point.id), str(copy)], check=True, timeout=120)
        assert copy.read_bytes() == point.content
        compared = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                                   str(expected), uri(sock, point.id)], capture_output=True,
                                  text=True, timeout=120)
        assert compared.returncode == 0, compared.stdout + compared.stderr
        converted = tmp_path / "copy.qcow2"
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", uri(sock, point.id),
                        str(converted)], check=True, timeout=120)
        compared = subprocess.run(["qemu-img", "compare", "-F", "raw", str(converted),
                                   str(expected)], capture_output=True, text=True)
        assert compared.returncode == 0, compared.stdout + compared.stderr


def test_a_write_is_refused_and_reads_go_on(tmp_path: Path, point: Point) -> None:
    with serving(tmp_path, point.repo, point.id) as sock:
        client = RawClient(str(sock), point.id, contexts=("base:allocation",))
        try:
            client.send(WRITE, 0, 4096, data=b"x" * 4096, cookie=1)
            reply = client.reply()
            assert reply.error == 1 and "read-only" in reply.message  # EPERM
            client.send(READ, CS - 100, 300, cookie=2)
            assert bytes(client.reply().data) == point.content[CS - 100 : CS + 200]
            client.send(READ, len(point.content) - 10, 20, cookie=3)
            assert client.reply().error == 22  # EINVAL: past the end
            client.send(BLOCK_STATUS, 0, len(point.content), cookie=4)
            status = client.reply().block_status
            assert sum(n for n, _ in next(iter(status.values()))) == len(point.content)
        finally:
            client.close()


def test_a_damaged_chunk_fails_its_read_and_names_it(tmp_path: Path) -> None:
    point = make_point(tmp_path, size=32 * CS, seed=12)
    unique = [i for i in point.data_chunks
              if sum(point.chunk(j) == point.chunk(i) for j in range(32)) == 1]
    bad, good = unique[1], unique[2]
    damage_chunk(point, bad)
    with serving(tmp_path, point.repo, point.id) as sock:
        client = RawClient(str(sock), point.id)
        try:
            for attempt in range(2):  # damaged, then in quarantine: an error both times
                client.send(READ, bad * CS + 512, 4096, cookie=10 + attempt)
                reply = client.reply()
                assert reply.error == 5, reply  # EIO
                assert f"chunk {bad} (offset {bad * CS}) of restore point {point.id}" \
                    in reply.message
                assert not any(reply.data)  # no bytes sent, none made up
            client.send(READ, good * CS, CS, cookie=20)
            assert bytes(client.reply().data) == point.chunk(good)
            client.send(READ, (bad - 1) * CS, 3 * CS, cookie=21)  # a read over it fails whole
            assert client.reply().error == 5
        finally:
            client.close()


def test_a_point_that_does_not_exist_is_a_clear_error(tmp_path: Path, point: Point) -> None:
    done = subprocess.run([sys.executable, "-m", "blocktrail.cli.main", "serve", str(point.repo),
                           point.id, "20200101T000000000Z-deadbeef", "--nbd",
                           f"unix:{tmp_path}/nbd.sock"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 5, done.stderr
    assert "no restore point '20200101T000000000Z-deadbeef'" in done.stderr
    assert not (tmp_path / "nbd.sock").exists()
    done = subprocess.run([sys.executable, "-m", "blocktrail.cli.main", "serve",
                           str(tmp_path / "none"), point.id, "--nbd",
                           f"unix:{tmp_path}/nbd.sock"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 6 and "not a blocktrail repository" in done.stderr


def test_a_point_in_an_s3_repository(s3_server: SeaweedFS, tmp_path: Path) -> None:
    """`serve s3://...` with the AWS environment variables, as every repository command."""
    require_tools("nbdcopy")
    content = point_bytes(40 * CS + 100, seed=13)
    url = s3_server.new_url("serve")
    with Disk.create(tmp_path / "disk", len(content)) as disk:
        disk.pwrite(content, 0)
        with Repository.init(url, s3=s3_server.options(), encryption=TEST_ENCRYPTION) as repo:
            point = run_backup(LocalDiskSource(disk), repo, BackupOptions()).point
    with serving(tmp_path, url, point.id, env=s3_server.env()) as sock:
        copy = tmp_path / "copy.raw"
        subprocess.run(["nbdcopy", uri(sock, point.id), str(copy)], check=True, timeout=120)
        assert copy.read_bytes() == content
