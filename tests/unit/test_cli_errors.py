"""How errors leave the CLI: each with a documented exit code (errors.ExitCode, the README's
table) and one line; never a traceback (unless BLOCKTRAIL_DEBUG=1 asks for one)."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from blocktrail.cli import disk as disk_commands
from blocktrail.cli.main import main
from blocktrail.errors import ExitCode
from s3server import TEST_ENCRYPTION

README = Path(__file__).resolve().parents[2] / "README.md"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def failing_info(monkeypatch: pytest.MonkeyPatch) -> list[BaseException]:
    """`disk info` raising whatever the test puts in the list."""
    raised: list[BaseException] = []

    def fail(_disk: object) -> dict[str, object]:
        raise raised[0]

    monkeypatch.setattr(disk_commands, "disk_info", fail)
    return raised


@pytest.mark.parametrize(("error", "code", "line"), [
    (OSError(errno.ENOSPC, "No space left on device", "/srv/x"), ExitCode.NO_SPACE,
     "error: NoSpace: the file system is full: No space left on device: /srv/x; free space "
     "and retry"),
    (OSError(errno.EDQUOT, "Disk quota exceeded", "/srv/x"), ExitCode.NO_SPACE,
     "error: NoSpace: the file system is full: Disk quota exceeded: /srv/x; free space and "
     "retry"),
    (OSError(errno.EIO, "Input/output error", "/srv/x"), ExitCode.IO_FAILURE,
     "error: IOFailure: Input/output error: /srv/x"),
    (PermissionError(errno.EACCES, "Permission denied", "/a", None, "/b"), ExitCode.IO_FAILURE,
     "error: IOFailure: Permission denied: /a -> /b"),
    (OSError(errno.EBADF, "Bad file descriptor"), ExitCode.IO_FAILURE,
     "error: IOFailure: Bad file descriptor"),
    (RuntimeError("nobody expected\nthis"), ExitCode.INTERNAL,
     "error: internal error: RuntimeError: nobody expected this (a bug; BLOCKTRAIL_DEBUG=1 "
     "prints the traceback)"),
    (KeyError("x"), ExitCode.INTERNAL, "error: internal error: KeyError: 'x' (a bug; "),
    (KeyboardInterrupt(), ExitCode.INTERRUPTED, "aborted"),
])
def test_every_error_is_one_line_and_a_documented_code(
        error: BaseException, code: int, line: str, failing_info: list[BaseException],
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from blocktrail.disk import Disk
    monkeypatch.delenv("BLOCKTRAIL_DEBUG", raising=False)
    Disk.create(tmp_path / "d0", 65536).close()
    failing_info.append(error)
    exit_code, out, err = run(capsys, "disk", "info", str(tmp_path / "d0"))
    assert exit_code == code
    assert err.lstrip("\n").startswith(line), err  # a blank line after ^C
    assert "Traceback" not in err and err.count("\n") <= 2  # Abort adds a blank line
    exit_code, out, _ = run(capsys, "disk", "info", str(tmp_path / "d0"), "--json")
    if code != ExitCode.INTERRUPTED:
        assert set(json.loads(out)) == {"error", "message"}


def test_debug_prints_the_traceback(failing_info: list[BaseException], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from blocktrail.disk import Disk
    Disk.create(tmp_path / "d0", 65536).close()
    failing_info.append(ZeroDivisionError("oops"))
    monkeypatch.setenv("BLOCKTRAIL_DEBUG", "1")
    exit_code, _, err = run(capsys, "disk", "info", str(tmp_path / "d0"))
    assert exit_code == ExitCode.INTERNAL
    assert "Traceback (most recent call last)" in err and "ZeroDivisionError: oops" in err


@pytest.mark.parametrize("args", [[], ["disk"], ["nope"], ["disk", "create"],
                                  ["disk", "create", "x", "--size"], ["--no-such-option"],
                                  ["snapshot", "create", "d0"], ["cbt", "query", "d0"],
                                  ["host", "--max-connections", "0", "--data", "x", "--api",
                                   "unix:/x"]])
def test_usage_errors_are_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, *args)
    assert code == ExitCode.USAGE, err
    assert "Traceback" not in err


def test_help_and_version_are_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--help")[0] == 0
    assert run(capsys, "disk", "create", "--help")[0] == 0
    assert run(capsys, "--version")[0] == 0


def test_the_readme_lists_every_exit_code() -> None:
    table = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", README.read_text(), re.MULTILINE))
    assert sorted(int(code) for code in table) == sorted(int(code) for code in ExitCode)


def test_a_name_that_is_not_utf8_on_the_command_line(tmp_path: Path) -> None:
    """What a shell passes when a name holds a byte that is not UTF-8 (Python makes it a lone
    surrogate): refused as a name, printed as an escape, exit 2."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    for args in ([b"snapshot", b"create", b"d0", b"x\xff", b"--host", b"unix:/nonexistent"],
                 [b"disk", b"create", b"d\xff", b"--size", b"1M", b"--host",
                  b"unix:/nonexistent"]):
        done = subprocess.run([sys.executable.encode(), b"-m", b"blocktrail.cli.main", *args],
                              capture_output=True, timeout=60, env=env)
        assert done.returncode == ExitCode.USAGE, done.stderr
        assert b"Traceback" not in done.stderr and b"\\udcff" in done.stderr


