"""A restore onto a block device (a logical volume, a disk): written in place, its holes zeroed
on the device (which held something else before), the rest of a larger device left as it was.
Refused before the first write where the device is mounted or held, locked by another process
(a running VM), smaller than the image, or a chunk has no copy; an error after the first write
says that the device holds part of the image. The loop-device tests need root (losetup)."""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_repository import CS, image

from blocktrail.cli.main import main
from blocktrail.errors import BlocktrailError, FileInUse, InvalidArgument
from blocktrail.fileio import OsFileHandle
from blocktrail.repo import Repository
from blocktrail.repo import device as device_module
from blocktrail.repo.device import DeviceHandle
from blocktrail.repo.errors import ObjectMissing
from blocktrail.repo.manifest import RestorePoint
from blocktrail.repo.restore import restore_into, restore_target
from hostproc import qemu_like_lock, qemu_nbd_serving
from loopdevices import loop_device as attached
from repodamage import flip, object_file
from s3server import TEST_ENCRYPTION, TEST_PASSWORD

HOLES = frozenset({1, 2, 5})
GARBAGE = b"\xa5"


@pytest.fixture(params=["data", "hole"])
def point(request: pytest.FixtureRequest, tmp_path: Path
          ) -> tuple[Repository, RestorePoint, bytes]:
    """A point of 7 chunks, three of them holes, and the last one short (the image does not
    end on a chunk): data, or a hole too (zeroed up to the image's end, not the chunk's)."""
    repo = Repository.init(tmp_path / "repo", encryption=TEST_ENCRYPTION)
    chunks = image(11, 7, HOLES | ({6} if request.param == "hole" else set()))
    chunks[-1] = chunks[-1][: CS // 2 + 512]
    writer = repo.begin("d", sum(map(len, chunks)), None)
    for index, data in enumerate(chunks):
        writer.put_chunk(index, data)
    return repo, writer.commit(kind="full", change_id=None), b"".join(chunks)


def _data_bytes(content: bytes) -> int:
    """The bytes of the chunks that are no holes."""
    chunks = (content[i : i + CS] for i in range(0, len(content), CS))
    return sum(len(chunk) for chunk in chunks if chunk.strip(b"\0"))


def _prefilled(path: Path, size: int) -> None:
    path.write_bytes(GARBAGE * size)


def test_in_place_zeroes_the_holes_and_leaves_the_rest_alone(
        point: tuple[Repository, RestorePoint, bytes], tmp_path: Path) -> None:
    """What a device held before must not show through the point's holes; what lies past the
    image (a device larger than the disk was) stays as it was, also in the last chunk's room."""
    repo, restore_point, content = point
    target = tmp_path / "dev.img"
    _prefilled(target, len(content) + 3 * CS)
    fd = os.open(target, os.O_RDWR)
    try:
        written = restore_into(repo, OsFileHandle(fd), restore_point, None, in_place=True)
    finally:
        os.close(fd)
    after = target.read_bytes()
    assert after[: len(content)] == content
    assert after[len(content):] == GARBAGE * 3 * CS
    assert written == _data_bytes(content)


def test_a_chunk_with_no_copy_is_found_before_anything_is_written(
        point: tuple[Repository, RestorePoint, bytes], tmp_path: Path) -> None:
    """A chunk in no index file (its pack lost, say, and the index rebuilt): refused before the
    holes are zeroed. (A pack found damaged or gone once reading has begun is the next test.)"""
    repo, restore_point, content = point
    for index_file in (tmp_path / "repo" / "index").rglob("*"):
        if index_file.is_file():
            index_file.unlink()
    repo = Repository.open(tmp_path / "repo", password=TEST_PASSWORD)
    target = tmp_path / "dev.img"
    _prefilled(target, len(content))
    fd = os.open(target, os.O_RDWR)
    try:
        with pytest.raises(ObjectMissing):
            restore_into(repo, OsFileHandle(fd), restore_point, None, in_place=True)
    finally:
        os.close(fd)
    assert target.read_bytes() == GARBAGE * len(content)


@pytest.mark.parametrize("refusal", [errno.EOPNOTSUPP, errno.EINVAL])
def test_a_device_that_cannot_discard_or_zero_gets_zeros_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: int) -> None:
    """EOPNOTSUPP: the device cannot (asked no more); EINVAL: not this range (one not of whole
    logical blocks), the next one is asked again."""
    calls: list[int] = []

    def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
        calls.append(mode)
        return refusal

    monkeypatch.setattr(device_module, "fallocate", fallocate)
    path = tmp_path / "dev.img"
    _prefilled(path, 4 * CS)
    fd = os.open(path, os.O_RDWR)
    try:
        handle = DeviceHandle(fd, str(path))
        assert handle.size() == 4 * CS and not handle.changed
        handle.punch_hole(CS, CS + 100)
        handle.punch_hole(3 * CS, 5 * CS)  # clipped to the device
        assert handle.changed
        with pytest.raises(OSError, match="fixed"):
            handle.truncate(CS)
    finally:
        os.close(fd)
    assert path.read_bytes() == GARBAGE * CS + bytes(CS + 100) + GARBAGE * (CS - 100) + \
        bytes(CS)
    discard, zero = device_module.ZERO_MODES
    assert calls == ([discard, zero] if refusal == errno.EOPNOTSUPP else [discard, discard])


