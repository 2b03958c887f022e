"""Every CLI command with bad arguments: the click command tree is walked, and each command is
run with no arguments, with each argument and each option given bad values (missing paths,
hostile names, bad sizes and change IDs, unreachable hosts, files that are not what they should
be), and the whole with an unreachable --host and with --json. Each run must end with a
documented exit code (errors.ExitCode) other than "internal error", print no traceback, and with
--json print JSON. In this process through `main(argv)`, and a handful as real processes."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest

from blocktrail.cli.main import cli, main
from blocktrail.disk import Disk
from blocktrail.errors import ExitCode
from blocktrail.repo import Repository
from s3server import TEST_ENCRYPTION

CODES = {int(code) for code in ExitCode} - {ExitCode.INTERNAL}
UNREACHABLE = "unix:/nonexistent/api.sock"
HOSTILE = ["", ".", "..", "a/b", " x", "x ", "d0@", "@", "a\x7fb", "\u202e", "\ud800",
           "\udcff", "x" * 300, "-", "%2F", "?", "#", "\\", "\x1b[2J"]
SIZES = ["lots", "-1", "1E", "1.5G", "99999999999999999999999999P", "0x10", "", "\u0663"]
CHANGE_IDS = ["garbage", "x/1", "00000000-0000-0000-0000-000000000000/1", "/", "*/*", ""]


def commands(group: click.Group = cli, prefix: tuple[str, ...] = ()
             ) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


class Places:
    """The files and directories the runs point at."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.disk = root / "d0"
        Disk.create(self.disk, 1 << 20).close()
        self.repo = root / "repo"
        Repository.init(str(self.repo), encryption=TEST_ENCRYPTION).close()
        self.file = root / "file"
        self.file.write_bytes(b"\x01" * 4096)
        self.fifo = root / "fifo"
        os.mkfifo(self.fifo)
        self.missing = root / "no" / "such" / "thing"

    def paths(self) -> list[str]:
        return [str(self.missing), str(self.file), str(self.root), str(self.fifo),
                "/proc/self/environ", "/dev/null", str(self.disk), str(self.repo)]

    def sockets(self) -> list[str]:
        """Endpoints nobody listens on and no host can bind (no such directory)."""
        gone = self.root / "no" / "such" / "dir"
        return [f"unix:{gone}/a.sock", "", "unix:", "tcp:", "tcp:256.1.1.1:80", "host:0",
                "tcp:h:99999", "http://[::1", "nbd://x"]


def bad_values(param: click.Parameter, places: Places) -> list[str]:
    name = (param.name or "").lower()
    if name in ("size", "granularity", "cluster_size", "start"):
        return SIZES
    if name == "since":
        return CHANGE_IDS
    if name in ("host",):
        return [UNREACHABLE, "", "unix:", "garbage", "http://127.0.0.1:0", "tcp:[::1:9"]
    if name in ("api", "nbd"):
        return places.sockets()
    if name in ("max_connections", "keep_last", "keep_daily", "keep_weekly", "keep_monthly"):
        return ["-1", "0", "x", "99999999999999999999"]
    if name in ("audit_pct", "subset"):
        return ["-5", "x", "nan", "inf", "1e999", "200"]
    if name in ("fmt", "tls_mode"):
        return ["vmdk", ""]
    if isinstance(param.type, click.Path) or name in (
            "data_dir", "repo_path", "source", "target", "tls_creds", "tls_psk",
            "tls_certificates", "tls_psk_file"):
        return places.paths()
    return HOSTILE + places.paths()[:2]


def baseline(param: click.Parameter, places: Places) -> str:
    """A value that would be fine, so a run tests one bad value at a time."""
    name = (param.name or "").lower()
    return {"size": "1M", "granularity": "64K", "cluster_size": "64K", "start": "0",
            "since": "*", "repo_path": str(places.repo), "disk_path": str(places.disk),
            "disk": str(places.disk), "source": str(places.file), "point_id": "nope",
            "target": str(places.root / "out.raw"), "against": str(places.disk),
            "data_dir": str(places.root / "data"), "api": places.sockets()[0],
            "name": "s1", "path": str(places.root / "new-repo")}.get(name, "x")


