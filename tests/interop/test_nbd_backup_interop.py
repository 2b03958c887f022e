"""Backups of QEMU's own NBD exports (qemu-nbd -B and qemu-storage-daemon with bitmaps.0): our
client's reads and dirty context, then full and incremental backups through the CLI, restored
and compared with the image by qemu-img; no bitmap, or one the server lacks, gives a full backup
that says why."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from blocktrail.cli.main import main
from blocktrail.nbd.client import NbdClient
from hostproc import cli_in_process, require_tools

pytestmark = pytest.mark.interop
MiB = 1 << 20
CHUNK = 64 << 10
TOOLS = ("qemu-img", "qemu-io", "qemu-nbd", "qemu-storage-daemon")
SERVERS = ("qemu-nbd", "qemu-storage-daemon")


def _tools() -> None:
    require_tools(*TOOLS)


def qemu_io(image: Path, *commands: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    subprocess.run([*args, str(image)], check=True, capture_output=True, timeout=60)


@contextmanager
def exported(kind: str, image: Path, sock: Path,
             bitmap: str | None = "bm0") -> Iterator[str]:
    """``image`` served read-only as export "disk0" with the dirty bitmap ``bitmap`` (None:
    none)."""
    if kind == "qemu-nbd":
        args = ["qemu-nbd", "-t", "-r", "-f", "qcow2", "-x", "disk0",
                *(["-B", bitmap] if bitmap else []), "-k", str(sock), str(image)]
    else:
        bitmaps = f",bitmaps.0={bitmap}" if bitmap else ""
        args = ["qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=file0,filename={image},read-only=on",
                "--blockdev", "driver=qcow2,node-name=disk0,file=file0,read-only=on",
                "--nbd-server", f"addr.type=unix,addr.path={sock}",
                "--export", f"type=nbd,id=exp0,node-name=disk0,name=disk0{bitmaps}"]
    server = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{kind} did not start: {server.communicate()[1]}")
            time.sleep(0.02)
        yield f"nbd+unix:///disk0?socket={sock}"
    finally:
        server.terminate()
        server.wait(timeout=20)
        sock.unlink(missing_ok=True)


cli = cli_in_process


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A 64 MiB qcow2 image with data, and the bitmap bm0 added after some of it."""
    _tools()
    path = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    qemu_io(path, "write -P 0x11 0 8M", "write -P 0x12 30M 2M")
    subprocess.run(["qemu-img", "bitmap", "--add", str(path), "bm0"], check=True)
    return path


@pytest.mark.parametrize("kind", SERVERS)
def test_client_reads_data_allocation_and_the_dirty_bitmap(kind: str, image: Path,
                                                           tmp_path: Path) -> None:
    qemu_io(image, "write -P 0x22 40M 192k")

    async def check(uri: str) -> None:
        contexts = ["base:allocation", "qemu:dirty-bitmap:bm0"]
        async with await NbdClient.connect(uri, contexts=contexts) as client:
            assert client.size_bytes == 64 * MiB and client.is_read_only()
            assert sorted(client.contexts) == contexts
            data, zeros = await asyncio.gather(client.pread(8 * MiB, 0),
                                               client.pread(MiB, 10 * MiB))
            assert data == b"\x11" * (8 * MiB) and zeros == bytes(MiB)
            assert await client.pread(192 << 10, 40 * MiB) == b"\x22" * (192 << 10)
            dirty = [(o, n) for o, n, f in await client.extents(contexts[1]) if f & 1]
            assert dirty == [(40 * MiB, 192 << 10)]
            holes = [(o, n) for o, n, f in await client.extents(contexts[0]) if f & 1]
            assert (8 * MiB, 22 * MiB) in holes

    with exported(kind, image, tmp_path / "nbd.sock") as uri:
        asyncio.run(check(uri))


@pytest.mark.parametrize("kind", SERVERS)
def test_full_then_incremental_from_the_bitmap_restores_the_image(
        kind: str, image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo, sock = str(tmp_path / "repo"), tmp_path / "nbd.sock"
    cli(capsys, "repo", "init", repo)
    with exported(kind, image, sock) as uri:
        full = cli(capsys, "backup", uri, "--bitmap", "bm0", "--repo", repo)
    assert full["kind"] == "full" and full["bytes_read"] == 10 * MiB  # allocated areas only
    assert full["point"]["change_id"] == "qemu:dirty-bitmap:bm0"  # type: ignore[index]
    # after the full backup: new data, zeros over data, a discarded (now a hole) area
    qemu_io(image, "write -P 0x33 40M 1M", "write -P 0x34 50M 4k", "write -z 0 64k",
            "discard 30M 1M")
    changed = MiB + CHUNK + CHUNK + MiB  # 4 KiB dirties one 64 KiB granule
    with exported(kind, image, sock) as uri:
        inc = cli(capsys, "backup", uri, "--bitmap", "bm0", "--repo", repo)
        assert inc["kind"] == "incremental" and inc["fallback_reason"] is None
        assert changed <= inc["bytes_read"] <= changed + 4 * CHUNK  # type: ignore[operator]
        point = inc["point"]["id"]  # type: ignore[index]
        verdict = cli(capsys, "verify", repo, point, "--against", uri)
        assert verdict["identical"]
    restored = tmp_path / "restored.raw"
    cli(capsys, "restore", repo, point, "--to", str(restored))
    compare = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(restored),
                              str(image)], capture_output=True, text=True, timeout=60)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    assert restored.read_bytes()[30 * MiB : 31 * MiB] == bytes(MiB)  # the discarded area


