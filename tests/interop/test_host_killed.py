"""The host killed at an exact system call of an operation, from outside (strace's fault
injection), with a guest's writes made by qemu-io over NBD: the next backup is never silently
wrong."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from blocktrail.cli.main import main
from hostproc import cli_in_process, require_tools

pytestmark = pytest.mark.interop
MiB = 1 << 20


class Host:
    """`blocktrail host` that a test may kill and start again on the same data."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.api, self.nbd = root / "api.sock", root / "nbd.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"unix:{self.api}"

    def start(self) -> None:
        for sock in (self.api, self.nbd):
            sock.unlink(missing_ok=True)
        log = open(self.root / "host.log", "ab")  # noqa: SIM115 (the child keeps it)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "blocktrail.cli.main", "host", "--data",
             str(self.root / "data"), "--api", self.endpoint, "--nbd", f"unix:{self.nbd}"],
            stderr=log)
        log.close()
        deadline = time.monotonic() + 30
        while not (self.api.exists() and self.nbd.exists()):
            assert self.proc.poll() is None, (self.root / "host.log").read_text()
            assert time.monotonic() < deadline, "the host did not start in 30 s"
            time.sleep(0.05)
        time.sleep(0.2)

    def wait_killed(self) -> None:
        assert self.proc is not None
        assert self.proc.wait(timeout=30) == -signal.SIGKILL

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(timeout=30) == 0


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    require_tools("qemu-io", "strace")
    h = Host(tmp_path)
    h.start()
    try:
        yield h
    finally:
        h.stop()


def qemu_io(host: Host, *commands: str) -> None:
    args = ["qemu-io", "-f", "raw"]
    for command in commands:
        args += ["-c", command]
    subprocess.run([*args, f"nbd+unix:///d0?socket={host.nbd}"], check=True,
                   capture_output=True, timeout=60)


@contextmanager
def killed_at(pid: int, syscalls: str, when: int) -> Iterator[None]:
    """strace attached to every thread of ``pid``, delivering SIGKILL at the ``when``-th call
    of one of ``syscalls``; returns once strace is attached."""
    tracer = subprocess.Popen(["strace", "-f", "-p", str(pid), "-o", "/dev/null", "-e",
                               f"inject={syscalls}:signal=SIGKILL:when={when}"],
                              stderr=subprocess.PIPE, text=True)
    assert tracer.stderr is not None
    line = tracer.stderr.readline()
    assert "attached" in line, line
    time.sleep(0.3)  # every thread attached
    try:
        yield
    finally:
        try:
            tracer.wait(timeout=10)  # it ends with its tracee
        except subprocess.TimeoutExpired:
            tracer.terminate()  # detaches
            tracer.wait(timeout=10)


def restored_bytes(capsys: pytest.CaptureFixture[str], repo: str, point: str,
                   target: Path) -> bytes:
    cli_in_process(capsys, "restore", repo, point, "--to", str(target))
    return target.read_bytes()


@pytest.mark.parametrize("syscalls", ["rename,renameat,renameat2", "fsync,fdatasync",
                                      "unlink,unlinkat", "pwrite64"])
def test_host_killed_during_cbt_reset(host: Host, tmp_path: Path, syscalls: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The reproduction of a real failure: a reset killed between its steps reopened the old
    epoch with the write-intent bits gone, and the next incremental read 0 B."""
    repo = str(tmp_path / "repo")
    cli = cli_in_process
    cli(capsys, "repo", "init", repo)
    cli(capsys, "disk", "create", "d0", "--size", "64M", "--host", host.endpoint)
    qemu_io(host, "write -P 0x11 0 1M")
    cli(capsys, "backup", "d0", "--host", host.endpoint, "--repo", repo)
    qemu_io(host, "write -P 0x77 40M 64k", "flush")  # acknowledged and flushed
    assert host.proc is not None
    with killed_at(host.proc.pid, syscalls, 1):
        code = main(["cbt", "reset", "d0", "--host", host.endpoint, "--json"])
        capsys.readouterr()
        assert code != 0  # the host died under it
    host.wait_killed()
    host.start()
    after = cli(capsys, "backup", "d0", "--host", host.endpoint, "--repo", repo)
    assert after["bytes_read"] >= 64 << 10
    image = restored_bytes(capsys, repo, after["point"]["id"], tmp_path / "r.raw")
    assert image[:MiB] == b"\x11" * MiB
    assert image[40 * MiB : 40 * MiB + (64 << 10)] == b"\x77" * (64 << 10)
    assert image.count(0) == len(image) - MiB - (64 << 10)
