"""A real Linux guest writes a journalled ext4 on a disk of our host, over NBD, in rounds; the
test snapshots the disk between rounds and backs every snapshot up incrementally while the
guest writes the next round (consolidating the previous snapshot under those writes). Every
restore point boots in a second guest, which finds exactly the files the writer reported at
that round, and passes e2fsck."""

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
ROUNDS = 4


def test_rounds_of_a_real_file_system_back_up_incrementally_and_restore_exactly(
        tmp_path: Path) -> None:
    started = time.monotonic()
    kit = require_kit()
    host = HostProcess(tmp_path / "host")
    host.start()
    try:
        repo = tmp_path / "repo"
        cli("repo", "init", str(repo))
        host.call("POST", "/disks", json={"name": "d0", "size_bytes": DISK_BYTES})
        fs = [Fs("d0", "/mnt/d0", RoundPlan(seed=1))]
        script = make_and_mount("d0", "/mnt/d0") + "".join(
            writer_round(n, fs, sync_each=True) for n in range(1, ROUNDS + 1)) \
            + "umount /mnt/d0\n"
        points, overlapped = [], []
        with Guest(kit, tmp_path, [Drive.nbd("d0", host.nbd_socket, "d0")], script,
                   name="writer") as writer:
            writer.expect("READY", 120)
            for n in range(1, ROUNDS + 1):
                report = await_round(writer)
                assert report.number == n
                cli("snapshot", "create", "d0", f"round-{n}", "--host", host.endpoint)
                writer.send("go")
                # under the next round's writes: the previous snapshot merged away, a backup
                if n > 1:
                    host.call("DELETE", f"/disks/d0/snapshots/round-{n - 1}")
                backup = backup_snapshot(host, repo, "d0", f"round-{n}")
                overlapped.append(not writer.said("ROUND", str(n + 1)))
                points.append((report, backup))
            writer.finish(120)
        cli("snapshot", "remove", "d0", f"round-{ROUNDS}", "--host", host.endpoint)
    finally:
        host.stop()

    assert any(overlapped[1:-1]), "no removal and backup ran while the guest wrote a round"
    kinds = [(b.kind, b.fallback_reason) for _, b in points[1:]]
    assert points[0][1].kind == "full"
    assert kinds == [("incremental", None)] * (ROUNDS - 1), kinds
    for _, backup in points[1:]:
        assert backup.bytes_read < DISK_BYTES // 8, backup.bytes_read
        assert backup.audit.tracker_trusted
    expected = [
        Expectation(f"r{report.number}", restore(repo, backup.point.id,
                                                 tmp_path / f"restored-{report.number}.raw"),
                    report.manifests["d0"], report.number)
        for report, backup in points]
    shown = check_images(kit, tmp_path, expected)
    assert {serial: files["./round"] for serial, files in shown.items()} == {
        f"r{n}": str(n) for n in range(1, ROUNDS + 1)}
    print(f"bytes read per backup: {[b.bytes_read for _, b in points]}; under the guest's "
          f"writes: {overlapped}; "
          f"{time.monotonic() - started:.1f} s")