@pytest.mark.parametrize("kind", SERVERS)
def test_a_point_taken_before_the_bitmap_existed_is_no_base_for_it(
        kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--bitmap bm0 against an export without bm0: the full point must not claim bm0, or
    the first backup once bm0 exists would be an incremental that misses the writes made
    before bm0 was added."""
    _tools()
    image, sock, repo = tmp_path / "disk.qcow2", tmp_path / "nbd.sock", str(tmp_path / "repo")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    qemu_io(image, "write -P 0x11 0 1M")
    cli(capsys, "repo", "init", repo)
    with exported(kind, image, sock, bitmap=None) as uri:
        first = cli(capsys, "backup", uri, "--bitmap", "bm0", "--repo", repo)
    assert first["kind"] == "full"
    assert first["point"]["change_id"] == "nbd:no-dirty-bitmap"  # type: ignore[index]
    qemu_io(image, "write -P 0x22 2M 64k")  # before the bitmap exists: it never sees this
    subprocess.run(["qemu-img", "bitmap", "--add", str(image), "bm0"], check=True)
    qemu_io(image, "write -P 0x33 3M 64k")
    with exported(kind, image, sock) as uri:
        second = cli(capsys, "backup", uri, "--bitmap", "bm0", "--repo", repo)
    assert second["kind"] == "full"
    assert "backed up without a dirty bitmap" in str(second["fallback_reason"])
    assert second["point"]["change_id"] == "qemu:dirty-bitmap:bm0"  # type: ignore[index]
    restored = tmp_path / "restored.raw"
    cli(capsys, "restore", repo, second["point"]["id"], "--to", str(restored))  # type: ignore[index]
    compare = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(restored),
                              str(image)], capture_output=True, text=True, timeout=60)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    qemu_io(image, "write -P 0x44 4M 64k")
    with exported(kind, image, sock) as uri:
        third = cli(capsys, "backup", uri, "--bitmap", "bm0", "--repo", repo)
    assert third["kind"] == "incremental" and third["fallback_reason"] is None
    subprocess.run(["qemu-img", "bitmap", "--add", str(image), "bm1"], check=True)  # rotated
    qemu_io(image, "write -P 0x55 5M 64k")
    with exported(kind, image, sock, bitmap="bm1") as uri:
        fourth = cli(capsys, "backup", uri, "--bitmap", "bm1", "--repo", repo)
    assert fourth["kind"] == "incremental" and fourth["chunks_read"] == 1


@pytest.mark.parametrize("kind", SERVERS)
def test_without_a_usable_bitmap_the_backup_is_full_and_says_why(
        kind: str, image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo, sock = str(tmp_path / "repo"), tmp_path / "nbd.sock"
    cli(capsys, "repo", "init", repo)
    with exported(kind, image, sock) as uri:
        cli(capsys, "backup", uri, "--repo", repo, "--disk-id", "vm1-disk0")
        plain = cli(capsys, "backup", uri, "--repo", repo, "--disk-id", "vm1-disk0")
        assert plain["kind"] == "full"
        assert "no dirty bitmap was named" in str(plain["fallback_reason"])
        other = cli(capsys, "backup", uri, "--repo", repo, "--disk-id", "vm1-disk0",
                    "--bitmap", "bm1")
        assert other["kind"] == "full"
        assert "did not agree to qemu:dirty-bitmap:bm1" in str(other["fallback_reason"])
        assert main(["backup", uri, "--repo", repo, "--disk-id", "vm1-disk0"]) == 0
        assert "full, because change ID" in capsys.readouterr().out
    points = main(["points", repo, "--json"])
    listed = json.loads(capsys.readouterr().out)
    assert points == 0 and {p["disk_id"] for p in listed} == {"vm1-disk0"}


@contextmanager
def nbdkit_eval(sock: Path, *scripts: str) -> Iterator[str]:
    """nbdkit's eval plugin on ``sock``, with the shell ``scripts`` (key=script)."""
    require_tools("nbdkit")
    server = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "eval", *scripts],
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"nbdkit did not start: {server.communicate()[1]}")
            time.sleep(0.02)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_a_hole_not_reported_as_zeros_is_read_and_restored_as_its_data(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """NBD_STATE_HOLE without NBD_STATE_ZERO: the contents are undefined, not zeros."""
    repo = str(tmp_path / "repo")
    cli(capsys, "repo", "init", repo)
    with nbdkit_eval(tmp_path / "nbd.sock", "get_size=echo 4M",
                     """pread=head -c $3 /dev/zero | tr '\\0' Z""",
                     "can_extents=exit 0", "extents=echo 0 4M hole") as uri:
        full = cli(capsys, "backup", uri, "--repo", repo, "--disk-id", "holes")
    assert full["kind"] == "full" and full["bytes_read"] == 4 * MiB
    restored = tmp_path / "restored.raw"
    cli(capsys, "restore", repo, full["point"]["id"], "--to", str(restored))  # type: ignore[index]
    assert restored.read_bytes() == b"Z" * (4 * MiB)
