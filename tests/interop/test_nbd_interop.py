"""Real NBD clients nobody here wrote (qemu-io, qemu-img, nbdinfo, nbdcopy) against our host."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostproc import cli_json, require_tools, running_host

pytestmark = pytest.mark.interop
TOOLS = ("qemu-io", "qemu-img", "nbdinfo", "nbdcopy")


cli = cli_json


def run(*args: str) -> str:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120,
                          check=True).stdout


@pytest.fixture
def host(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    require_tools(*TOOLS)
    with running_host(tmp_path) as endpoints:
        yield endpoints


def uri(nbd: Path, export: str) -> str:
    return f"nbd+unix:///{export}?socket={nbd}"


def test_qemu_io_writes_and_reads_back(host: tuple[str, Path]) -> None:
    api, nbd = host
    cli("disk", "create", "disk0", "--size", "16M", "--host", api)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", "-c", "write -z 1M 4k",
        uri(nbd, "disk0"))
    out = run("qemu-io", "-f", "raw", "-c", "read -P 0x5a 1052672 61440",
              "-c", "read -P 0 1M 4k", uri(nbd, "disk0"))
    assert "Pattern verification failed" not in out and out.count("read ") == 2


def test_copies_equal_the_snapshot_and_maps_match_the_tracker(host: tuple[str, Path],
                                                              tmp_path: Path) -> None:
    api, nbd = host
    cli("disk", "create", "disk0", "--size", "32M", "--host", api)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 3M", uri(nbd, "disk0"))
    first = cli("snapshot", "create", "disk0", "s1", "--host", api)["change_id"]  # type: ignore[index]
    run("qemu-io", "-f", "raw", "-c", "write -P 0x22 8M 192k", "-c", "write -P 0x33 20M 4k",
        uri(nbd, "disk0"))
    cli("snapshot", "create", "disk0", "s2", "--host", api)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x44 0 1M", uri(nbd, "disk0"))  # after s2
    qemu_copy, nbd_copy = tmp_path / "a.raw", tmp_path / "b.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri(nbd, "disk0@s2"), str(qemu_copy))
    run("nbdcopy", uri(nbd, "disk0@s2"), str(nbd_copy))
    data = qemu_copy.read_bytes()
    assert data == nbd_copy.read_bytes()
    assert data[:3 << 20] == b"\x11" * (3 << 20)
    assert data[8 << 20 : (8 << 20) + (192 << 10)] == b"\x22" * (192 << 10)
    assert data[20 << 20 : (20 << 20) + 4096] == b"\x33" * 4096
    # the dirty-bitmap context equals query_changed_areas for the same interval
    lines = run("nbdinfo", f"--map=qemu:dirty-bitmap:{first}", uri(nbd, "disk0@s2"))
    dirty = [(int(o), int(n)) for o, n, state, *_ in (ln.split() for ln in lines.splitlines())
             if state == "1"]
    areas = cli("cbt", "query", "disk0", "--since", first, "--snapshot", "s2", "--host", api)
    assert dirty == [(a["offset"], a["length"]) for a in areas["changed_areas"]]  # type: ignore[index]
    allocation = run("nbdinfo", "--map=base:allocation", uri(nbd, "disk0@s2"))
    assert allocation.splitlines()[0].split()[:3] == ["0", str(3 << 20), "0"]


def test_refused_dirty_bitmap_is_an_error_not_clean(host: tuple[str, Path]) -> None:
    api, nbd = host
    cli("disk", "create", "disk0", "--size", "4M", "--host", api)
    start = cli("disk", "info", "disk0", "--host", api)["current_change_id"]  # type: ignore[index]
    cli("cbt", "reset", "disk0", "--host", api)  # start is stale now
    result = subprocess.run(["nbdinfo", f"--map=qemu:dirty-bitmap:{start}",
                             uri(nbd, "disk0")], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "clean" not in result.stdout


def test_snapshot_exports_are_read_only(host: tuple[str, Path]) -> None:
    api, nbd = host
    cli("disk", "create", "disk0", "--size", "4M", "--host", api)
    cli("snapshot", "create", "disk0", "s1", "--host", api)
    result = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 4k", uri(nbd, "disk0@s1")],
                            capture_output=True, text=True, timeout=60)
    assert "wrote" not in result.stdout
