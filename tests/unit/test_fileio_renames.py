"""The simulated file system renames directories as a journaling file system does: all in
them moves at once, and a power loss moves them back until the parent of either name is
fsynced."""

from __future__ import annotations

import errno

import pytest

from blocktrail.simfileio import SimulatedFileIO


def _fs() -> SimulatedFileIO:
    fs = SimulatedFileIO()
    fs.makedirs("/top/a")
    for name in ("x", "y"):
        fs.replace_atomic(f"/top/a/{name}", name.encode())
    return fs


def test_a_directory_moves_with_all_in_it() -> None:
    fs = _fs()
    fs.rename("/top/a", "/top/b")
    assert fs.listdir("/top") == ["b"]
    assert fs.listdir("/top/b") == ["x", "y"]
    assert fs.read_file("/top/b/x") == b"x"
    assert not fs.exists("/top/a/x")


def test_a_rename_is_lost_with_the_power_until_the_parent_is_synced() -> None:
    fs = _fs()
    fs.rename("/top/a", "/top/b")
    fs.power_loss()
    assert fs.listdir("/top") == ["a"]
    assert fs.read_file("/top/a/y") == b"y"
    fs.rename("/top/a", "/top/b")
    fs.fsync_dir("/top")
    fs.power_loss()
    assert fs.listdir("/top") == ["b"]
    assert fs.listdir("/top/b") == ["x", "y"]


def test_what_is_synced_in_a_renamed_directory_stays_in_it_under_either_name() -> None:
    for sync_parent in (False, True):
        fs = _fs()
        fs.rename("/top/a", "/top/b")
        fs.unlink("/top/b/x")
        fs.replace_atomic("/top/b/z", b"z")  # syncs /top/b: the directory, named /top/a
        if sync_parent:
            fs.fsync_dir("/top")
        fs.power_loss()
        name = "/top/b" if sync_parent else "/top/a"
        assert fs.listdir("/top") == [name.rsplit("/", 1)[1]]
        assert fs.listdir(name) == ["y", "z"]


def test_a_rename_across_directories_is_whole_once_either_parent_is_synced() -> None:
    for synced in ("/top", "/other"):
        fs = _fs()
        fs.makedirs("/other")
        fs.rename("/top/a", "/other/a")
        fs.fsync_dir(synced)
        fs.power_loss()
        assert fs.listdir("/top") == []
        assert fs.listdir("/other/a") == ["x", "y"]


def test_a_directory_replaces_only_an_empty_one_and_never_goes_into_itself() -> None:
    fs = _fs()
    fs.makedirs("/top/empty")
    fs.makedirs("/top/full")
    fs.replace_atomic("/top/full/f", b"f")
    with pytest.raises(OSError) as full:
        fs.rename("/top/a", "/top/full")
    assert full.value.errno == errno.ENOTEMPTY
    with pytest.raises(OSError) as inside:
        fs.rename("/top/a", "/top/a/sub")
    assert inside.value.errno == errno.EINVAL
    fs.rename("/top/a", "/top/empty")
    assert fs.listdir("/top") == ["empty", "full"]
    assert fs.listdir("/top/empty") == ["x", "y"]