@pytest.mark.parametrize(("error", "code"), [
    (OSError(errno.EIO, "Input/output error", "/backups/repo/packs/3f"), ExitCode.IO_FAILURE),
    (OSError(errno.ENOSPC, "No space left on device", "/backups/repo/packs/3f"),
     ExitCode.NO_SPACE),
])
def test_a_backup_failing_with_a_bare_errno(error: OSError, code: int, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Once exit code 1 and the bare errno; now the documented code and the file."""
    from blocktrail.backup import engine
    from blocktrail.disk import Disk
    from blocktrail.repo import Repository

    Disk.create(tmp_path / "d0", 65536).close()
    Repository.init(str(tmp_path / "repo"), encryption=TEST_ENCRYPTION).close()

    def fail(*_args: object, **_kwargs: object) -> None:
        raise error

    monkeypatch.setattr(engine, "run_backup", fail)  # the command imports it when it runs
    exit_code, _, err = run(capsys, "backup", str(tmp_path / "d0"), "--repo",
                            str(tmp_path / "repo"))
    assert exit_code == code
    assert err.count("\n") == 1 and "/backups/repo/packs/3f" in err


@pytest.mark.parametrize("source", ["/proc/self/environ", "fifo", "dir", "missing"])
def test_import_refuses_what_is_not_a_raw_image(source: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    path = source if source.startswith("/") else str(tmp_path / source)
    exit_code, _, err = run(capsys, "disk", "import", path, str(tmp_path / "d0"))
    assert exit_code == ExitCode.USAGE, err  # and the FIFO did not block it
    assert not (tmp_path / "d0").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "fifo"]


@pytest.mark.parametrize("args", [["nope"], ["disk", "create", "x", "--size"],
                                  ["--no-such-option"], ["backup"], ["vm", "define", "-b"]])
def test_a_usage_error_is_one_line_naming_the_help(args: list[str],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, *args)
    assert code == ExitCode.USAGE
    assert err.count("\n") == 1 and err.startswith("error: usage: blocktrail"), err
    assert err.rstrip().endswith("--help)"), err


@pytest.mark.parametrize("value", ["abc", "-5"])
def test_a_bad_lease_duration_is_a_usage_error_after_opening(
        value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """BLOCKTRAIL_LEASE_SECONDS is read on the thread that opens the repository: a bad value
    still leaves as one line with the usage code, and nothing is listed."""
    from blocktrail.repo import Repository
    Repository.init(tmp_path / "r", encryption=TEST_ENCRYPTION).close()
    monkeypatch.setenv("BLOCKTRAIL_LEASE_SECONDS", value)
    code, out, err = run(capsys, "points", str(tmp_path / "r"))
    assert code == ExitCode.USAGE and out == ""
    assert err.startswith("error: InvalidArgument: BLOCKTRAIL_LEASE_SECONDS") and \
        err.count("\n") == 1


def test_an_s3_endpoint_that_is_no_url_is_a_usage_error(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "points", "s3://bucket/site-a", "--endpoint", "127.0.0.1:8333")
    assert code == ExitCode.USAGE and out == ""
    assert err == ("error: InvalidArgument: S3 endpoint '127.0.0.1:8333' (--endpoint) is no URL "
                   "of the form http://HOST[:PORT] or https://HOST[:PORT]\n")
