"""The pieces the guest tests are built from, without booting anything: the newc cpio writer
(read back by busybox's cpio), the order the virtio modules are loaded in, and what happens
when a piece is missing (a failure under CI, a skip elsewhere)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from guestvm import Cpio, _modules_in_order, require_kit

pytestmark = pytest.mark.guest


def test_a_newc_archive_reads_back_with_busybox_cpio(tmp_path: Path) -> None:
    if not Path("/bin/busybox").is_file():
        pytest.skip("no /bin/busybox (Debian package busybox-static)")
    first = Cpio()
    first.file("bin/tool", b"#!/bin/sh\necho hi\n", 0o755)
    first.symlink("bin/alias", "tool")
    first.file("etc/odd", b"x" * 5)  # lengths that need padding, name and data
    second = Cpio(first_inode=1000)
    second.file("etc/odd", b"replaced")  # a later archive's entry wins, as in the kernel
    second.file("deep/er/file", b"")
    archive = first.finish() + second.finish()
    assert len(archive) % 512 == 0
    root = tmp_path / "root"
    root.mkdir()
    for chunk in _archives(archive):
        subprocess.run(["/bin/busybox", "cpio", "-i", "-d", "-m", "-u"], input=chunk, cwd=root,
                       check=True, capture_output=True, timeout=30)
    assert (root / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE((root / "bin/tool").stat().st_mode) == 0o755
    assert os.readlink(root / "bin/alias") == "tool"
    assert (root / "etc/odd").read_bytes() == b"replaced"
    assert (root / "deep/er/file").read_bytes() == b""


def _archives(data: bytes) -> list[bytes]:
    """Concatenated archives, split after each trailer's padding (busybox reads one)."""
    parts, start = [], 0
    while start < len(data):
        end = data.index(b"TRAILER!!!", start) + len(b"TRAILER!!!")
        end += -end % 512
        parts.append(data[start:end])
        start = end
    return parts


def test_a_device_node_reads_back_with_its_numbers(tmp_path: Path) -> None:
    if not Path("/bin/busybox").is_file() or os.geteuid() != 0:
        pytest.skip("needs /bin/busybox (busybox-static) and root (to make the node)")
    cpio = Cpio()
    cpio.char_device("dev/console", 5, 1)
    subprocess.run(["/bin/busybox", "cpio", "-i", "-d"], input=cpio.finish(), cwd=tmp_path,
                   check=True, capture_output=True, timeout=30)
    node = (tmp_path / "dev/console").stat()
    assert stat.S_ISCHR(node.st_mode) and stat.S_IMODE(node.st_mode) == 0o600
    assert (os.major(node.st_rdev), os.minor(node.st_rdev)) == (5, 1)


def _module(directory: Path, name: str, depends: str) -> None:
    (directory / f"{name}.ko").write_bytes(
        b"\x7fELF...\0license=GPL\0depends=" + depends.encode() + b"\0name=" + name.encode()
        + b"\0")


def test_modules_load_after_what_they_depend_on(tmp_path: Path) -> None:
    _module(tmp_path, "virtio_ring", "")
    _module(tmp_path, "virtio", "virtio_ring")
    _module(tmp_path, "virtio_pci_modern_dev", "")
    _module(tmp_path, "virtio_pci", "virtio_ring,virtio_pci_modern_dev,virtio")
    _module(tmp_path, "virtio_blk", "virtio,virtio_ring")
    order = _modules_in_order(tmp_path, ("virtio_pci", "virtio_blk"))
    assert order is not None
    names = [p.stem for p in order]
    assert sorted(names) == sorted(["virtio_ring", "virtio", "virtio_pci_modern_dev",
                                    "virtio_pci", "virtio_blk"])
    for name, needs in [("virtio", ["virtio_ring"]), ("virtio_blk", ["virtio", "virtio_ring"]),
                        ("virtio_pci", ["virtio_ring", "virtio_pci_modern_dev", "virtio"])]:
        assert all(names.index(dep) < names.index(name) for dep in needs), names
    (tmp_path / "virtio_ring.ko").unlink()
    assert _modules_in_order(tmp_path, ("virtio_pci", "virtio_blk")) is None


@pytest.mark.parametrize("ci", ["true", ""])
def test_a_missing_kernel_fails_under_ci_and_skips_elsewhere(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ci: str) -> None:
    monkeypatch.setenv("BLOCKTRAIL_GUEST_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("CI", ci)
    outcome = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(outcome) as raised:
        require_kit()
    assert f"the guest kernel and its virtio modules in {tmp_path / 'empty'}" in str(
        raised.value)
    assert "./run test" in str(raised.value)
