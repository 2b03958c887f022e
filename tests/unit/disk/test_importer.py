"""import_raw: a regular file or a block device whose size is where its data ends, imported
whole or not at all. Anything else (a /proc file that says 0 bytes, a FIFO, a directory, a
character device, a missing file, a file that grows during the import) is refused with
InvalidArgument and creates nothing, and a FIFO never blocks the importer."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from blocktrail.disk import Disk
from blocktrail.disk.importer import BUILDING_PREFIX, import_raw
from blocktrail.errors import DiskExists, DiskNoSpace, FileInUse, InvalidArgument
from hostproc import qemu_like_lock
from loopdevices import loop_device as attached

MiB = 1 << 20


def _nothing_created(parent: Path, target: Path) -> None:
    assert not target.exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(BUILDING_PREFIX)]


def test_a_sparse_file_is_imported_whole(tmp_path: Path) -> None:
    raw = tmp_path / "image.raw"
    with open(raw, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(b"\x01" * 70000)
    with import_raw(raw, tmp_path / "d", 4096) as disk:
        assert disk.size_bytes == 4 * MiB
        assert disk.pread(4 * MiB, 0) == raw.read_bytes()
        areas = disk.query_changed_areas("*").changed_areas
        assert [(e.offset, e.length) for e in areas] == [(MiB, 73728)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "image.raw"]


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


def _refused(source: str | Path, tmp_path: Path, match: str) -> None:
    target = tmp_path / "imported"
    result: list[BaseException | None] = []

    def attempt() -> None:
        try:
            import_raw(source, target)
            result.append(None)
        except BaseException as exc:
            result.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)  # a FIFO must not block it
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), f"importing {source} blocked"
    assert isinstance(result[0], InvalidArgument), result
    assert match in result[0].message, result[0].message
    _nothing_created(tmp_path, target)


@pytest.mark.parametrize(("source", "match"), [
    ("/proc/self/environ", "not where its data ends"),
    ("/proc/self/status", "not where its data ends"),
    ("/proc/self/mem", "Input/output error"),
    ("/dev/null", "a character device"),
    ("/dev/zero", "a character device"),
    ("/nonexistent/image.raw", "No such file or directory"),
])
def test_what_is_not_a_raw_image_is_refused(source: str, match: str, tmp_path: Path) -> None:
    if not os.path.exists(os.path.dirname(source)) and "nonexistent" not in source:
        pytest.skip(f"no {source} here")
    _refused(source, tmp_path, match)


def test_a_fifo_a_directory_and_a_socket_are_refused(fifo: Path, tmp_path: Path) -> None:
    _refused(fifo, tmp_path, "a FIFO")
    _refused(tmp_path, tmp_path, "a directory")
    import socket
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    try:
        _refused(tmp_path / "sock", tmp_path, "a socket")
    finally:
        sock.close()


@pytest.mark.parametrize(("header", "kind"), [
    (b"QFI\xfb\x00\x00\x00\x03", "qcow2"), (b"KDMV", "VMDK"), (b"vhdxfile", "VHDX"),
    (b"conectix", "VHD"), (bytes(64) + b"\x7f\x10\xda\xbe", "VDI")])
def test_an_image_of_another_format_is_refused(tmp_path: Path, header: bytes,
                                               kind: str) -> None:
    """Imported as raw, a qcow2 (or VMDK, VHDX, VHD, VDI) file's bytes would be taken for the
    disk's: a disk that boots nothing, whose backups all succeed. Refused, saying how to
    convert it."""
    source = tmp_path / "vm.img"
    source.write_bytes(header + bytes(MiB - len(header)))
    _refused(source, tmp_path, f"it is a {kind} image, not a raw one")


def test_a_qcow2_image_qemu_img_made_is_refused(tmp_path: Path) -> None:
    from hostproc import require_tools
    require_tools("qemu-img")
    source = tmp_path / "vm.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(source), "1M"], check=True)
    _refused(source, tmp_path, "qemu-img convert -O raw")


def test_an_image_another_process_holds_a_lock_on_is_refused(tmp_path: Path) -> None:
    """A running VM's image (QEMU holds a shared lock on its byte 100): it changes while it is
    read, and the copy would mix its states. Refused, nothing created; imported once the lock
    is gone."""
    raw = tmp_path / "vm.raw"
    raw.write_bytes(os.urandom(MiB))
    fd = qemu_like_lock(raw)
    try:
        with pytest.raises(FileInUse, match="in use"):
            import_raw(raw, tmp_path / "d")
        _nothing_created(tmp_path, tmp_path / "d")
    finally:
        os.close(fd)
    with import_raw(raw, tmp_path / "d") as disk:
        assert disk.pread(MiB, 0) == raw.read_bytes()


def test_a_file_swapped_for_a_fifo_after_the_check_does_not_block(
        fifo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race: the check saw a regular file, the open meets a FIFO (no writer). O_NONBLOCK
    keeps the open from waiting, and the second look (fstat) refuses it."""
    real_stat = os.stat

    def regular(path: str | os.PathLike[str], **kwargs: bool) -> os.stat_result:
        st = real_stat(path, **kwargs)
        if os.fspath(path) != str(fifo):
            return st
        fields = list(st)
        fields[0] = stat.S_IFREG | 0o644
        return os.stat_result(fields)

    monkeypatch.setattr(os, "stat", regular)
    _refused(fifo, tmp_path, "a FIFO")


