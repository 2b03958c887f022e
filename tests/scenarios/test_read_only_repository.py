"""A repository that may only be read: on a read-only mount (EROFS), in files this user may not
write (EACCES), and on S3 with credentials that may only read (a SeaweedFS identity with Read
and List only). Restoring from a copy kept read-only (a snapshot of the backup volume, a share
mounted read-only after an intrusion) is when a backup matters most.

Every command that reads works: points, repo info, check --read-data, restore, serve's exports
and verify (its comparison; the record of it is not written, and it says so). A command that
writes fails with one clear error and writes nothing. Damage found is reported as found, and
never claimed to be in quarantine when its record could not be written.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from blocktrail.backup.pointexport import open_points
from blocktrail.cli.main import main
from blocktrail.disk import Disk
from blocktrail.host.points import PointCatalog
from s3server import READER_ACCESS_KEY, READER_SECRET_KEY, SeaweedFS

MiB = 1 << 20


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, object, str]:
    """-> (exit code, the JSON printed, what was said on stderr)."""
    code = main([*args, "--json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip() else None, captured.err


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: (size, modification time)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def backed_up(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path, str]:
    """A disk and a repository holding a full and an incremental point of it. -> (disk,
    repository, the incremental's id)."""
    disk, repo = tmp_path / "vm1", tmp_path / "repo"
    with Disk.create(str(disk), 8 * MiB) as d:
        d.pwrite(os.urandom(3 * MiB), MiB)
    assert run(capsys, "repo", "init", str(repo), "--encryption", "none")[0] == 0
    assert run(capsys, "backup", str(disk), "--repo", str(repo))[0] == 0
    with Disk.open(str(disk)) as d:
        d.pwrite(os.urandom(MiB // 2), 5 * MiB)
    code, inc, _ = run(capsys, "backup", str(disk), "--repo", str(repo))
    assert code == 0 and inc["kind"] == "incremental"  # type: ignore[index]
    return disk, repo, inc["point"]["id"]  # type: ignore[index]


@pytest.fixture(params=["read-only mount", "files not ours to write"])
def read_only(request: pytest.FixtureRequest, backed_up: tuple[Path, Path, str],
              tmp_path: Path) -> Iterator[Path]:
    """The repository as a path that refuses every write: a read-only bind mount of it (root),
    or the repository with its write permissions taken away (not root: root may write
    anyway)."""
    _, repo, _ = backed_up
    if request.param == "read-only mount":
        if os.geteuid() != 0:
            pytest.skip("a bind mount needs root")
        view = tmp_path / "ro"
        view.mkdir()
        for args in (["mount", "--bind", str(repo), str(view)],
                     ["mount", "-o", "remount,bind,ro", str(view)]):
            done = subprocess.run(args, capture_output=True, text=True)
            if done.returncode != 0:
                subprocess.run(["umount", "-l", str(view)], capture_output=True)
                pytest.skip(f"a read-only bind mount is not permitted here: {done.stderr}")
        try:
            yield view
        finally:
            subprocess.run(["umount", "-l", str(view)], check=False, capture_output=True)
        return
    if os.geteuid() == 0:
        pytest.skip("root writes files whatever their permissions say")
    paths = [repo, *repo.rglob("*")]
    for path in paths:
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        yield repo
    finally:
        for path in paths:
            path.chmod(path.stat().st_mode | 0o200)


def test_every_reading_command_works_and_every_writing_one_says_why(
        backed_up: tuple[Path, Path, str], read_only: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    disk, repo, point = backed_up
    view = str(read_only)
    before = _tree(repo)
    with Disk.open(str(disk)) as d:
        content = d.pread(d.size_bytes, 0)

    code, points, _ = run(capsys, "points", view)
    assert code == 0 and [p["kind"] for p in points] == ["full", "incremental"]  # type: ignore[union-attr,index]
    assert run(capsys, "repo", "info", view)[0] == 0
    code, report, _ = run(capsys, "check", view, "--read-data")
    assert code == 0 and report["ok"] and report["chunks_read"] > 0  # type: ignore[index]
    target = tmp_path / "restored.raw"
    assert run(capsys, "restore", view, point, "--to", str(target))[0] == 0
    assert target.read_bytes() == content

    catalog = open_points(view, [point])  # what `blocktrail serve` exports
    try:
        info = catalog.lookup(point)
        assert info is not None
        export = catalog.open(info)
        assert export is not None
        mapped = export.map_read(len(content), 0, wait=True)
        assert mapped is not None
        with mapped:
            served = b"".join(bytes(s.data) if s.data is not None else bytes(s.length)
                              for s in mapped.segments)
        assert served == content
    finally:
        catalog.close()

    code, verdict, err = run(capsys, "verify", view, point, "--against", str(disk))
    assert code == 0 and verdict["identical"]  # type: ignore[index]
    assert verdict["recorded"] is False  # type: ignore[index]
    assert "cannot be written" in verdict["not_recorded"]  # type: ignore[index]
    assert f"the verify state of {point} was not recorded" in err

    for args in (["backup", str(disk), "--repo", view], ["forget", view, "--keep-last", "1"],
                 ["prune", view]):
        code, failure, _ = run(capsys, *args)
        assert code == 11, args
        assert failure["error"] == "BackendReadOnly", args  # type: ignore[index]
        assert f"the repository {view} cannot be written" in failure["message"], args  # type: ignore[index]
    with Disk.open(str(disk)) as d:
        assert d.snapshots == []  # the backup's own snapshot went again
    assert _tree(repo) == before  # nothing was written, nothing went


def test_damage_is_reported_and_not_claimed_to_be_in_quarantine(
        backed_up: tuple[Path, Path, str], read_only: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    _, repo, point = backed_up
    view = str(read_only)
    pack = max(repo.glob("packs/*/*.pack"), key=lambda p: p.stat().st_size)
    mode = pack.stat().st_mode
    pack.chmod(mode | 0o200)
    with open(pack, "r+b") as f:  # one bit of a stored chunk, behind the read-only view
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    pack.chmod(mode)

    code, report, _ = run(capsys, "check", view, "--read-data")
    assert code == 12 and not report["ok"]  # type: ignore[index]
    details = [p["detail"] for p in report["problems"]]  # type: ignore[index]
    assert details and all("set aside by this check only" in d for d in details)
    assert not any("now in quarantine" in d for d in details)
    assert main(["check", view, "--read-data"]) == 12
    said = capsys.readouterr().out
    assert "NOT put in quarantine" in said and "damaged copies put in quarantine" not in said

    code, failure, _ = run(capsys, "restore", view, point, "--to", str(tmp_path / "r.raw"))
    assert code == 12 and "not put in quarantine" in failure["message"]  # type: ignore[index]
    assert not list(repo.glob("quarantine/*"))  # nothing was written


def test_read_only_s3_credentials_read_and_refuse_to_write(
        s3_server: SeaweedFS, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials that may only read and list: the probe of conditional writes is denied,
    which a command that only reads goes past, so points, check, restore and verify work;
    backup is refused at open (its probe is denied), and nothing is written."""
    url = s3_server.new_url("read-only")
    disk = tmp_path / "vm1"
    with Disk.create(str(disk), 4 * MiB) as d:
        d.pwrite(os.urandom(2 * MiB), MiB)
    s3 = ["--endpoint", s3_server.endpoint]
    assert run(capsys, "repo", "init", url, *s3, "--encryption", "none")[0] == 0
    code, full, _ = run(capsys, "backup", str(disk), "--repo", url, *s3)
    assert code == 0
    point = full["point"]["id"]  # type: ignore[index]
    bucket, _, prefix = url.removeprefix("s3://").partition("/")

    def objects() -> list[tuple[str, str]]:
        listed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
        return sorted((o["Key"], o["ETag"]) for o in listed.get("Contents", []))

    before = objects()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", READER_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", READER_SECRET_KEY)
    code, points, _ = run(capsys, "points", url, *s3)
    assert code == 0 and [p["id"] for p in points] == [point]  # type: ignore[union-attr,index]
    code, report, _ = run(capsys, "check", url, *s3, "--read-data")
    assert code == 0 and report["ok"]  # type: ignore[index]
    target = tmp_path / "restored.raw"
    assert run(capsys, "restore", url, point, *s3, "--to", str(target))[0] == 0
    with Disk.open(str(disk)) as d:
        assert target.read_bytes() == d.pread(d.size_bytes, 0)
    code, verdict, err = run(capsys, "verify", url, point, *s3, "--against", str(disk))
    assert code == 0 and verdict["identical"] and not verdict["recorded"]  # type: ignore[index]
    assert "was not recorded" in err
    code, failure, _ = run(capsys, "backup", str(disk), "--repo", url, *s3)
    assert code == 9 and failure["error"] == "BackendDenied"  # type: ignore[index]

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)  # what a host is given
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    catalog = PointCatalog((url,))  # the host's console and metrics
    try:
        view = catalog.view(url)
        assert view.problem is None and [p.id for p in view.points] == [point], view
    finally:
        catalog.close()
    assert objects() == before
