"""`FileIO.lock` and `FileIO.makedirs`, the same on the real file system and the simulated one
(the repository's local directory runs on either)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from blocktrail.fileio import FileIO, OsFileIO
from blocktrail.simfileio import SimulatedFileIO


@pytest.fixture(params=["os", "simulated"])
def fio_and_dir(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[FileIO, str]:
    if request.param == "os":
        return OsFileIO(), str(tmp_path)
    fs = SimulatedFileIO()
    fs.makedirs("/d")
    return fs, "/d"


def test_shared_locks_share_and_an_exclusive_one_waits_for_them(
        fio_and_dir: tuple[FileIO, str]) -> None:
    fio, d = fio_and_dir
    path = f"{d}/repo.lock"
    first = fio.lock(path, exclusive=False, wait=True)
    second = fio.lock(path, exclusive=False, wait=False)
    assert first is not None and second is not None
    assert fio.lock(path, exclusive=True, wait=False) is None
    first.release()
    assert fio.lock(path, exclusive=True, wait=False) is None  # one still shares it
    taken: list[float] = []

    def wait_for_it() -> None:
        lock = fio.lock(path, exclusive=True, wait=True)
        assert lock is not None
        taken.append(time.monotonic())
        lock.release()

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    time.sleep(0.2)
    assert not taken  # it waits
    released = time.monotonic()
    second.release()
    waiter.join(10)
    assert taken and taken[0] >= released
    second.release()  # twice: nothing more
    assert fio.lock(path, exclusive=False, wait=False) is not None


def test_an_exclusive_lock_shuts_out_everyone_until_released(
        fio_and_dir: tuple[FileIO, str]) -> None:
    fio, d = fio_and_dir
    path = f"{d}/objects.lock"
    held = fio.lock(path, exclusive=True, wait=False)
    assert held is not None
    assert fio.lock(path, exclusive=False, wait=False) is None
    with pytest.raises(BlockingIOError):
        fio.lock_exclusive(path)
    held.release()
    fio.lock_exclusive(path).release()


def test_makedirs_makes_what_is_missing_and_lists_it(fio_and_dir: tuple[FileIO, str]) -> None:
    fio, d = fio_and_dir
    fio.makedirs(f"{d}/a/b/c")
    fio.makedirs(f"{d}/a/b/c")  # there already: nothing to do
    fio.replace_atomic(f"{d}/a/b/file", b"x")
    assert fio.isdir(f"{d}/a/b/c") and not fio.isdir(f"{d}/a/b/file")
    assert fio.listdir(f"{d}/a/b") == ["c", "file"]


def test_a_lock_taken_before_a_power_loss_is_no_lock_after_it() -> None:
    fs = SimulatedFileIO()
    fs.makedirs("/d")
    old = fs.lock("/d/l", exclusive=False, wait=False)
    assert old is not None
    fs.power_loss()
    new = fs.lock("/d/l", exclusive=True, wait=False)
    assert new is not None
    old.release()  # the dead process's: it releases nothing of the new one's
    assert fs.lock("/d/l", exclusive=False, wait=False) is None


def test_makedirs_through_a_file_fails(fio_and_dir: tuple[FileIO, str]) -> None:
    fio, d = fio_and_dir
    fio.replace_atomic(f"{d}/f", b"x")
    with pytest.raises(OSError):
        fio.makedirs(f"{d}/f/sub")


def test_makedirs_in_a_parent_it_may_write_but_not_read(tmp_path: Path) -> None:
    """A drop-box directory (mode 1733: others may add, not list) cannot be opened to be
    synced: its new subdirectories are made all the same, as a plain mkdir makes them, and
    the ones made below them are synced. (Root reads any directory: the refusal is made.)"""
    refused = str(tmp_path / "drop")

    class DropBox(OsFileIO):
        synced: list[str] = []

        def fsync_dir(self, path: str) -> None:
            if path == refused:
                raise PermissionError(13, "Permission denied", path)
            self.synced.append(path)
            super().fsync_dir(path)

    (tmp_path / "drop").mkdir()
    DropBox().makedirs(f"{refused}/x/y")
    assert (tmp_path / "drop/x/y").is_dir() and DropBox.synced == [f"{refused}/x"]
    refused = f"{refused}/x/z"  # one it made itself must be synced
    with pytest.raises(PermissionError):
        DropBox().makedirs(f"{refused}/w")
