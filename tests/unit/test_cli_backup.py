"""The backup commands: JSON shapes and exit codes (13 verify differences, 12 damaged)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from blocktrail.cli.main import main
from blocktrail.disk import Disk
from blocktrail.fileio import OsFileIO


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, object]:
    code = main([*args, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else None


@pytest.fixture
def disk_and_repo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    disk_dir, repo_dir = str(tmp_path / "vm1"), str(tmp_path / "repo")
    with Disk.create(disk_dir, 8 << 20) as disk:
        disk.pwrite(os.urandom(3 << 20), 1 << 20)
    assert run(capsys, "repo", "init", repo_dir)[0] == 0
    return disk_dir, repo_dir


def test_backup_points_restore_verify(disk_and_repo: tuple[str, str], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    disk_dir, repo_dir = disk_and_repo
    code, full = run(capsys, "backup", disk_dir, "--repo", repo_dir)
    assert code == 0 and full["kind"] == "full"  # type: ignore[index]
    with Disk.open(disk_dir) as disk:
        disk.pwrite(b"\x09" * 4096, 6 << 20)
    code, inc = run(capsys, "backup", disk_dir, "--repo", repo_dir, "--audit-sample", "50")
    assert code == 0 and inc["kind"] == "incremental"  # type: ignore[index]
    assert inc["chunks_read"] == 1 and inc["audit"]["tracker_trusted"]  # type: ignore[index]
    code, points = run(capsys, "points", repo_dir)
    assert code == 0 and [p["kind"] for p in points] == ["full", "incremental"]  # type: ignore[union-attr,index]
    for key in ("id", "disk_id", "kind", "change_id", "created_at", "verify_state"):
        assert key in points[0]  # type: ignore[index]
    point = points[-1]["id"]  # type: ignore[index]
    target = tmp_path / "restored.raw"
    assert run(capsys, "restore", repo_dir, point, "--to", str(target))[0] == 0
    with Disk.open(disk_dir) as disk:
        assert target.read_bytes() == disk.pread(disk.size_bytes, 0)
    code, verdict = run(capsys, "verify", repo_dir, point, "--against", disk_dir)
    assert code == 0 and verdict["identical"]  # type: ignore[index]
    Disk.create(tmp_path / "other", 8 << 20).close()  # another disk: its verdict would be
    assert main(["verify", repo_dir, point, "--against", str(tmp_path / "other")]) == 2
    assert "verify a point against the disk it was taken of" in capsys.readouterr().err
    assert run(capsys, "points", repo_dir)[1][-1]["verify_state"] == "ok"  # type: ignore[index]
    with Disk.open(disk_dir) as disk:
        disk.pwrite(b"\x01" * 10, 0)  # the disk moved on: verify reports it, exit code 13
    code, verdict = run(capsys, "verify", repo_dir, point, "--against", disk_dir)
    assert code == 13 and verdict["differing_areas"] == [[0, 65536]]  # type: ignore[index]


def test_check_reports_damage_with_exit_code_12(disk_and_repo: tuple[str, str],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    disk_dir, repo_dir = disk_and_repo
    run(capsys, "backup", disk_dir, "--repo", repo_dir)
    assert run(capsys, "check", repo_dir, "--read-data")[0] == 0
    for index_file in (Path(repo_dir) / "index").iterdir():
        index_file.unlink()
    code, report = run(capsys, "check", repo_dir)
    assert code == 12 and report["problems"][0]["kind"] == "table"  # type: ignore[index]


def test_forget_needs_a_policy(disk_and_repo: tuple[str, str],
                              capsys: pytest.CaptureFixture[str]) -> None:
    _, repo_dir = disk_and_repo
    assert run(capsys, "forget", repo_dir)[0] == 2


def test_forget_says_which_failed_point_it_keeps_for_a_kept_one(
        disk_and_repo: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    disk_dir, repo_dir = disk_and_repo
    made = []
    for i in range(3):
        with Disk.open(disk_dir) as disk:
            disk.pwrite(bytes([i + 1]) * 4096, i << 20)
        made.append(run(capsys, "backup", disk_dir, "--repo", repo_dir)[1]["point"]["id"])  # type: ignore[index]
    assert run(capsys, "verify", repo_dir, made[1], "--against", disk_dir)[0] == 13  # failed
    code, out = run(capsys, "forget", repo_dir, "--keep-last", "1", "--dry-run")
    assert code == 0 and out["forgotten"] == [made[0]]  # type: ignore[index]
    assert out["kept_for_taint"] == [made[1]]  # type: ignore[index]
    assert main(["forget", repo_dir, "--keep-last", "1"]) == 0
    assert f"(kept {made[1]}: a point kept builds on a restore point that failed " \
        "verification" in capsys.readouterr().out


@pytest.fixture(params=["unnamed", "scratch-directory"])
def qcow2_scratch(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Where a qcow2 restore makes its raw image and its conversion: files with no name
    (O_TMPFILE), or, on a file system without them, a temporary directory beside the target."""
    if request.param == "scratch-directory":
        monkeypatch.setattr(OsFileIO, "create_unnamed", lambda self, directory: None)
    return str(request.param)


