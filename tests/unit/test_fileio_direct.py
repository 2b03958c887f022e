"""OsFileIO.replace_atomic writes a big file's whole blocks past the page cache (O_DIRECT) and
its tail through it: the file reads back byte for byte whatever its length."""

from __future__ import annotations

import mmap
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

from blocktrail.fileio import DIRECT_MIN_BYTES, FileHandle, OsFileIO


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
