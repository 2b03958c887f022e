"""Shared by the tests that run the real thing: `blocktrail host` as a child process, and the
check that the tools nobody here wrote are installed (a failure under CI, a skip elsewhere)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from blocktrail.cli.main import main

PACKAGES = {"qemu-io": "qemu-utils", "qemu-img": "qemu-utils", "qemu-nbd": "qemu-utils",
            "qemu-storage-daemon": "qemu-system-common", "nbdinfo": "libnbd-bin",
            "nbdcopy": "libnbd-bin", "nbdkit": "nbdkit", "strace": "strace",
            "chromium": "chromium", "chromedriver": "chromium-driver"}


def require_tools(*names: str) -> None:
    missing = [t for t in names if shutil.which(t) is None]
    if missing:
        packages = sorted({PACKAGES.get(t, t) for t in missing})
        if os.environ.get("CI"):
            pytest.fail(f"missing {missing} (Debian packages {', '.join(packages)})")
        pytest.skip(f"missing {missing}")


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(api: str, api_sock: Path) -> bool:
    if api.startswith("unix:"):
        return api_sock.exists()
    host, _, port = api.removeprefix("tcp:").removeprefix("http://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return False
    return True


@contextmanager
def running_host(tmp_path: Path, *extra: str, nbd: bool = True,
                 api: str | None = None) -> Iterator[tuple[str, Path]]:
    """`blocktrail host` on unix sockets under ``tmp_path`` (or the API on ``api``, e.g.
    tcp:127.0.0.1:PORT); -> (API endpoint, NBD socket). It must stop cleanly (exit code 0) on
    SIGTERM."""
    api_sock, nbd_path = tmp_path / "api.sock", tmp_path / "nbd.sock"
    api = api or f"unix:{api_sock}"
    args = [sys.executable, "-m", "blocktrail.cli.main", "host", "--data",
            str(tmp_path / "data"), "--api", api]
    if nbd:
        args += ["--nbd", f"unix:{nbd_path}"]
    log = tmp_path / "host.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([*args, *extra], stderr=stderr)
    try:
        deadline = time.monotonic() + 30
        while not (_listening(api, api_sock) and (nbd_path.exists() or not nbd)):
            if proc.poll() is not None:
                pytest.fail(f"the host did not start: {log.read_text()}")
            assert time.monotonic() < deadline, "the host did not start in 30 s"
            time.sleep(0.05)
        time.sleep(0.2)
        yield api, nbd_path
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def cli_json(*args: str) -> Any:
    """`blocktrail ARGS --json` in a child process; it must succeed."""
    out = subprocess.run([sys.executable, "-m", "blocktrail.cli.main", *args, "--json"],
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def cli_in_process(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    """`blocktrail ARGS --json` through `main` in this process; it must succeed."""
    code = main([*args, "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    result = json.loads(out)
    assert isinstance(result, dict)
    return result