def test_a_device_that_fails_zeroing_otherwise_fails_the_restore(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_module, "fallocate", lambda *_: errno.EIO)
    path = tmp_path / "dev.img"
    _prefilled(path, CS)
    fd = os.open(path, os.O_RDWR)
    try:
        handle = DeviceHandle(fd, str(path))
        with pytest.raises(OSError, match="zeroing"):
            handle.punch_hole(0, CS)
        assert not handle.changed  # nothing was zeroed: the restore says nothing was written
    finally:
        os.close(fd)


def test_only_a_raw_restore_takes_a_block_device(tmp_path: Path) -> None:
    """A qcow2 image is a file (restore_target without devices); a character device is never
    a disk's target. Device nodes are only looked at, never opened."""
    if os.geteuid() != 0:
        pytest.skip("making device nodes needs root")
    node = tmp_path / "blk"
    os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(7, 250))
    (tmp_path / "lv").symlink_to(node)
    assert restore_target(str(tmp_path / "lv"), devices=True) == str(tmp_path / "lv")
    with pytest.raises(InvalidArgument, match="a block device: this restore writes an image"):
        restore_target(str(node))
    chr_node = tmp_path / "chr"
    os.mknod(chr_node, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    with pytest.raises(InvalidArgument, match="a character device"):
        restore_target(str(chr_node), devices=True)


def _unused_block_major() -> int | None:
    """A block device major number no driver here has (LANANA's 240-254 are for local use)."""
    with open("/proc/devices") as f:
        lines = f.read().partition("Block devices:")[2].split()
    taken = {int(word) for word in lines if word.isdigit()}
    return next((major for major in range(240, 255) if major not in taken), None)


def test_a_device_node_with_no_device_behind_it_is_refused(
        point: tuple[Repository, RestorePoint, bytes], tmp_path: Path) -> None:
    """A node left by a disk that is gone, or whose driver is not loaded (ENXIO at open): a
    clear refusal, nothing written, not an I/O error."""
    if os.geteuid() != 0:
        pytest.skip("making device nodes needs root")
    repo, restore_point, _ = point
    major = _unused_block_major()
    if major is None:
        pytest.skip("every local-use block major is taken here")
    node = tmp_path / "gone"
    os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(major, 0))
    with pytest.raises(InvalidArgument, match=r"no device behind it .*nothing was written"):
        repo.restore(restore_point.id, str(node))
    assert main(["restore", str(tmp_path / "repo"), restore_point.id, "--to", str(node)]) == 2


# -------------------------------------------------------------------- real (loop) devices

