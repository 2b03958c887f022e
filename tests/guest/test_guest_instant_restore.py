"""A real guest boots from an instantly restored disk: a writer guest makes an ext4 with a
round of files and a manifest of their sha256 on a disk of our host; the disk is backed up;
the point is restored instantly into a new disk with its fill paused (everything read comes
from the repository on demand); a second guest mounts that disk over NBD, finds every file
with its sha256 (`sha256sum -c`) and writes a file of its own. Then the fill completes, and
the disk still checks out (e2fsck, and the guest's file)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from guestvm import Drive, Guest, e2fsck, require_kit, sums
from guestwork import (
    CHECK_SCRIPT,
    Fs,
    HostProcess,
    MiB,
    RoundPlan,
    await_round,
    backup_snapshot,
    cli,
    make_and_mount,
    writer_round,
)

pytestmark = [pytest.mark.guest, pytest.mark.interop]
DISK_BYTES = 48 * MiB


def test_a_guest_boots_from_an_instantly_restored_disk(tmp_path: Path) -> None:
    kit = require_kit()
    host = HostProcess(tmp_path / "host")
    host.start()
    try:
        repo = tmp_path / "repo"
        cli("repo", "init", str(repo))
        host.call("POST", "/disks", json={"name": "d0", "size_bytes": DISK_BYTES})
        fs = [Fs("d0", "/mnt/d0", RoundPlan(seed=7))]
        script = make_and_mount("d0", "/mnt/d0") + writer_round(1, fs) + "umount /mnt/d0\n"
        with Guest(kit, tmp_path, [Drive.nbd("d0", host.nbd_socket, "d0")], script,
                   name="writer") as writer:
            report = await_round(writer)
            writer.send("go")
            writer.finish(120)
        cli("snapshot", "create", "d0", "s1", "--host", host.endpoint)
        point = backup_snapshot(host, repo, "d0", "s1").point

        started = time.monotonic()
        restored = host.call("POST", "/disks/restore", json={
            "name": "r0", "repository": str(repo), "point": point.id,
            "fill": {"paused": True}})  # all the guest reads comes from the repository
        assert restored["restore"]["state"] == "paused"
        manifest = report.manifests["d0"]
        files = {"expect/d0.sha256": "".join(
                     f"{digest}  {path}\n" for path, digest in sorted(manifest.items())).encode(),
                 "expect/d0.newest": b"round-1.sha256\n", "expect/d0.show": b"./round\n"}
        script = CHECK_SCRIPT + """
dev=$(bt_disk d0)
mount -t ext4 "$dev" /mnt/d0
echo restored-and-written > /mnt/d0/after-restore
sync
umount /mnt/d0
bt_say WROTE after-restore
"""
        with Guest(kit, tmp_path, [Drive.nbd("d0", host.nbd_socket, "r0")], script,
                   files=files, name="restored") as guest:
            first = guest.message(120)
            first_line_s = time.monotonic() - started
            messages = [first, *guest.finish(180)]
        found = sums(messages).get("d0", {})
        assert found == manifest
        assert any(m.tag == "CHECKED" and m.text == "d0" for m in messages), messages
        assert any(m.tag == "WROTE" for m in messages), messages
        during = host.call("GET", "/disks/r0")["restore"]
        assert during["state"] == "paused" and during["percent"] < 100, during
        host.call("POST", "/disks/r0/fill", json={"paused": False})
        deadline = time.monotonic() + 120
        while host.call("GET", "/disks/r0")["restore"]["state"] != "local":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        image = tmp_path / "r0.raw"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw",
                        f"nbd+unix:///r0?socket={host.nbd_socket}", str(image)], check=True,
                       timeout=120)
    finally:
        host.stop()
    result = e2fsck(kit, image, "-fn")
    assert result.returncode == 0, result.stdout + result.stderr
    dumped = subprocess.run([str(kit.e2fsck).replace("e2fsck", "debugfs"), "-R",
                             "cat /after-restore", str(image)], capture_output=True, text=True,
                            timeout=60)
    if dumped.returncode == 0 and dumped.stdout:
        assert dumped.stdout.strip() == "restored-and-written"
    print(f"first line of the restored guest's output {first_line_s:.1f} s after the "
          f"instant restore began; {during['percent']}% filled then")