def test_a_file_that_grows_during_the_import_is_refused(tmp_path: Path) -> None:
    raw = tmp_path / "growing.raw"
    raw.write_bytes(b"\x07" * (3 * MiB))

    def grow(done: int, total: int) -> None:
        with open(raw, "ab") as f:
            f.write(b"\x08" * 4096)

    target = tmp_path / "d"
    with pytest.raises(InvalidArgument, match="not where its data ends"):
        import_raw(raw, target, progress=grow)
    _nothing_created(tmp_path, target)


def test_a_file_that_shrinks_during_the_import_is_refused(tmp_path: Path) -> None:
    raw = tmp_path / "shrinking.raw"
    raw.write_bytes(b"\x07" * (3 * MiB))

    def shrink(done: int, total: int) -> None:
        os.truncate(raw, MiB)

    target = tmp_path / "d"
    with pytest.raises(InvalidArgument, match="could not be read"):
        import_raw(raw, target, progress=shrink)
    _nothing_created(tmp_path, target)


def test_a_failure_midway_leaves_nothing(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tmp_path / "image.raw"
    raw.write_bytes(os.urandom(3 * MiB))
    writes = 0
    real = Disk.pwrite

    def full(self: Disk, buf: bytes, offset: int) -> None:
        nonlocal writes
        writes += 1
        if writes == 2:
            raise DiskNoSpace("the file system is full (simulated)")
        real(self, buf, offset)

    monkeypatch.setattr(Disk, "pwrite", full)
    target = tmp_path / "d"
    with pytest.raises(DiskNoSpace):
        import_raw(raw, target)
    _nothing_created(tmp_path, target)


def test_an_existing_target_is_not_touched(tmp_path: Path) -> None:
    raw = tmp_path / "image.raw"
    raw.write_bytes(b"\x01" * 4096)
    target = tmp_path / "d"
    target.mkdir()
    (target / "keep").write_bytes(b"mine")
    with pytest.raises(DiskExists):
        import_raw(raw, target)
    assert [p.name for p in target.iterdir()] == ["keep"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(BUILDING_PREFIX)]
    for made in (lambda: import_raw(raw, raw), lambda: Disk.create(raw, MiB)):  # a file
        with pytest.raises(DiskExists, match="already exists"):  # not "Not a directory"
            made()
    assert raw.read_bytes() == b"\x01" * 4096


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    backing = tmp_path / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(2 * MiB)
        f.write(b"\x42" * 100_000)
    with attached(backing) as device:
        yield device


def test_a_block_device_is_imported_at_its_size(loop_device: str, tmp_path: Path) -> None:
    assert os.stat(loop_device).st_size == 0  # what a device's stat says
    with import_raw(loop_device, tmp_path / "d", 4096) as disk:
        assert disk.size_bytes == 8 * MiB
        with open(loop_device, "rb") as f:
            assert disk.pread(8 * MiB, 0) == f.read()


KILLED_IMPORT = """
import os, signal, sys
from blocktrail.disk.importer import import_raw
def die(done, total):
    os.kill(os.getpid(), signal.SIGKILL)
import_raw(sys.argv[1], sys.argv[2], progress=die)
"""


def _age(path: Path, seconds: float) -> None:
    old = os.stat(path).st_mtime - seconds
    os.utime(path, (old, old))


def test_what_a_killed_import_left_is_removed_by_the_next_import(tmp_path: Path) -> None:
    image = tmp_path / "img.raw"
    image.write_bytes(os.urandom(4 << 20))
    target = tmp_path / "d0"
    run = subprocess.run([sys.executable, "-c", KILLED_IMPORT, str(image), str(target)],
                         check=False)
    assert run.returncode == -9
    left = [n for n in os.listdir(tmp_path) if n.startswith(f"{BUILDING_PREFIX}d0-")]
    assert len(left) == 1 and not target.exists()
    # A build of another name, and one of this name still being written (its lock held), stay.
    other = tmp_path / f"{BUILDING_PREFIX}d1-0000"
    live = tmp_path / f"{BUILDING_PREFIX}d0-live"
    other.mkdir()
    with Disk.create(live, 1 << 20):
        for path in (tmp_path / left[0], other, live):
            _age(path, 3600)
        import_raw(image, target).close()
        assert not (tmp_path / left[0]).exists()
        assert other.exists() and live.exists()
    with Disk.open(target) as disk:
        assert disk.pread(4 << 20, 0) == image.read_bytes()


def test_a_fresh_build_directory_is_left_alone(tmp_path: Path) -> None:
    """Unchanged for less than a minute: perhaps a build between its close and its rename."""
    image = tmp_path / "img.raw"
    image.write_bytes(os.urandom(1 << 20))
    fresh = tmp_path / f"{BUILDING_PREFIX}d0-fresh"
    fresh.mkdir()
    import_raw(image, tmp_path / "d0").close()
    assert fresh.exists()


def test_a_symlink_named_like_a_build_is_never_followed(tmp_path: Path) -> None:
    """A `.creating-d0-*` that is a symbolic link (no build makes one) to a directory: the files
    there stay, however old the link is."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "lock").write_bytes(b"")
    (precious / "keep.txt").write_bytes(b"mine")
    link = tmp_path / f"{BUILDING_PREFIX}d0-evil"
    link.symlink_to(precious)
    old = os.lstat(link).st_mtime - 3600
    os.utime(precious, (old, old))
    image = tmp_path / "img.raw"
    image.write_bytes(os.urandom(1 << 20))
    import_raw(image, tmp_path / "d0").close()
    assert (precious / "keep.txt").read_bytes() == b"mine"
    assert link.is_symlink()