@pytest.mark.interop
@pytest.mark.usefixtures("qcow2_scratch")
def test_restore_as_qcow2_compares_equal_with_qemu_img(disk_and_repo: tuple[str, str],
                                                       tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    if shutil.which("qemu-img") is None:
        if os.environ.get("CI"):
            pytest.fail("qemu-img is missing (Debian package qemu-utils)")
        pytest.skip("qemu-img is not installed")
    disk_dir, repo_dir = disk_and_repo
    _, report = run(capsys, "backup", disk_dir, "--repo", repo_dir)
    point = report["point"]["id"]  # type: ignore[index]
    out = tmp_path / "out"
    out.mkdir()
    target = out / "restored.qcow2"
    assert run(capsys, "restore", repo_dir, point, "--to", str(target), "--format", "qcow2")[0] == 0
    assert os.listdir(out) == ["restored.qcow2"]
    assert target.stat().st_mode & 0o777 == 0o600  # as a raw restore's, whatever the umask
    target.chmod(0o640)  # restored again over it: the image takes the file's permissions
    assert run(capsys, "restore", repo_dir, point, "--to", str(target), "--format", "qcow2")[0] == 0
    assert os.listdir(out) == ["restored.qcow2"]
    assert target.stat().st_mode & 0o777 == 0o640
    named = tmp_path / "vm.QCOW2"  # no --format: a raw image under a qcow2 name is refused
    assert main(["restore", repo_dir, point, "--to", str(named)]) == 2
    assert "--format qcow2" in capsys.readouterr().err and not named.exists()
    odd = tmp_path / "odd"  # a disk of 1000 bytes: qemu-img would make a qcow2 of 1024
    with Disk.create(odd, 1000) as disk:
        disk.pwrite(b"\x05" * 1000, 0)
    _, small = run(capsys, "backup", str(odd), "--repo", repo_dir)
    small_point = small["point"]["id"]  # type: ignore[index]
    qcow2 = tmp_path / "odd.qcow2"
    assert main(["restore", repo_dir, small_point, "--to", str(qcow2), "--format", "qcow2"]) == 2
    assert "restore it as raw" in capsys.readouterr().err and not qcow2.exists()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # renamed over, it would be a file: refused before anything is written
    assert main(["restore", repo_dir, point, "--to", str(fifo), "--format", "qcow2"]) == 2
    assert "is a FIFO" in capsys.readouterr().err and stat.S_ISFIFO(fifo.lstat().st_mode)
    raw = tmp_path / "source.raw"
    with Disk.open(disk_dir) as disk:
        raw.write_bytes(disk.pread(disk.size_bytes, 0))
    compare = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw),
                              str(target)], capture_output=True, text=True)
    assert compare.returncode == 0, compare.stdout + compare.stderr


FULL_QEMU_IMG = """#!/bin/sh
# qemu-img convert on a file system that fills up: part of the output written, then ENOSPC
for last; do :; done
printf 'QFI\\373partial' > "$last"
echo "qemu-img: $last: error while converting qcow2: Could not write qcow2 header: $1" >&2
exit 1
"""


