"""A VM of two disks on our host: a real guest keeps an ext4 on each, and the VM's snapshots
(both disks at one instant) back up into restore points that belong together. Between rounds
both restore to the same round; in the middle of a loop that bumps a counter on one disk, then
the other (each write synced before the next), the restored pair shows the same counter or the
first disk one ahead, never anything else. Two snapshots of the disks taken one after the other
during the loop break that rule: the check would notice a VM snapshot that is not atomic."""

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
DISK_BYTES = 32 * MiB
DISKS = ("d0", "d1")

# The counter loop, in the background: d0's counter, synced, then d1's, synced, and the number
# of iterations done in /tmp/count. In the foreground (a blocking read: busybox's `read -t`
# puts the console in non-canonical mode and may return half a line), "mark" asks for that
# number and "stop" ends the loop.
COUNTER_LOOP = r"""
(
    set -e
    i=0
    while [ ! -e /tmp/stop ]; do
        i=$((i + 1))
        printf '%012d\n' $i | dd of=/mnt/d0/counter bs=13 count=1 conv=notrunc,fsync 2>/dev/null
        printf '%012d\n' $i | dd of=/mnt/d1/counter bs=13 count=1 conv=notrunc,fsync 2>/dev/null
        echo $i > /tmp/count.new && mv /tmp/count.new /tmp/count
        [ $i -ne 1 ] || bt_say LOOPING
    done
) || bt_say FAIL "the counter loop failed" &
loop=$!
while read -r answer; do
    case "$answer" in
        mark) bt_say MARKED "$(cat /tmp/count)" ;;
        stop) touch /tmp/stop; wait $loop; break ;;
        *) bt_fail "expected stop or mark, got '$answer'" ;;
    esac
done
bt_say LOOPED "$(cat /tmp/count)"
umount /mnt/d0
umount /mnt/d1
"""


def test_a_vm_snapshot_backs_up_its_disks_at_one_instant(tmp_path: Path) -> None:
    started = time.monotonic()
    kit = require_kit()
    host = HostProcess(tmp_path / "host")
    host.start()
    try:
        repo = tmp_path / "repo"
        cli("repo", "init", str(repo))
        for disk in DISKS:
            host.call("POST", "/disks", json={"name": disk, "size_bytes": DISK_BYTES})
        host.call("POST", "/vms", json={"name": "vm0", "disks": list(DISKS)})
        fs = [Fs(disk, f"/mnt/{disk}", RoundPlan(seed=3 + i, round_bytes=MiB))
              for i, disk in enumerate(DISKS)]
        script = "".join(make_and_mount(disk, f"/mnt/{disk}") for disk in DISKS) \
            + "".join(writer_round(n, fs) for n in (1, 2, 3)) + COUNTER_LOOP
        drives = [Drive.nbd(disk, host.nbd_socket, disk) for disk in DISKS]
        with Guest(kit, tmp_path, drives, script, name="writer") as writer:
            writer.expect("READY", 120)
            await_round(writer)
            writer.send("go")
            between = await_round(writer)
            taken = host.call("POST", "/vms/vm0/snapshots", json={"name": "between"})
            assert sorted(taken["snapshots"]) == list(DISKS)
            writer.send("go")
            third = await_round(writer)
            writer.send("go")
            writer.expect("LOOPING", 60)
            time.sleep(0.5)
            host.call("POST", "/vms/vm0/snapshots", json={"name": "busy"})
            # The control: d0, then d1 once the loop has written d1 twice since d0's snapshot
            # (when "mark" is read the loop may have written d0 once more than it counted).
            host.call("POST", "/disks/d0/snapshots", json={"name": "apart"})
            after_d0 = mark(writer)
            while mark(writer) < after_d0 + 3:
                pass
            host.call("POST", "/disks/d1/snapshots", json={"name": "apart"})
            writer.send("stop")
            final = int(writer.expect("LOOPED", 60)[0].text)
            writer.finish(60)
        backups = {(disk, snap): backup_snapshot(host, repo, disk, snap)
                   for snap in ("between", "busy", "apart") for disk in DISKS}
        host.call("DELETE", "/vms/vm0/snapshots/between")
        host.call("DELETE", "/vms/vm0/snapshots/busy")
    finally:
        host.stop()

    for disk in DISKS:
        assert backups[(disk, "between")].kind == "full"
        for snap in ("busy", "apart"):
            later = backups[(disk, snap)]
            assert (later.kind, later.fallback_reason) == ("incremental", None)
    images = {key: restore(repo, b.point.id, tmp_path / f"{key[1]}-{key[0]}.raw")
              for key, b in backups.items()}
    expected = [Expectation(f"between-{disk}", images[(disk, "between")],
                            between.manifests[disk], 2) for disk in DISKS]
    # During the loop the files are as round 3 left them, and the counters are read.
    expected += [Expectation(f"{snap}-{disk}", images[(disk, snap)], third.manifests[disk], 3,
                             show=("./round", "./counter"))
                 for snap in ("busy", "apart") for disk in DISKS]
    shown = check_images(kit, tmp_path, expected)
    assert shown["between-d0"]["./round"] == shown["between-d1"]["./round"] == "2"
    busy = int(shown["busy-d0"]["./counter"]), int(shown["busy-d1"]["./counter"])
    assert busy[0] - busy[1] in (0, 1), busy  # d0 is written first
    assert busy[1] >= 1 and busy[0] <= final, (busy, final)
    apart = int(shown["apart-d0"]["./counter"]), int(shown["apart-d1"]["./counter"])
    assert apart[0] <= after_d0 + 1 and apart[1] >= after_d0 + 3, (apart, after_d0)
    print(f"counters: VM snapshot {busy}, snapshots one after the other {apart} (the loop ended "
          f"at {final}); {time.monotonic() - started:.1f} s")


def mark(writer: Guest) -> int:
    """The loop's count of finished iterations, asked for now (from the guest's side: later
    than anything the test did before)."""
    writer.send("mark")
    return int(writer.expect("MARKED", 60)[0].text)
