"""A repository on a real, small file system that fills up (a tmpfs of 8 MiB): the backup that
does not fit exits 15 with one line and leaves nothing behind; a restore onto it does the same;
`forget --prune` gets space back on the full file system; the next backup fits and is right.

Needs `mount -t tmpfs` (root); skipped with the reason elsewhere. The FileIO-injected sweeps in
test_repository_sweeps.py cover the same failures everywhere."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from blocktrail.cli.main import main
from blocktrail.disk import Disk
from blocktrail.repo import Repository
from repodamage import fill, mount_tmpfs, repo_files, unmount
from s3server import TEST_PASSWORD

MiB = 1 << 20


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "small"
    why = mount_tmpfs(mount_point, "8m")
    if why is not None:
        pytest.skip(why)
    try:
        yield mount_point
    finally:
        unmount(mount_point)


def _write(disk_dir: Path, data: bytes) -> bytes:
    with Disk.open(disk_dir) as disk:
        disk.pwrite(data, 0)
        return disk.pread(disk.size_bytes, 0)


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_a_full_file_system(small_fs: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    repo_dir, disk_dir = str(small_fs / "repo"), tmp_path / "disk"
    rng = random.Random(5)
    Disk.create(disk_dir, 8 * MiB).close()
    assert main(["repo", "init", repo_dir]) == 0
    _write(disk_dir, rng.randbytes(3 * MiB))
    assert main(["backup", str(disk_dir), "--repo", repo_dir]) == 0  # P1: 3 MiB
    _write(disk_dir, rng.randbytes(3 * MiB))
    assert main(["backup", str(disk_dir), "--repo", repo_dir, "--full"]) == 0  # P2: 3 MiB more
    capsys.readouterr()

    content = _write(disk_dir, rng.randbytes(5 * MiB // 2))  # does not fit in what is left
    before = repo_files(Path(repo_dir))
    assert main(["backup", str(disk_dir), "--repo", repo_dir]) == 15
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "NoSpace" in err and "is full" in err, err
    assert "blocktrail forget" in err and "nothing was published" in err
    assert repo_files(Path(repo_dir)) == before  # no new pack, no temporary file

    fill(small_fs)
    assert _free(small_fs) < 64 * 1024
    with Repository.open(repo_dir, password=TEST_PASSWORD) as repo:
        newest = repo.points()[-1].id
    target = small_fs / "restored.raw"
    assert main(["restore", repo_dir, newest, "--to", str(target)]) == 15
    assert "restore target" in capsys.readouterr().err
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler", "repo"]

    assert main(["forget", repo_dir, "--keep-last", "1", "--prune"]) == 0  # on a full disk
    assert "pruned 1 packs" in capsys.readouterr().out
    assert _free(small_fs) >= 3 * MiB

    assert main(["backup", str(disk_dir), "--repo", repo_dir]) == 0
    assert "incremental backup" in capsys.readouterr().out
    with Repository.open(repo_dir, password=TEST_PASSWORD) as repo:
        point = repo.points()[-1].id
        restored = tmp_path / "restored.raw"
        repo.restore(point, str(restored))
        assert restored.read_bytes() == content
        report = repo.check(read_data=True)
        assert report.ok and report.temp_files == 0