def restore_over_an_old_qcow2(repo_dir: str, point: str, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> tuple[Path, str]:
    """``restore --format qcow2`` over out/old.qcow2, which must fail for want of space
    (exit 15). -> (out, what it printed on stderr)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.qcow2").write_bytes(b"the previous image")
    assert main(["restore", repo_dir, point, "--to", str(out / "old.qcow2"),
                 "--format", "qcow2"]) == 15
    return out, capsys.readouterr().err


@pytest.mark.parametrize("message", ["No space left on device", "Disk quota exceeded"])
@pytest.mark.usefixtures("qcow2_scratch")
def test_a_qcow2_restore_that_does_not_fit_keeps_the_target_as_it_was(
        disk_and_repo: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], message: str) -> None:
    """qemu-img failing for want of space: exit 15 (NoSpace), the file that was at --to still
    there unchanged, no partial output beside it."""
    disk_dir, repo_dir = disk_and_repo
    _, report = run(capsys, "backup", disk_dir, "--repo", repo_dir)
    point = report["point"]["id"]  # type: ignore[index]
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "qemu-img").write_text(FULL_QEMU_IMG.replace("$1", message))
    (tools / "qemu-img").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    out, err = restore_over_an_old_qcow2(repo_dir, point, tmp_path, capsys)
    assert "NoSpace" in err and "left as it was" in err, err
    assert main(["restore", repo_dir, point, "--to", str(out / "new.qcow2"),
                 "--format", "qcow2"]) == 15
    assert sorted(p.name for p in out.iterdir()) == ["old.qcow2"]
    assert (out / "old.qcow2").read_bytes() == b"the previous image"


@pytest.mark.usefixtures("qcow2_scratch")
def test_a_qcow2_restore_whose_raw_step_does_not_fit_names_the_target(
        disk_and_repo: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The image is restored raw beside the target before qemu-img converts it: a full file
    system there is exit 15 naming the target the user gave, not the scratch file."""
    disk_dir, repo_dir = disk_and_repo
    _, report = run(capsys, "backup", disk_dir, "--repo", repo_dir)
    point = report["point"]["id"]  # type: ignore[index]

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("blocktrail.fileio.os.pwrite", full)
    out, err = restore_over_an_old_qcow2(repo_dir, point, tmp_path, capsys)
    assert f"restore target {out / 'old.qcow2'} is full" in err, err
    assert "image.raw" not in err and "left as it was" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["old.qcow2"]


def test_check_verify_and_repair_list_damaged_objects(disk_and_repo: tuple[str, str],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    disk_dir, repo_dir = disk_and_repo
    _, full = run(capsys, "backup", disk_dir, "--repo", repo_dir)
    point = full["point"]["id"]  # type: ignore[index]
    code, repaired = run(capsys, "repo", "repair", repo_dir)
    assert code == 0 and repaired["ok"] and repaired["unrestorable_points"] == []  # type: ignore[index]
    assert repaired["damaged_objects"] == [] and repaired["advice"] is None  # type: ignore[index]
    pack = next((Path(repo_dir) / "packs").rglob("*.pack"))
    with open(pack, "r+b") as f:  # one byte of the first chunk's payload
        f.seek(48 + 10)
        byte = f.read(1)
        f.seek(48 + 10)
        f.write(bytes([byte[0] ^ 0x80]))
    code, verdict = run(capsys, "verify", repo_dir, point, "--against", disk_dir)
    assert code == 12 and verdict["differing_areas"] == []  # type: ignore[index]
    damaged = verdict["damaged_objects"]  # type: ignore[index]
    assert [(o["kind"], o["pack"], o["offset"]) for o in damaged] == [("chunk", pack.stem, 0)]
    code, report = run(capsys, "check", repo_dir, "--read-data")
    assert code == 12  # set aside by verify: now lost, and check says which point lacks it
    assert report["problems"][0]["kind"] == "chunk"  # type: ignore[index]
    assert "in quarantine" in report["problems"][0]["detail"]  # type: ignore[index]
    assert report["quarantined_before"] == 1  # type: ignore[index]
    code, repaired = run(capsys, "repo", "repair", repo_dir)
    assert code == 12 and [o["digest"] for o in repaired["damaged_objects"]] == [  # type: ignore[index]
        damaged[0]["digest"]]
    assert repaired["unrestorable_points"][0]["point"] == point  # type: ignore[index]
    code, _ = run(capsys, "backup", disk_dir, "--repo", repo_dir)  # stores it again
    assert code == 0
    code, repaired = run(capsys, "repo", "repair", repo_dir)
    assert code == 0 and repaired["ok"]  # type: ignore[index]


def test_keep_freed_memory_can_be_asked_twice() -> None:
    from blocktrail.cli.backup import keep_freed_memory
    keep_freed_memory()  # a libc without mallopt: nothing happens
    keep_freed_memory()
