"""Each command imports only what it needs: no server code in a client, heavy libraries where
they are used. (How long start-up takes is measured in bench/cli_bench.py, not here.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from blocktrail.repo import Repository
from s3server import TEST_ENCRYPTION, TEST_PASSWORD

SERVER_SIDE = ("fastapi", "uvicorn", "starlette", "pydantic", "blocktrail.host.api",
               "blocktrail.host.daemon", "blocktrail.nbd.server")
HEAVY = ("numpy", "pyroaring", "httpx", "rich", "asyncio")


def loaded_by(*argv: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``blocktrail ARGV``."""
    script = ("import json, sys\nfrom blocktrail.cli.main import main\n"
              f"code = main({list(argv)!r})\n"
              "print(json.dumps([code, sorted(sys.modules)]))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    code, modules = json.loads(out.splitlines()[-1])
    assert code == 0, out
    return set(modules)


def _matching(modules: set[str], prefixes: tuple[str, ...]) -> set[str]:
    return {m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes)}


@pytest.mark.parametrize("argv", [["--help"], ["points", "--help"], ["backup", "--help"],
                                  ["host", "--help"], ["disk", "create", "--help"],
                                  ["snapshot", "list", "--help"], ["cbt", "query", "--help"],
                                  ["restore", "--help"], ["serve", "--help"],
                                  ["worker", "--help"]],
                         ids=" ".join)
def test_help_loads_nothing_heavy(argv: list[str]) -> None:
    modules = loaded_by(*argv)
    assert not _matching(modules, (*SERVER_SIDE, *HEAVY))


def test_points_loads_the_repository_only(tmp_path: Path) -> None:
    Repository.init(tmp_path / "repo", encryption=TEST_ENCRYPTION).close()
    modules = loaded_by("points", str(tmp_path / "repo"))
    assert "blocktrail.repo.repository" in modules
    assert not _matching(modules, (*SERVER_SIDE, *HEAVY, "boto3", "botocore"))


def test_a_local_backup_loads_no_s3_client(tmp_path: Path) -> None:
    """boto3 and botocore take ~0.4 s to import: only an s3:// repository loads them."""
    from blocktrail.disk import Disk
    Repository.init(tmp_path / "repo", encryption=TEST_ENCRYPTION).close()
    Disk.create(tmp_path / "d0", 1 << 20).close()
    modules = loaded_by("backup", str(tmp_path / "d0"), "--repo", str(tmp_path / "repo"))
    assert "blocktrail.backup.engine" in modules
    assert not _matching(modules, (*SERVER_SIDE, "boto3", "botocore"))


def test_a_client_of_a_host_loads_no_server_code(tmp_path: Path) -> None:
    """`blocktrail disk info NAME --host ...` talks HTTP, and needs none of the server."""
    script = ("import json, sys\nfrom blocktrail.cli.main import main\n"
              f"main(['disk', 'info', 'd0', '--host', 'unix:{tmp_path}/none.sock'])\n"
              "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    modules = set(json.loads(out.splitlines()[-1]))
    assert "httpx" in modules  # it did try to reach the host
    assert not _matching(modules, (*SERVER_SIDE, "numpy"))


def test_a_repository_is_opened_without_its_operations(tmp_path: Path) -> None:
    """A command derives the repository's key (argon2id, the slow part of opening) on a
    thread while it imports the rest: opening needs none of the operations' code, and the
    package imports none of it until a name is used."""
    Repository.init(tmp_path / "repo", encryption=TEST_ENCRYPTION).close()
    script = ("import json, sys\nfrom blocktrail.repo.location import open_unlocked\n"
              f"opened = open_unlocked({str(tmp_path / 'repo')!r}, password={TEST_PASSWORD!r})\n"
              "assert opened.unlocked.keys is not None\n"
              "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    modules = set(json.loads(out.splitlines()[-1]))
    operations = {f"blocktrail.repo.{name}" for name in (
        "repository", "check", "prune", "forget", "repair", "restore", "writer", "sink")}
    assert not modules & operations, modules & operations
