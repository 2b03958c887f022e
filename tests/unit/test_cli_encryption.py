"""The CLI on encrypted repositories: where the password comes from (one function for every
command: --password-file, --password-command, BLOCKTRAIL_PASSWORD, BLOCKTRAIL_PASSWORD_FILE),
`repo init --encryption`, `repo info`, `repo key add|list|remove|passwd`, wrong passwords
(exit 9, nothing written) and `check` reporting an authentication failure (exit 16)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from blocktrail.cli.main import main
from blocktrail.errors import ExitCode
from blocktrail.repo import Repository, layout
from s3server import TEST_PASSWORD


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, object, str]:
    code = main([*args, "--json"])
    captured = capsys.readouterr()
    out = json.loads(captured.out) if captured.out.strip() else None
    return code, out, captured.err


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and "locks" not in p.parts}


def with_point(path: Path) -> str:
    with Repository.open(path, password=TEST_PASSWORD) as repo:
        writer = repo.begin("d", 2 * 65536, None)
        writer.put_chunk(0, b"\x01" * 65536)
        return writer.commit(kind="full", change_id=None).id


def test_init_is_encrypted_by_default_and_info_shows_it(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    repo = str(tmp_path / "r")
    code, out, _ = run(capsys, "repo", "init", repo)
    assert code == 0 and isinstance(out, dict) and out["encryption"] in ("aes-256-gcm",
                                                                         "chacha20-poly1305")
    code, info, err = run(capsys, "repo", "info", repo)
    assert code == 0 and isinstance(info, dict) and "not encrypted" not in err
    assert info["version"] == 3 and info["chunk_ids"] == "blake3-keyed"
    [key] = info["key_files"]
    assert key["kdf"] == {"algorithm": "argon2id", "time_cost": 1, "memory_kib": 1024,
                          "parallelism": 1}  # BLOCKTRAIL_KDF of the tests
    code, _, _ = run(capsys, "repo", "init", str(tmp_path / "c"), "--encryption",
                     "chacha20-poly1305", "--kdf", "t=2,m=2048,p=1")
    _, info, _ = run(capsys, "repo", "info", str(tmp_path / "c"))
    assert isinstance(info, dict) and info["encryption"] == "chacha20-poly1305"
    assert info["key_files"][0]["kdf"]["time_cost"] == 2


def test_every_password_source(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BLOCKTRAIL_PASSWORD")
    secret = tmp_path / "secret"
    secret.write_text("s3cret pass\n")
    repo = str(tmp_path / "r")
    assert run(capsys, "repo", "init", repo, "--password-file", str(secret))[0] == 0
    before = snapshot(tmp_path / "r")
    code, out, _ = run(capsys, "points", repo)  # no password anywhere, no terminal
    assert code == ExitCode.UNAUTHORIZED and isinstance(out, dict)
    assert out["error"] == "PasswordRequired"
    assert run(capsys, "points", repo, "--password-file", str(secret))[0] == 0
    command = f"{sys.executable} -c \"print('s3cret pass')\""
    assert run(capsys, "points", repo, "--password-command", command)[0] == 0
    monkeypatch.setenv("BLOCKTRAIL_PASSWORD_FILE", str(secret))
    assert run(capsys, "points", repo)[0] == 0
    monkeypatch.delenv("BLOCKTRAIL_PASSWORD_FILE")
    monkeypatch.setenv("BLOCKTRAIL_PASSWORD", "s3cret pass")
    assert run(capsys, "check", repo)[0] == 0
    monkeypatch.setenv("BLOCKTRAIL_PASSWORD", "wrong")
    code, out, _ = run(capsys, "check", repo)
    assert code == ExitCode.UNAUTHORIZED and isinstance(out, dict)
    assert out["error"] == "WrongPassword" and "wrong password" in out["message"]
    code, out, _ = run(capsys, "points", repo, "--password-command", "false")
    assert code == ExitCode.USAGE
    assert snapshot(tmp_path / "r") == before  # nothing was ever written


def test_unencrypted_is_explicit_and_said_by_every_command(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    repo = str(tmp_path / "r")
    code, out, _ = run(capsys, "repo", "init", repo, "--encryption", "none")
    assert code == 0 and isinstance(out, dict) and out["encryption"] == "none"
    for command in (["points", repo], ["check", repo], ["repo", "info", repo]):
        code, _, err = run(capsys, *command)
        assert code == 0 and "is not encrypted" in err
    assert run(capsys, "repo", "key", "add", repo)[0] == ExitCode.USAGE


def test_key_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                      monkeypatch: pytest.MonkeyPatch) -> None:
    repo = str(tmp_path / "r")
    run(capsys, "repo", "init", repo)
    point = with_point(tmp_path / "r")
    new = tmp_path / "new"
    new.write_text("second\n")
    code, added, _ = run(capsys, "repo", "key", "add", repo, "--new-password-file", str(new))
    assert code == 0 and isinstance(added, dict)
    code, keys, _ = run(capsys, "repo", "key", "list", repo)
    assert isinstance(keys, list) and len(keys) == 2
    first = next(k["id"] for k in keys if k["in_use"])
    code, _, _ = run(capsys, "repo", "key", "remove", repo, first)
    assert code == ExitCode.USAGE  # the key in use
    monkeypatch.setenv("BLOCKTRAIL_PASSWORD", "second")
    assert run(capsys, "repo", "key", "remove", repo, first)[0] == 0
    code, _out, _ = run(capsys, "repo", "key", "remove", repo, added["id"])
    assert code == ExitCode.USAGE  # the last one
    monkeypatch.setenv("BLOCKTRAIL_NEW_PASSWORD", "third")
    code, changed, _ = run(capsys, "repo", "key", "passwd", repo)
    assert code == 0 and isinstance(changed, dict) and changed["replaced"] == added["id"]
    assert run(capsys, "points", repo)[0] == ExitCode.UNAUTHORIZED
    monkeypatch.setenv("BLOCKTRAIL_PASSWORD", "third")
    code, points, _ = run(capsys, "points", repo)
    assert code == 0 and isinstance(points, list) and points[0]["id"] == point
    assert len(list((tmp_path / "r" / "keys").iterdir())) == 1


def test_check_exits_16_on_an_authentication_failure_and_restore_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = str(tmp_path / "r")
    run(capsys, "repo", "init", repo)
    point = with_point(tmp_path / "r")
    [pack] = (tmp_path / "r" / "packs").rglob("*.pack")
    data = bytearray(pack.read_bytes())
    data[100] ^= 1  # inside the chunk's ciphertext
    pack.write_bytes(bytes(data))
    target = tmp_path / "x.raw"
    code, out, _ = run(capsys, "restore", repo, point, "--to", str(target))
    assert code == ExitCode.AUTHENTICATION_FAILED and not target.exists()
    assert isinstance(out, dict) and "authentication failed" in out["message"]
    (tmp_path / "r" / "quarantine").rename(tmp_path / "quarantine-of-restore")
    code, out, _ = run(capsys, "check", repo, "--read-data")  # as if it came first
    assert code == ExitCode.AUTHENTICATION_FAILED and isinstance(out, dict)
    assert [p["cause"] for p in out["problems"]] == ["authentication"]
    assert layout.CONFIG in snapshot(tmp_path / "r")


def test_password_sources_below_the_cli(tmp_path: Path) -> None:
    """blocktrail/passwords.py: what a worker's job and a host use (no prompt)."""
    from blocktrail.errors import InvalidArgument
    from blocktrail.passwords import PasswordSources, find_password, password_source
    secret = tmp_path / "secret"
    secret.write_text("from-file\r\nsecond line\n")
    assert find_password(PasswordSources(file=str(secret)), {}) == b"from-file"
    assert find_password(PasswordSources(), {"BLOCKTRAIL_PASSWORD_FILE": str(secret)}) \
        == b"from-file"
    command = f"{sys.executable} -c \"print('from-command')\""
    assert find_password(PasswordSources(command=command), {"BLOCKTRAIL_PASSWORD": "x"}) \
        == b"from-command"
    assert find_password(PasswordSources(), {"BLOCKTRAIL_PASSWORD": "env"}) == b"env"
    assert find_password(PasswordSources(), {}) is None
    assert password_source(PasswordSources(), {"BLOCKTRAIL_PASSWORD": "lazy"})() == b"lazy"
    with pytest.raises(InvalidArgument, match="not both"):
        find_password(PasswordSources(str(secret), command), {})
    with pytest.raises(InvalidArgument, match="empty"):
        (tmp_path / "empty").write_text("\n")
        find_password(PasswordSources(file=str(tmp_path / "empty")), {})


