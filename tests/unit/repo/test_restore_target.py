"""What a restore writes to: a new file (its owner's alone), a regular file it replaces (whose
permissions, owner and group the image takes, so that a hypervisor that read the old one reads
the new one), the file a symbolic link leads to (the link stays), or a block device
(test_restore_device). Anything else (a character device, a FIFO, a socket, a directory, a link
to nothing) is refused before anything is read or written: renamed over, it would be replaced by
a file. So is a file another process holds a
lock on: a running VM's image."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest
from test_repository import image, store

from blocktrail.disk.importer import import_raw
from blocktrail.errors import FileInUse, InvalidArgument
from blocktrail.fileio import OsFileIO
from blocktrail.repo import Repository
from blocktrail.repo.manifest import RestorePoint
from hostproc import qemu_like_lock, qemu_nbd_serving
from s3server import TEST_ENCRYPTION

ROOT = os.geteuid() == 0


@pytest.fixture(params=["unnamed", "named"])
def point(request: pytest.FixtureRequest, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> tuple[Repository, RestorePoint, bytes]:
    """A repository with one point; restores write files with no name first, or, on a file
    system without them, named ones."""
    if request.param == "named":
        monkeypatch.setattr(OsFileIO, "create_unnamed", lambda self, directory: None)
    repo = Repository.init(tmp_path / "repo", encryption=TEST_ENCRYPTION)
    chunks = image(3, 4)
    return repo, store(repo, "d", chunks), b"".join(chunks)


def test_a_replaced_file_keeps_its_permissions_owner_and_group(
        point: tuple[Repository, RestorePoint, bytes], tmp_path: Path) -> None:
    repo, restore_point, content = point
    target = tmp_path / "vm.raw"
    target.write_bytes(b"the old image")
    target.chmod(0o640)
    if ROOT:
        os.chown(target, 4321, 4322)
    repo.restore(restore_point.id, str(target))
    after = target.stat()
    assert target.read_bytes() == content
    assert stat.S_IMODE(after.st_mode) == 0o640
    if ROOT:
        assert (after.st_uid, after.st_gid) == (4321, 4322)
    target.chmod(0o4755)  # set-ID bits are not taken over
    repo.restore(restore_point.id, str(target))
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    new = tmp_path / "new.raw"
    repo.restore(restore_point.id, str(new))
    assert stat.S_IMODE(new.stat().st_mode) == 0o600


def test_a_file_system_that_keeps_no_modes_or_owners_restores_all_the_same(
        point: tuple[Repository, RestorePoint, bytes], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """vfat or CIFS refuse chmod and chown: the image is restored, with the mode it has."""
    repo, restore_point, content = point
    target = tmp_path / "vm.raw"
    target.write_bytes(b"old")

    def refused(*args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "fchmod", refused)
    monkeypatch.setattr(os, "fchown", refused)
    repo.restore(restore_point.id, str(target))
    assert target.read_bytes() == content


def test_a_symbolic_link_is_written_through(point: tuple[Repository, RestorePoint, bytes],
                                            tmp_path: Path) -> None:
    repo, restore_point, content = point
    images = tmp_path / "images"
    images.mkdir()
    real = images / "vm.raw"
    real.write_bytes(b"old")
    real.chmod(0o644)
    link = tmp_path / "vm-link.raw"
    link.symlink_to(os.path.relpath(real, tmp_path))
    repo.restore(restore_point.id, str(link))
    assert link.is_symlink() and os.readlink(link) == "images/vm.raw"
    assert real.read_bytes() == content and stat.S_IMODE(real.stat().st_mode) == 0o644
    assert sorted(os.listdir(images)) == ["vm.raw"]


def _specials(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, what the error calls it)."""
    out = {"fifo": (tmp_path / "fifo", "a FIFO"), "directory": (tmp_path / "dir", "a directory"),
           "socket": (tmp_path / "sock", "a socket"),
           "dangling link": (tmp_path / "dangling", "leads to no file"),
           "link in a circle": (tmp_path / "circle", "leads to no file")}
    os.mkfifo(out["fifo"][0])
    out["directory"][0].mkdir()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(out["socket"][0]))
    listener.close()
    out["dangling link"][0].symlink_to(tmp_path / "nowhere")
    out["link in a circle"][0].symlink_to(out["link in a circle"][0].name)
    if ROOT:  # a device node: never opened, only looked at (block devices: test_restore_device)
        out["character device"] = (tmp_path / "chr", "a character device")
        os.mknod(out["character device"][0], stat.S_IFCHR | 0o600, os.makedev(1, 3))
        out["link to a device"] = (tmp_path / "to-chr", "a character device")
        out["link to a device"][0].symlink_to(out["character device"][0])
    return out


def test_what_is_no_regular_file_is_refused_and_left_alone(
        point: tuple[Repository, RestorePoint, bytes], tmp_path: Path) -> None:
    repo, restore_point, _ = point
    out = tmp_path / "out"
    out.mkdir()
    specials = _specials(out)
    before = {p.name: (p.lstat().st_mode, p.lstat().st_ino) for p in out.iterdir()}
    for path, called in specials.values():
        with pytest.raises(InvalidArgument, match=called):
            repo.restore(restore_point.id, str(path))
    assert {p.name: (p.lstat().st_mode, p.lstat().st_ino) for p in out.iterdir()} == before
    assert not (out / "nowhere").exists()
    with pytest.raises(InvalidArgument, match=r"its directory .* does not exist"):
        repo.restore(restore_point.id, str(out / "no such directory" / "vm.raw"))


def test_a_file_another_process_holds_a_lock_on_is_left_alone(
        point: tuple[Repository, RestorePoint, bytes], tmp_path: Path) -> None:
    """A running VM's image (QEMU holds locks on it): replaced, the VM would go on writing into
    the old file, and those writes would be lost. Refused; once the lock is gone, restored."""
    repo, restore_point, content = point
    target = tmp_path / "vm.raw"
    target.write_bytes(b"the image a VM runs on")
    fd = qemu_like_lock(target)
    try:
        with pytest.raises(FileInUse, match="in use"):
            repo.restore(restore_point.id, str(target))
        assert target.read_bytes() == b"the image a VM runs on"
    finally:
        os.close(fd)
    repo.restore(restore_point.id, str(target))
    assert target.read_bytes() == content


@pytest.mark.interop
def test_an_image_qemu_nbd_serves_is_neither_replaced_nor_imported(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", encryption=TEST_ENCRYPTION)
    restore_point = store(repo, "d", image(4, 4))
    target = tmp_path / "vm.raw"
    target.write_bytes(bytes(1 << 20))
    with qemu_nbd_serving(target, tmp_path / "nbd.sock"):
        with pytest.raises(FileInUse, match="in use"):
            repo.restore(restore_point.id, str(target))
        assert target.read_bytes() == bytes(1 << 20)
        with pytest.raises(FileInUse, match="in use"):  # nor imported: it changes meanwhile
            import_raw(target, tmp_path / "imported")
        assert not (tmp_path / "imported").exists()
