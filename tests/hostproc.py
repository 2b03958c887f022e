"""Shared by the tests that run the real thing: `blocktrail host` as a child process, and the
check that the tools nobody here wrote are installed (a failure under CI, a skip elsewhere)."""

from __future__ import annotations

import fcntl
import json
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from blocktrail.cli.main import main
from blocktrail.host.client import HostClient

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


class HostProcess:
    """`blocktrail host` on unix sockets under ``root``, which a test may SIGKILL and start
    again on the same data directory; its stderr (the host's log) in ``root/host.log``."""

    def __init__(self, root: Path, env: dict[str, str] | None = None,
                 max_files: int | None = None) -> None:
        self.root = root
        self.env = env
        self.max_files = max_files  # the process's limit of open files (RLIMIT_NOFILE)
        root.mkdir(parents=True, exist_ok=True)
        self.api_socket, self.nbd_socket = root / "api.sock", root / "nbd.sock"
        self.log = root / "host.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"unix:{self.api_socket}"

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.nbd_socket}"

    def start(self, timeout_s: float = 60) -> HostProcess:
        for sock in (self.api_socket, self.nbd_socket):
            sock.unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "blocktrail.cli.main", "host", "--data",
                 str(self.root / "data"), "--api", self.endpoint, "--nbd",
                 f"unix:{self.nbd_socket}"], stderr=log, env=self.env,
                preexec_fn=None if self.max_files is None else self._limit_files)
        deadline = time.monotonic() + timeout_s
        while not (self.api_socket.exists() and self.nbd_socket.exists()):
            assert self.proc.poll() is None, f"the host did not start: {self.log.read_text()}"
            assert time.monotonic() < deadline, f"the host did not start in {timeout_s} s"
            time.sleep(0.05)
        time.sleep(0.2)
        return self

    def _limit_files(self) -> None:
        assert self.max_files is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.max_files, self.max_files))

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=30) == -signal.SIGKILL

    def stop(self) -> None:
        """SIGTERM; it must exit cleanly (status 0)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
                raise AssertionError("the host did not stop on SIGTERM in 60 s") from None
            assert code == 0, f"the host exited with {code}: {self.log.read_text()}"

    def __enter__(self) -> HostProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        client = HostClient(self.endpoint)
        try:
            return client.call(method, path, **kwargs)
        finally:
            client.close()


def qemu_like_lock(path: str | os.PathLike[str]) -> int:
    """A shared lock on byte 100 of ``path``, on a descriptor of its own (an open file
    description, as another process's): what QEMU takes on the image of a running VM. -> the
    descriptor (closing it drops the lock)."""
    fd = os.open(path, os.O_RDWR)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("@hhqqi4x", fcntl.F_RDLCK, os.SEEK_SET,
                                                   100, 1, 0))  # struct flock
    return fd


@contextmanager
def qemu_nbd_serving(path: str | os.PathLike[str], sock: Path) -> Iterator[None]:
    """``qemu-nbd`` serving the raw image or device ``path`` on ``sock``, once it holds its
    locks on it (it makes its socket before it opens the image: the socket alone says nothing
    about the locks)."""
    from blocktrail.fileio import locked_by_another

    require_tools("qemu-nbd")
    server = subprocess.Popen(["qemu-nbd", "-f", "raw", "-k", str(sock), "-t", str(path)])
    try:
        deadline = time.monotonic() + 10
        while not (sock.exists() and locked_by_another(str(path))):
            assert server.poll() is None, "qemu-nbd ended"
            assert time.monotonic() < deadline, "qemu-nbd took no lock on the image in 10 s"
            time.sleep(0.02)
        yield
    finally:
        server.terminate()
        server.wait()
