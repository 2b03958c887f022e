"""OsFileIO.replace_atomic writes a big file's whole blocks past the page cache (O_DIRECT) and
its tail through it: the file reads back byte for byte whatever its length. `pread_direct`
reads past the cache and gives the same bytes as a read through it."""

from __future__ import annotations

import errno
import mmap
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

from blocktrail import fileio
from blocktrail.fileio import DIRECT_MIN_BYTES, FileHandle, OsFileIO, pread_direct


@pytest.mark.parametrize("size", [0, 5, DIRECT_MIN_BYTES - 1, DIRECT_MIN_BYTES,
                                  DIRECT_MIN_BYTES + 1, DIRECT_MIN_BYTES + 4095,
                                  3 * DIRECT_MIN_BYTES + 4096])
def test_replace_atomic_reads_back(tmp_path: Path, size: int) -> None:
    fio = OsFileIO()
    path = tmp_path / "object"
    data = bytearray(os.urandom(size))
    fio.replace_atomic(str(path), data)
    assert path.read_bytes() == data
    assert not (tmp_path / "object.tmp").exists()


def test_a_smaller_file_after_a_bigger_one_reuses_the_buffer(tmp_path: Path) -> None:
    fio = OsFileIO()
    big, small = os.urandom(4 * DIRECT_MIN_BYTES + 100), os.urandom(DIRECT_MIN_BYTES + 7)
    fio.replace_atomic(str(tmp_path / "a"), big)
    fio.replace_atomic(str(tmp_path / "b"), small)
    assert (tmp_path / "a").read_bytes() == big
    assert (tmp_path / "b").read_bytes() == small


def test_page_aligned_memory_is_written_as_it_is(tmp_path: Path) -> None:
    buffer = mmap.mmap(-1, 3 * DIRECT_MIN_BYTES)
    buffer[:] = os.urandom(len(buffer))
    view = memoryview(buffer)[: 2 * DIRECT_MIN_BYTES + 77]  # a pack built in a mapped buffer
    OsFileIO().replace_atomic(str(tmp_path / "pack"), view)
    assert (tmp_path / "pack").read_bytes() == bytes(view)


def test_a_file_io_that_watches_its_handles_sees_a_big_files_writes(tmp_path: Path) -> None:
    """The fault injectors and the crash-point sweeps wrap the handles `create_empty` makes:
    a big file is written through such a handle like any other (no write passes beside it)."""
    seen: list[int] = []

    class Watched:
        def __init__(self, inner: FileHandle) -> None:
            self.inner = inner

        def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
            seen.append(len(data))
            self.inner.pwrite(data, offset)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    class Watching(OsFileIO):
        def create_empty(self, path: str) -> FileHandle:
            return Watched(super().create_empty(path))  # type: ignore[return-value]

    data = os.urandom(2 * DIRECT_MIN_BYTES + 5)
    Watching().replace_atomic(str(tmp_path / "pack"), data)
    assert seen == [len(data)]
    assert (tmp_path / "pack").read_bytes() == data


def test_where_o_direct_is_refused_everything_goes_through_the_cache() -> None:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm (tmpfs refuses O_DIRECT)")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as where:
        data = os.urandom(DIRECT_MIN_BYTES + 4097)
        OsFileIO().replace_atomic(os.path.join(where, "pack"), data)
        with open(os.path.join(where, "pack"), "rb") as f:
            assert f.read() == data


# ---------------------------------------------------------------------- reads past the cache


@pytest.fixture
def sparse_file(tmp_path: Path) -> tuple[FileHandle, bytes]:
    """A file of 3 MiB + 5 bytes: data, a hole, data written through the cache and not yet
    written back, and a short tail."""
    size = 3 * (1 << 20) + 5
    handle = OsFileIO().open(str(tmp_path / "layer"), create=True)
    handle.truncate(size)
    content = bytearray(size)
    for offset, length in [(0, 700_000), (1_500_000, 4096), (2_000_001, size - 2_000_001)]:
        block = os.urandom(length)
        handle.pwrite(block, offset)
        content[offset : offset + length] = block
    return handle, bytes(content)


