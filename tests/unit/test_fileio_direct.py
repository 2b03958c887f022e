"""OsFileIO.replace_atomic writes a big file's whole blocks past the page cache (O_DIRECT) and
its tail through it: the file reads back byte for byte whatever its length."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from blocktrail.fileio import DIRECT_MIN_BYTES, OsFileIO


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
