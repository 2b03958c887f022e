"""Instant restore on a real host, read and written by QEMU's tools over NBD: the disk equals
the point (qemu-img compare with a plain restore) before, during and after its fill, under
guest-style reads and writes; a host SIGKILLed mid-fill resumes it; a damaged chunk fails the
reads of its area with EIO and names itself (nothing wrong is ever returned) while the rest
reads and fills; an unreachable repository fails what is not fetched yet, and the fill goes on
once it is back; the first backup after an instant restore is an incremental that reads only
what the guest wrote, and restores equal to the disk."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blocktrail.errors import InvalidArgument
from hostproc import require_tools
from instantkit import (
    CS,
    GuestLoad,
    HostProcess,
    Point,
    QemuIo,
    damage_chunk,
    make_point,
    qemu_img_compare,
    qemu_io_once,
    store_again,
)
from nbdraw import READ, RawClient

pytestmark = pytest.mark.interop
MiB = 1 << 20


def unique_chunks(point: Point) -> list[int]:
    """Data chunks whose content is stored for no other chunk."""
    count = -(-len(point.content) // CS)
    return [i for i in point.data_chunks
            if sum(point.chunk(j) == point.chunk(i) for j in range(count)) == 1]


def identical(image: Path, uri: str, **window: int) -> None:
    done = qemu_img_compare(image, uri, **window)
    assert done.returncode == 0, done.stdout + done.stderr


def test_content_before_during_and_after_the_fill_under_guest_io(tmp_path: Path) -> None:
    require_tools("qemu-io", "qemu-img")
    point = make_point(tmp_path / "src", size=16 * MiB, seed=31)
    plain = tmp_path / "plain.raw"  # a plain restore of the point
    subprocess.run([sys.executable, "-m", "blocktrail.cli.main", "restore", str(point.repo),
                    point.id, "--to", str(plain)], check=True, timeout=120)
    assert plain.read_bytes() == point.content
    with HostProcess(tmp_path / "host") as host:
        host.restore(point, paused=True)
        uri = host.uri("r0")
        # before the fill (nothing local): the last quarter, fetched as it is compared
        identical(plain, uri, offset=12 * MiB, size=4 * MiB)
        status = host.restore_status()
        assert status["summary"].startswith("filling ") and status["local_chunks"] > 0
        assert status["local_chunks"] < status["chunks"] // 3
        expected = bytearray(point.content)
        load = GuestLoad(uri, expected, seed=32)
        load.start()
        host.call("POST", "/disks/r0/fill", json={"paused": False,
                                                  "rate_bytes_per_second": 2 * MiB})
        try:
            # during the fill: the first half (part filled, part fetched by the compare)
            host.wait_restore(lambda s: s["percent"] >= 20)
            load.hold()
            # held where it is (a compare on a loaded machine may take longer than the fill)
            host.call("POST", "/disks/r0/fill", json={"paused": True})
            during = host.restore_status()
            assert during["state"] == "paused" and during["percent"] < 100
            current = tmp_path / "current.raw"
            current.write_bytes(expected)
            identical(current, uri, offset=0, size=8 * MiB)
            load.go_on()
            host.call("POST", "/disks/r0/fill", json={"paused": False,
                                                      "rate_bytes_per_second": None})
            host.wait_local()
            time.sleep(0.3)  # guest I/O after the switch, on the local base
            load.hold()
        finally:
            load.stop()
        assert not load.io.errors, load.io.errors
        assert load.commands > 20
        current.write_bytes(expected)
        identical(current, uri)  # after the fill


def test_a_host_killed_mid_fill_resumes_it(tmp_path: Path) -> None:
    require_tools("qemu-io", "qemu-img")
    point = make_point(tmp_path / "src", size=16 * MiB, seed=33)
    host = HostProcess(tmp_path / "host").start()
    try:
        host.restore(point, rate_bytes_per_second=2 * MiB)
        io = QemuIo(host.uri("r0"))
        io.run(f"write -f -P 0x5c {3 * MiB + 4096} 8192")
        io.close()
        assert not io.errors, io.errors
        before = host.wait_restore(lambda s: s["percent"] >= 30)
        host.kill()
        host.start()
        after = host.wait_restore(lambda s: s["state"] != "paused" or "by request" in
                                  (s["paused"] or ""))
        assert after["state"] in ("filling", "local")
        host.wait_local()
        expected = bytearray(point.content)
        expected[3 * MiB + 4096 : 3 * MiB + 12288] = b"\x5c" * 8192
        image = tmp_path / "expected.raw"
        image.write_bytes(expected)
        identical(image, host.uri("r0"))
        log = host.log.read_text()
        assert "disk r0: filling its restore" in log and "its restore is complete" in log
        assert before["local_chunks"] > 0 and before["percent"] < 100
    finally:
        host.stop()


def test_a_damaged_chunk_fails_its_reads_and_names_itself(tmp_path: Path) -> None:
    require_tools("qemu-io")
    point = make_point(tmp_path / "src", size=64 * CS, seed=34)
    unique = unique_chunks(point)
    bad, good = unique[3], unique[4]
    damage_chunk(point, bad)
    with HostProcess(tmp_path / "host") as host:
        host.restore(point, paused=True)
        client = RawClient(str(host.nbd_socket), "r0")
        try:
            for cookie in (1, 2):  # damaged, then in quarantine: EIO both times
                client.send(READ, bad * CS + 1000, 4096, cookie=cookie)
                reply = client.reply()
                assert reply.error == 5, reply
                assert f"chunk {bad} (offset {bad * CS}) of restore point {point.id}" \
                    in reply.message
                assert not any(reply.data)  # no bytes at all were sent
            client.send(READ, good * CS, CS, cookie=3)
            reply = client.reply()
            assert reply.error == 0 and bytes(reply.data) == point.chunk(good)
        finally:
            client.close()
        out = qemu_io_once(host.uri("r0"), f"read {bad * CS} 4096")
        assert "read failed: Input/output error" in out, out
        status = host.restore_status()
        assert f"chunk {bad} " in status["last_error"]
        assert point.id in status["last_error"]
        host.call("POST", "/disks/r0/fill", json={"paused": False})
        stuck = host.wait_restore(lambda s: s["local_chunks"] == s["chunks"] - 1
                                  and s["state"] == "paused" and s["retry_in_s"] is not None)
        assert f"chunk {bad} " in stuck["paused"] and "trying again" in stuck["paused"]
        assert stuck["summary"].startswith("filling 9")
        log = host.log.read_text()
        assert f"chunk {bad} (offset {bad * CS}) of restore point {point.id}" in log
        assert "the fill of its restore pauses" in log
        store_again(point, bad)  # a later backup stored that content again
        host.call("POST", "/disks/r0/fill", json={})  # try again now
        host.wait_local(timeout_s=30)
        image = tmp_path / "expected.raw"
        image.write_bytes(point.content)
        identical(image, host.uri("r0"))


def test_an_unreachable_repository_mid_fill(tmp_path: Path) -> None:
    require_tools("qemu-io", "qemu-img")
    point = make_point(tmp_path / "src", size=128 * CS, seed=35)
    unique = unique_chunks(point)
    with HostProcess(tmp_path / "host") as host:
        host.restore(point, rate_bytes_per_second=16 * CS)
        host.wait_restore(lambda s: s["local_chunks"] >= 8)
        host.call("POST", "/disks/r0/fill", json={"paused": True})
        away = tmp_path / "away"
        point.repo.rename(away)
        fetched, missing = unique[0], unique[-1]  # the fill goes in order from the start
        out = qemu_io_once(host.uri("r0"), f"read {fetched * CS} {CS}")
        assert f"read {CS}/{CS} bytes" in out, out
        out = qemu_io_once(host.uri("r0"), f"read {missing * CS} 4096")
        assert "read failed: Input/output error" in out, out
        host.call("POST", "/disks/r0/fill", json={"paused": False})
        paused = host.wait_restore(lambda s: s["retry_in_s"] is not None)
        assert "unreachable" in paused["paused"] and point.id in paused["last_error"]
        held = paused["local_chunks"]
        time.sleep(1.0)
        assert host.restore_status()["local_chunks"] == held
        away.rename(point.repo)
        host.call("POST", "/disks/r0/fill", json={"rate_bytes_per_second": None})
        host.wait_local(timeout_s=60)
        image = tmp_path / "expected.raw"
        image.write_bytes(point.content)
        identical(image, host.uri("r0"))


def test_the_first_backup_after_an_instant_restore_is_incremental(tmp_path: Path) -> None:
    require_tools("qemu-io", "qemu-img")
    point = make_point(tmp_path / "src", size=8 * MiB, seed=36)
    with HostProcess(tmp_path / "host") as host:
        def cli(*args: str) -> dict[str, object]:
            done = subprocess.run([sys.executable, "-m", "blocktrail.cli.main", *args,
                                   "--json"], capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stdout + done.stderr
            answer = json.loads(done.stdout)
            assert isinstance(answer, dict)
            return answer

        restored = cli("restore", str(point.repo), point.id, "--instant", "--host",
                       host.endpoint, "--disk", "r0", "--fill-rate", "256K")
        assert restored["disk_id"] == point.disk_id
        # the guest writes 4 KiB in chunk 5, 100 KiB over chunks 10-11, 64 KiB in chunk 20
        io = QemuIo(host.uri("r0"))
        for command in (f"write -f -P 0x11 {5 * CS + 8192} 4096",
                        f"write -f -P 0x22 {10 * CS + 30000} 100000",
                        f"write -f -P 0x33 {20 * CS} {CS}"):
            io.run(command)
        io.close()
        assert not io.errors, io.errors
        backup = cli("backup", "r0", "--host", host.endpoint, "--repo", str(point.repo))
        assert backup["kind"] == "incremental" and backup["fallback_reason"] is None
        assert backup["point"]["parent"] == point.id  # type: ignore[index]
        assert backup["chunks_read"] == 4 and backup["bytes_read"] == 4 * CS
        assert backup["audit"]["tracker_trusted"] is True  # type: ignore[index]
        new_point = str(backup["point"]["id"])  # type: ignore[index]
        image = tmp_path / "incremental.raw"
        cli("restore", str(point.repo), new_point, "--to", str(image))
        identical(image, host.uri("r0"))
        if host.restore_status()["state"] != "local":
            try:  # the reads above fetched every chunk: the fill may have ended meanwhile
                host.call("POST", "/disks/r0/fill", json={"rate_bytes_per_second": None})
            except InvalidArgument as exc:
                assert "is local" in exc.message, exc.message
        host.wait_local()
        second = cli("backup", "r0", "--host", host.endpoint, "--repo", str(point.repo))
        assert second["kind"] == "incremental" and second["bytes_read"] == 0
        identical(image, host.uri("r0"))