@pytest.mark.parametrize(("offset", "count"), [
    (0, 1 << 20), (0, 3 * (1 << 20) + 5), (4096, 8192), (1, 1), (4095, 2), (700_000, 900_000),
    (1_499_999, 4098), (3 * (1 << 20), 5), (3 * (1 << 20) + 1, 4096), (3 * (1 << 20) + 5, 100),
    (5 << 20, 4096), (77, 0)])
def test_a_read_past_the_cache_gives_the_bytes_a_read_through_it_gives(
        sparse_file: tuple[FileHandle, bytes], offset: int, count: int) -> None:
    handle, content = sparse_file
    want = content[offset : offset + count].ljust(count, b"\0")  # past the end: zeros
    assert pread_direct(handle, count, offset) == handle.pread(count, offset) == want


def test_a_read_past_the_cache_that_the_file_holds_whole_is_a_view_not_a_copy(
        sparse_file: tuple[FileHandle, bytes]) -> None:
    handle, content = sparse_file
    for offset, count in [(0, 1 << 20), (4097, 70_000)]:
        data = pread_direct(handle, count, offset)
        assert isinstance(data, memoryview) and data == content[offset : offset + count]
        assert fileio.is_zeros(data) is False
    assert fileio.is_zeros(pread_direct(handle, 100_000, 1_400_000)[:90_000])  # in the hole


def test_a_read_past_the_cache_sees_what_was_just_written_through_it(
        sparse_file: tuple[FileHandle, bytes]) -> None:
    handle, _ = sparse_file
    for _ in range(3):  # written, read past the cache, written again in place: never stale
        block = os.urandom(1 << 20)
        handle.pwrite(block, 4096)
        assert pread_direct(handle, 1 << 20, 4096) == block


