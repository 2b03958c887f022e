"""Every path that opens a repository gets an encrypted one's password from the same sources
(blocktrail/passwords.py): a worker's job (password_file, password_command, or the
environment) and the host's --repo repositories (the console and its backups)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from blocktrail.backup.engine import BackupOptions, run_backup
from blocktrail.backup.sources.local import LocalDiskSource
from blocktrail.disk import Disk
from blocktrail.errors import InvalidArgument
from blocktrail.host.points import PointCatalog
from blocktrail.passwords import PasswordSources
from blocktrail.repo import Encryption, Repository
from blocktrail.repo.errors import PasswordRequired, WrongPassword
from blocktrail.repo.keys import TEST_KDF
from blocktrail.worker.config import parse_config
from blocktrail.worker.runner import open_repository

SECRET = "job-secret"


@pytest.fixture
def encrypted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("BLOCKTRAIL_PASSWORD")  # the tests' own: not this repository's
    path = tmp_path / "repo"
    with Disk.create(tmp_path / "d", 1 << 20, 65536) as disk, \
            Repository.init(path, encryption=Encryption(SECRET, kdf=TEST_KDF)) as repo:
        disk.pwrite(b"\x07" * 65536, 0)
        run_backup(LocalDiskSource(disk), repo, BackupOptions())
    (tmp_path / "password").write_text(SECRET + "\n")
    return path


def job(extra: str, base: Path) -> str:
    return (f'[[job]]\nname = "j"\nhost = "unix:/h"\ndisks = ["d"]\nrepository = "repo"\n'
            f'every = "1h"\n{extra}')


def test_a_job_names_its_password_file_or_command(encrypted: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    config = str(tmp_path / "jobs.toml")
    (with_file,) = parse_config(job('password_file = "password"\n', tmp_path), config).jobs
    assert with_file.password_file == str(tmp_path / "password")  # relative to the file
    with open_repository(with_file) as repo:
        assert repo.encrypted and len(repo.points()) == 1
    script = tmp_path / "print-password.py"
    script.write_text(f"print({SECRET!r})\n")
    (with_command,) = parse_config(job(f"password_command = '{sys.executable} {script}'\n",
                                       tmp_path), config).jobs
    with open_repository(with_command) as repo:
        assert repo.encrypted
    (bare,) = parse_config(job("", tmp_path), config).jobs
    with pytest.raises(PasswordRequired):
        open_repository(bare)
    monkeypatch.setenv("BLOCKTRAIL_PASSWORD", "wrong")
    with pytest.raises(WrongPassword):
        open_repository(bare)
    monkeypatch.setenv("BLOCKTRAIL_PASSWORD_FILE", str(tmp_path / "password"))
    with open_repository(bare) as repo:
        assert repo.encrypted
    with pytest.raises(InvalidArgument, match="not both"):
        parse_config(job('password_file = "p"\npassword_command = "c"\n', tmp_path), config)


def test_the_hosts_repositories_open_with_its_password(encrypted: Path,
                                                       tmp_path: Path) -> None:
    catalog = PointCatalog((str(encrypted),), PasswordSources(file=str(tmp_path / "password")))
    try:
        view = catalog.view(str(encrypted))
        assert view.problem is None and len(view.points) == 1
    finally:
        catalog.close()
    without = PointCatalog((str(encrypted),))
    try:
        view = without.view(str(encrypted))
        assert view.problem is not None and "encrypted" in view.problem
        assert not view.points
    finally:
        without.close()


def test_an_instant_restore_and_serve_open_with_the_hosts_password(
        encrypted: Path, tmp_path: Path) -> None:
    """The host's restore endpoint (POST /disks/restore) and `blocktrail serve` (open_points)
    open an encrypted repository with their own password sources; without one the endpoint
    says what the host lacks (400) and creates no disk."""
    import functools

    from fastapi.testclient import TestClient

    from blocktrail.backup.chunksource import open_chunk_source
    from blocktrail.backup.pointexport import open_points
    from blocktrail.host.api import create_app
    from blocktrail.host.fill import FillScheduler
    from blocktrail.host.registry import DiskRegistry

    password = PasswordSources(file=str(tmp_path / "password"))
    with Repository.open(encrypted, password=SECRET) as repo:
        (point,) = repo.points()
    for sources, status in ((PasswordSources(), 400), (password, 201)):
        registry = DiskRegistry(str(tmp_path / f"data-{status}"), chunk_sources=functools.partial(
            open_chunk_source, password=sources))
        fills = FillScheduler(registry)
        try:
            client = TestClient(create_app(registry, fills=fills, repo_password=sources))
            reply = client.post("/disks/restore", json={"name": "r0", "repository":
                                                       str(encrypted), "point": point.id})
            assert reply.status_code == status, reply.text
            if status == 400:
                assert "its own password" in reply.json()["message"]
                assert client.get("/disks").json() == []
        finally:
            fills.close()
            registry.close()
    catalog = open_points(str(encrypted), [point.id], password)
    try:
        assert catalog.names() == [point.id]
    finally:
        catalog.close()
    with pytest.raises(PasswordRequired):
        open_points(str(encrypted), [point.id])