def invocations(path: tuple[str, ...], command: click.Command,
                places: Places) -> Iterator[list[str]]:
    arguments = [p for p in command.params if isinstance(p, click.Argument)]
    options = [p for p in command.params if isinstance(p, click.Option)
               and not p.is_flag and p.name != "help"]
    flags = [p for p in command.params if isinstance(p, click.Option) and p.is_flag]
    required = [p for p in options if p.required]

    def line(args: dict[str, str], opts: dict[str, str]) -> list[str]:
        out = [*path, *(args[p.name or ""] for p in arguments)]
        for option in options:
            if (option.name or "") in opts:
                out += [option.opts[0], opts[option.name or ""]]
        return out

    base_args = {p.name or "": baseline(p, places) for p in arguments}
    base_opts = {p.name or "": baseline(p, places) for p in required}
    yield list(path)  # nothing at all
    yield [*path, "--no-such-option"]
    yield [*line(base_args, base_opts), *(f.opts[0] for f in flags)]
    for argument in arguments:
        for value in bad_values(argument, places):
            yield line({**base_args, argument.name or "": value}, base_opts)
    for option in options:
        yield [*line(base_args, base_opts), option.opts[0]]  # the value missing
        for value in bad_values(option, places):
            yield line(base_args, {**base_opts, option.name or "": value})
    if any(o.name == "host" for o in options):
        for argument in arguments:
            for value in ["d0", *HOSTILE[:8]]:
                yield [*line({**base_args, argument.name or "": value}, base_opts),
                       "--host", UNREACHABLE]


@pytest.fixture
def places(tmp_path: Path) -> Places:
    return Places(tmp_path)


@pytest.fixture
def no_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run of `blocktrail host` that starts after all is stopped after 20 s (and then fails
    as a bug: the sweep must never start a host)."""
    from blocktrail.host import daemon  # `blocktrail host` imports serve from it when it runs
    real = daemon.serve

    async def bounded(config: Any, started: Any = None, **kwargs: Any) -> None:
        await asyncio.wait_for(real(config, started, **kwargs), timeout=20)

    monkeypatch.setattr(daemon, "serve", bounded)


@pytest.mark.parametrize(("path", "command"), list(commands()),
                         ids=lambda x: " ".join(x) if isinstance(x, tuple) else "")
def test_every_command_with_bad_arguments(path: tuple[str, ...], command: click.Command,
                                          places: Places, no_serving: None,
                                          capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(places.root)  # a name as a local path lands here
    monkeypatch.delenv("BLOCKTRAIL_HOST", raising=False)
    monkeypatch.delenv("BLOCKTRAIL_REPO", raising=False)
    monkeypatch.delenv("BLOCKTRAIL_DEBUG", raising=False)
    runs = 0
    for args, as_json in itertools.product(invocations(path, command, places), (False, True)):
        if as_json and "--json" not in [o for p in command.params for o in p.opts]:
            continue
        argv = [*args, "--json"] if as_json else args
        code = main(argv)
        out, err = capsys.readouterr()
        runs += 1
        assert code in CODES, (argv, code, out, err)
        assert "Traceback" not in out + err, (argv, err)
        if as_json and code not in (0, ExitCode.USAGE, ExitCode.INTERRUPTED) and out.strip():
            assert set(json.loads(out)) >= {"error", "message"}, (argv, out)
        if code != 0:
            assert err.strip(), (argv, "an error without a word")
    assert runs >= 10


def test_the_sweep_sees_every_command() -> None:
    names = {" ".join(path) for path, _ in commands()}
    assert {"disk create", "disk import", "snapshot revert", "cbt query", "host", "backup",
            "restore", "verify", "check", "forget", "points", "repo init"} <= names


@pytest.mark.parametrize("args", [
    ["snapshot", "remove", "d0", "a%20b", "--host", UNREACHABLE],
    ["snapshot", "create", "d0", "..", "--host", UNREACHABLE],
    ["disk", "import", "/proc/self/environ", "d9"],
    ["cbt", "query", "d0", "--since", "garbage", "--host", UNREACHABLE],
    ["disk", "create", "api-token", "--size", "lots", "--host", UNREACHABLE],
    ["backup", "d0", "--repo", "/nonexistent/repo"],
    ["host", "--data", "/proc/self", "--api", "unix:/nonexistent/dir/api.sock"],
])
def test_a_handful_as_real_processes(args: list[str], tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "blocktrail.cli.main", *args],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert done.returncode in CODES, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr  # one line, usage errors too
