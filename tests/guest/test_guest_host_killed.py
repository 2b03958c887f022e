"""The host is SIGKILLed under a running guest that writes (and syncs) an ext4 over NBD, then
started again on the same data directory. QEMU's NBD client reconnects, the guest finishes its
rounds and its own checks (caches dropped, every round's manifest read back from the disk), and
the next backup, incremental if the tracker can vouch for the crash and full with the reason
otherwise, restores to exactly what the guest wrote."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from guestvm import Drive, Guest, require_kit
from guestwork import (
    Expectation,
    Fs,
    HostProcess,
    MiB,
    RoundPlan,
    await_round,
    backup_snapshot,
    check_images,
    cli,
    make_and_mount,
    restore,
    writer_round,
)

pytestmark = [pytest.mark.guest, pytest.mark.interop]
DISK_BYTES = 64 * MiB
KILLED_AFTER_OP = 3  # the host dies once round 2's third operation is synced

SELF_CHECK = """
cd /mnt/d0
sync
echo 3 > /proc/sys/vm/drop_caches
for manifest in manifests/round-*.sha256; do
    sha256sum -c -s "$manifest" || bt_fail "the guest's own check of $manifest failed"
    bt_say SELFCHECKED "$manifest"
done
cd /
umount /mnt/d0
"""


def test_the_host_killed_under_a_writing_guest(tmp_path: Path) -> None:
    started = time.monotonic()
    kit = require_kit()
    host = HostProcess(tmp_path / "host")
    host.start()
    try:
        repo = tmp_path / "repo"
        cli("repo", "init", str(repo))
        host.call("POST", "/disks", json={"name": "d0", "size_bytes": DISK_BYTES})
        # Rounds change only their own files: what round 1 wrote must survive as it was.
        fs = [Fs("d0", "/mnt/d0", RoundPlan(seed=2, round_bytes=3 * MiB, touch_earlier=False))]
        script = make_and_mount("d0", "/mnt/d0") + writer_round(1, fs) \
            + writer_round(2, fs, sync_each=True) + writer_round(3, fs) + SELF_CHECK
        drive = Drive.nbd("d0", host.nbd_socket, "d0", reconnect_delay_s=60)
        with Guest(kit, tmp_path, [drive], script, name="writer") as writer:
            writer.expect("READY", 120)
            first = await_round(writer)
            before = cli("backup", "d0", "--host", host.endpoint, "--repo", str(repo))
            assert before["kind"] == "full"
            writer.send("go")

            writer.expect("WRITING", 60)
            while writer.expect("SYNCED", 60)[0].text != f"2 {KILLED_AFTER_OP}":
                pass
            host.kill()  # the guest goes on writing round 2: QEMU holds its requests
            time.sleep(1.0)
            host.start()
            killed_at = time.monotonic()

            second = await_round(writer, timeout_s=180)
            reconnected_s = time.monotonic() - killed_at
            writer.send("go")
            third = await_round(writer)
            cli("snapshot", "create", "d0", "after", "--host", host.endpoint)
            writer.send("go")
            after = backup_snapshot(host, repo, "d0", "after")
            verdict = cli("verify", str(repo), after.point.id, "--against", "d0@after",
                               "--host", host.endpoint)
            messages = writer.finish(120)
        cli("snapshot", "remove", "d0", "after", "--host", host.endpoint)
    finally:
        host.stop()

    assert (first.number, second.number, third.number) == (1, 2, 3)
    selfchecked = [m.text for m in messages if m.tag == "SELFCHECKED"]
    assert selfchecked == [f"manifests/round-{n}.sha256" for n in (1, 2, 3)]
    # Everything round 1 wrote and synced before the kill is still there, unchanged.
    for path, digest in first.manifests["d0"].items():
        if path.startswith("./data/"):
            assert third.manifests["d0"].get(path) == digest, path
    # Incremental only if the tracker vouches for the crash; full otherwise, and it says why.
    if after.kind == "incremental":
        assert after.fallback_reason is None
        assert after.bytes_read < DISK_BYTES // 2
    else:
        assert after.kind == "full" and after.fallback_reason
    assert after.audit.tracker_trusted
    assert verdict["identical"], verdict
    image = restore(repo, after.point.id, tmp_path / "restored.raw")
    check_images(kit, tmp_path, [Expectation("after", image, third.manifests["d0"], 3)])
    print(f"after the kill: {after.kind} backup ({after.fallback_reason}), read "
          f"{after.bytes_read} B; round 2 done {reconnected_s:.1f} s after the restart; "
          f"{time.monotonic() - started:.1f} s")