@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    """A loop device over a file of 8 chunks of garbage."""
    _prefilled(tmp_path / "backing.img", 8 * CS)
    with attached(tmp_path / "backing.img") as device:
        yield device


def _read_device(device: str) -> bytes:
    with open(device, "rb") as f:
        return f.read()


def test_a_restore_onto_a_device_reads_back_as_the_point(
        point: tuple[Repository, RestorePoint, bytes], loop_device: str,
        tmp_path: Path) -> None:
    repo, restore_point, content = point
    device = loop_device
    link = tmp_path / "vg-lv"  # as /dev/VG/LV leads to /dev/dm-N
    link.symlink_to(device)
    written = repo.restore(restore_point.id, str(link))
    after = _read_device(device)
    assert after[: len(content)] == content
    assert after[len(content):] == GARBAGE * (8 * CS - len(content))
    assert written == _data_bytes(content)
    assert link.is_symlink() and stat.S_ISBLK(os.stat(device).st_mode)


def test_a_device_in_use_locked_read_only_or_too_small_is_left_alone(
        point: tuple[Repository, RestorePoint, bytes], loop_device: str,
        tmp_path: Path) -> None:
    repo, restore_point, _ = point
    device, backing = loop_device, tmp_path / "backing.img"
    held = os.open(device, os.O_RDONLY | os.O_EXCL)  # as a mounted file system, or LVM
    try:
        with pytest.raises(FileInUse, match="mounted, or held"):
            repo.restore(restore_point.id, device)
    finally:
        os.close(held)
    locked = qemu_like_lock(device)  # a VM running on it
    try:
        with pytest.raises(FileInUse, match="lock"):
            repo.restore(restore_point.id, device)
    finally:
        os.close(locked)
    with attached(backing, read_only=True) as read_only, \
            pytest.raises(InvalidArgument, match="read-only device: nothing was written"):
        repo.restore(restore_point.id, read_only)
    small = tmp_path / "small.img"
    _prefilled(small, restore_point.size_bytes - 512)
    with attached(small) as too_small, \
            pytest.raises(InvalidArgument, match="nothing was written"):
        repo.restore(restore_point.id, too_small)
    assert small.read_bytes() == GARBAGE * (restore_point.size_bytes - 512)
    assert _read_device(device) == GARBAGE * 8 * CS


def test_damage_found_part_way_says_the_device_holds_part_of_the_image(
        point: tuple[Repository, RestorePoint, bytes], loop_device: str,
        tmp_path: Path) -> None:
    repo, restore_point, _ = point
    device = loop_device
    entries = dict(repo.page_entries(restore_point))
    loc = repo.index.get(entries[4])
    assert loc is not None
    flip(object_file(tmp_path / "repo", loc), loc.offset + loc.length // 2)
    with pytest.raises(BlocktrailError, match="holds part of the image"):
        repo.restore(restore_point.id, device)


def test_the_cli_restores_raw_onto_a_device_and_refuses_qcow2(
        point: tuple[Repository, RestorePoint, bytes], loop_device: str,
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, restore_point, content = point
    device = loop_device
    repo_dir = str(tmp_path / "repo")
    assert main(["restore", repo_dir, restore_point.id, "--to", device, "--format", "qcow2"]) \
        == 2
    assert _read_device(device) == GARBAGE * 8 * CS
    capsys.readouterr()
    assert main(["restore", repo_dir, restore_point.id, "--to", device, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["target"] == device and report["format"] == "raw"
    assert _read_device(device)[: len(content)] == content


@pytest.mark.interop
def test_a_device_qemu_nbd_serves_is_left_alone(
        point: tuple[Repository, RestorePoint, bytes], loop_device: str,
        tmp_path: Path) -> None:
    """QEMU locks a device it runs a VM on, as it locks an image file."""
    repo, restore_point, _ = point
    with qemu_nbd_serving(loop_device, tmp_path / "nbd.sock"), \
            pytest.raises(FileInUse, match="lock"):
        repo.restore(restore_point.id, loop_device)
    assert _read_device(loop_device) == GARBAGE * 8 * CS