def test_key_add_and_passwd_take_blocktrail_kdf(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """BLOCKTRAIL_KDF (then --kdf over it) sets the parameters of the key file `repo key add`
    and `repo key passwd` make; without either they are those of the key file in use."""
    repo = str(tmp_path / "r")
    run(capsys, "repo", "init", repo)  # t=1 (the tests' BLOCKTRAIL_KDF)
    monkeypatch.setenv("BLOCKTRAIL_NEW_PASSWORD", "second")
    monkeypatch.setenv("BLOCKTRAIL_KDF", "t=2,m=1024,p=1")
    code, added, _ = run(capsys, "repo", "key", "add", repo)
    assert code == 0 and isinstance(added, dict) and added["kdf"]["time_cost"] == 2
    monkeypatch.setenv("BLOCKTRAIL_NEW_PASSWORD", "third")
    monkeypatch.setenv("BLOCKTRAIL_KDF", "t=3,m=1024,p=1")
    code, changed, _ = run(capsys, "repo", "key", "passwd", repo)
    assert code == 0 and isinstance(changed, dict) and changed["kdf"]["time_cost"] == 3
    code, changed, _ = run(capsys, "repo", "key", "passwd", repo, "--kdf", "t=4,m=1024,p=1")
    assert code == ExitCode.UNAUTHORIZED  # the password in use is replaced: "third" now
    monkeypatch.setenv("BLOCKTRAIL_PASSWORD", "third")
    monkeypatch.setenv("BLOCKTRAIL_NEW_PASSWORD", "fourth")
    code, changed, _ = run(capsys, "repo", "key", "passwd", repo, "--kdf", "t=4,m=1024,p=1")
    assert code == 0 and isinstance(changed, dict) and changed["kdf"]["time_cost"] == 4
    monkeypatch.delenv("BLOCKTRAIL_KDF")
    monkeypatch.setenv("BLOCKTRAIL_PASSWORD", "fourth")
    monkeypatch.setenv("BLOCKTRAIL_NEW_PASSWORD", "fifth")
    code, changed, _ = run(capsys, "repo", "key", "passwd", repo)
    assert code == 0 and isinstance(changed, dict) and changed["kdf"]["time_cost"] == 4