def test_without_a_descriptor_or_where_o_direct_is_refused_it_reads_through_the_cache(
        sparse_file: tuple[FileHandle, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    handle, content = sparse_file

    class NoDescriptor:
        def pread(self, count: int, offset: int) -> bytes:
            return handle.pread(count, offset)

        def dup(self) -> None:
            return None

    assert pread_direct(NoDescriptor(), 5000, 3) == content[3:5003]  # type: ignore[arg-type]

    def refused(*_: object) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(fileio.os, "preadv", refused)
    assert pread_direct(handle, 5000, 3) == content[3:5003]


def test_a_full_backup_reads_the_disk_past_the_cache(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from blocktrail.backup.engine import run_backup
    from blocktrail.backup.sources.local import LocalDiskSource
    from blocktrail.disk import Disk, chain
    from blocktrail.repo import Encryption, Repository

    direct: list[int] = []

    def counted(handle: FileHandle, count: int, offset: int) -> bytes:
        direct.append(count)
        return pread_direct(handle, count, offset)

    monkeypatch.setattr(chain, "pread_direct", counted)
    disk = Disk.create(tmp_path / "disk", 16 << 20)
    content = os.urandom(16 << 20)
    disk.pwrite(content, 0)
    repo = Repository.init(tmp_path / "repo", encryption=Encryption.none())
    point = run_backup(LocalDiskSource(disk), repo).point
    assert sum(direct) == 16 << 20  # every byte, in reads of a few MiB
    repo.restore(point.id, str(tmp_path / "restored"))
    assert (tmp_path / "restored").read_bytes() == content


def _direct_writes(monkeypatch: pytest.MonkeyPatch, handle: fileio.OsFileHandle
                   ) -> list[tuple[int, int]]:
    """(offset, length) of each write through the handle's O_DIRECT descriptor."""
    seen: list[tuple[int, int]] = []
    real = os.pwrite

    def pwrite(fd: int, data: Any, offset: int) -> int:
        if fd == handle._direct:
            seen.append((offset, len(data)))
        return real(fd, data, offset)

    monkeypatch.setattr(fileio.os, "pwrite", pwrite)
    return seen


@pytest.mark.parametrize(("offset", "length"), [(0, 1 << 20), (65536, 3 * 4096 + 5),
                                                (4096, 100), (0, 0)])
def test_pwrite_direct_writes_whole_blocks_past_the_cache_and_the_tail_through_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offset: int, length: int) -> None:
    handle = OsFileIO().open(str(tmp_path / "image"), create=True)
    assert isinstance(handle, fileio.OsFileHandle)
    seen = _direct_writes(monkeypatch, handle)
    memory = mmap.mmap(-1, max(length, 1))
    data = os.urandom(length)
    memory[:length] = data
    handle.pwrite(b"\xff" * (offset + length + 8192), 0)  # written over, in place
    handle.pwrite_direct(memoryview(memory)[:length], offset)
    handle.close()
    got = (tmp_path / "image").read_bytes()
    assert got[offset : offset + length] == data
    assert got[:offset] + got[offset + length :] == b"\xff" * (len(got) - length)
    bulk = length - length % 4096
    assert sum(n for _, n in seen) == bulk and all(o == offset for o, _ in seen[:1])


def test_pwrite_direct_of_memory_or_offsets_o_direct_cannot_take_goes_through_the_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    handle = OsFileIO().open(str(tmp_path / "image"), create=True)
    assert isinstance(handle, fileio.OsFileHandle)
    seen = _direct_writes(monkeypatch, handle)
    memory = memoryview(mmap.mmap(-1, 3 << 16))
    memory[:] = os.urandom(3 << 16)
    handle.pwrite_direct(memory[1 : (1 << 16) + 1], 0)  # memory not page-aligned
    handle.pwrite_direct(memory[: 1 << 16], 100)  # an offset not block-aligned
    handle.pwrite_direct(memoryview(bytearray(memory[: 1 << 16])), 1 << 17)  # a bytearray
    handle.close()
    assert seen == [] or all(n % 4096 == 0 for _, n in seen)
    got = (tmp_path / "image").read_bytes()
    assert got[1 << 17 :] == memory[: 1 << 16]
    assert got[100 : 100 + (1 << 16)] == memory[: 1 << 16]
    assert got[:100] == memory[1:101]


@pytest.mark.parametrize("refusal", ["open", "write"])
def test_where_o_direct_is_refused_pwrite_direct_writes_through_the_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: str) -> None:
    handle = OsFileIO().open(str(tmp_path / "image"), create=True)
    assert isinstance(handle, fileio.OsFileHandle)
    real_open, real_pwrite = os.open, os.pwrite

    def no_direct_open(path: str, flags: int, *args: Any) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    def no_direct_write(fd: int, data: Any, offset: int) -> int:
        if fd == handle._direct:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    with monkeypatch.context() as patch:
        if refusal == "open":
            patch.setattr(fileio.os, "open", no_direct_open)
        else:
            patch.setattr(fileio.os, "pwrite", no_direct_write)
        memory = memoryview(mmap.mmap(-1, 1 << 20))
        memory[:] = os.urandom(1 << 20)
        for _ in range(2):  # refused once: not asked again
            handle.pwrite_direct(memory, 0)
    assert handle._direct_refused
    handle.close()
    assert (tmp_path / "image").read_bytes() == memory


def test_pwrite_direct_into_a_tmpfs_file_reads_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """tmpfs took no O_DIRECT before Linux 6.6: either way the bytes are the same."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm here")
    with tempfile.NamedTemporaryFile(dir="/dev/shm") as file:
        handle = OsFileIO().open(file.name)
        memory = memoryview(mmap.mmap(-1, 1 << 20))
        memory[:] = os.urandom(1 << 20)
        handle.pwrite_direct(memory, 4096)
        handle.close()
        assert Path(file.name).read_bytes() == bytes(4096) + memory
