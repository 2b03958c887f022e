"""`ImageWriter`: whatever the order and size of the writes given, the file ends as a model of
the same writes, in order, says; consecutive writes go out together past the page cache; a
failed write is an error, and after an error no write is in flight any more."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocktrail.fileio import FileHandle, OsFileHandle, OsFileIO
from blocktrail.repo.imagewriter import ImageWriter

RUN = 64 << 10  # a small buffer: runs end often


class Recorded:
    """An OS file handle that records the writes it is given (and where they came from)."""

    def __init__(self, inner: FileHandle, *, fail_at: int | None = None,
                 slow: float = 0.0) -> None:
        self.inner, self.fail_at, self.slow = inner, fail_at, slow
        self.writes: list[tuple[str, int, int]] = []  # (method, offset, length)
        self.closed = False

    def _record(self, method: str, data: bytes | bytearray | memoryview, offset: int) -> None:
        if self.closed:
            raise AssertionError("written after the writer was left")
        time.sleep(self.slow)
        self.writes.append((method, offset, len(data)))
        if self.fail_at is not None and len(self.writes) == self.fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        self._record("pwrite", data, offset)
        self.inner.pwrite(data, offset)

    def pwrite_direct(self, data: memoryview, offset: int) -> None:
        self._record("pwrite_direct", data, offset)
        self.inner.pwrite_direct(data, offset)


writes = st.lists(st.tuples(st.integers(0, 40), st.integers(1, 3 * RUN + 5),
                            st.booleans()), max_size=25)


@settings(max_examples=60, deadline=None)
@given(writes=writes)
def test_the_file_is_what_the_writes_in_order_make(tmp_path_factory: pytest.TempPathFactory,
                                                    writes: list[tuple[int, int, bool]]
                                                    ) -> None:
    """Offsets in 4 KiB steps, sizes of any length (beyond a buffer too); ``follow``: the next
    write starts where the last one ended (a run)."""
    path = tmp_path_factory.mktemp("image") / "image"
    handle = OsFileIO().open(str(path), create=True)
    model = bytearray()
    end = 0
    with ImageWriter(handle, RUN) as image:
        for block, size, follow in writes:
            offset = end if follow else block * 4096
            data = os.urandom(size)
            image.pwrite(data, offset)
            if len(model) < offset + size:
                model.extend(bytes(offset + size - len(model)))
            model[offset : offset + size] = data
            end = offset + size
    handle.close()
    assert path.read_bytes() == model


def test_consecutive_chunks_go_out_as_one_write_past_the_cache(tmp_path: Path) -> None:
    handle = Recorded(OsFileIO().open(str(tmp_path / "image"), create=True))
    chunks = [os.urandom(4096) for _ in range(40)]
    with ImageWriter(handle, RUN) as image:
        for index, chunk in enumerate(chunks[:20]):
            image.pwrite(chunk, index * 4096)
        for index, chunk in enumerate(chunks[20:], 30):  # a hole of ten chunks before these
            image.pwrite(chunk, index * 4096)
    assert handle.writes == [("pwrite_direct", 0, RUN), ("pwrite_direct", RUN, 4 * 4096),
                             ("pwrite_direct", 30 * 4096, RUN), ("pwrite_direct", 46 * 4096,
                                                                 4 * 4096)]
    inner = handle.inner
    assert isinstance(inner, OsFileHandle) and inner._direct is not None  # O_DIRECT used
    inner.close()
    data = (tmp_path / "image").read_bytes()
    assert data == b"".join(chunks[:20]) + bytes(10 * 4096) + b"".join(chunks[20:])


def test_cached_runs_go_through_the_page_cache(tmp_path: Path) -> None:
    """For a file read again at once (the raw image a qcow2 restore converts)."""
    handle = Recorded(OsFileIO().open(str(tmp_path / "image"), create=True))
    with ImageWriter(handle, RUN, cached=True) as image:
        for index in range(20):
            image.pwrite(bytes([index]) * 4096, index * 4096)
    assert handle.writes == [("pwrite", 0, RUN), ("pwrite", RUN, 4 * 4096)]
    handle.inner.close()
    assert (tmp_path / "image").read_bytes() == b"".join(bytes([i]) * 4096 for i in range(20))


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_a_failed_write_is_the_error_and_nothing_is_written_after_it(tmp_path: Path,
                                                                    fail_at: int) -> None:
    handle = Recorded(OsFileIO().open(str(tmp_path / "image"), create=True), fail_at=fail_at)
    with pytest.raises(OSError, match="No space") as raised, ImageWriter(handle, RUN) as image:
        for index in range(8 * RUN // 4096):
            image.pwrite(os.urandom(4096), index * 4096)
    assert raised.value.errno == errno.ENOSPC
    assert len(handle.writes) <= fail_at + 2  # the two buffers' runs at most, then it stopped


def test_after_an_error_in_the_caller_no_write_is_in_flight(tmp_path: Path) -> None:
    handle = Recorded(OsFileIO().open(str(tmp_path / "image"), create=True), slow=0.05)
    with pytest.raises(ValueError, match="damaged"), ImageWriter(handle, RUN) as image:
        for index in range(3 * RUN // 4096):
            image.pwrite(os.urandom(4096), index * 4096)
        raise ValueError("a chunk is damaged")
    handle.closed = True  # a write from now on fails the test (in the writer's thread)
    time.sleep(0.2)
    assert not [t for t in threading.enumerate() if t.name.startswith("image-writer")]


def test_a_restore_writes_its_image_past_the_cache(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from blocktrail.backup.engine import run_backup
    from blocktrail.backup.sources.local import LocalDiskSource
    from blocktrail.disk import Disk
    from blocktrail.repo import Encryption, Repository

    direct: list[int] = []
    real = os.pwrite

    def pwrite(fd: int, data: bytes | memoryview, offset: int) -> int:
        written = real(fd, data, offset)
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            direct.append(written)
        return written

    size = 16 << 20
    with Disk.create(tmp_path / "disk", size + 4096 + 512) as disk:  # the last chunk: 4.5 KiB
        content = os.urandom(size + 4096 + 512)
        disk.pwrite(content[: 4 << 20], 0)
        disk.pwrite(content[8 << 20 :], 8 << 20)  # a hole of 4 MiB between
        repo = Repository.init(tmp_path / "repo", encryption=Encryption.none())
        point = run_backup(LocalDiskSource(disk), repo).point
    monkeypatch.setattr("blocktrail.fileio.os.pwrite", pwrite)
    repo.restore(point.id, str(tmp_path / "restored"))
    expected = content[: 4 << 20] + bytes(4 << 20) + content[8 << 20 :]
    assert (tmp_path / "restored").read_bytes() == expected
    assert sum(direct) == len(expected) - (4 << 20) - 512  # all but the hole and the tail

