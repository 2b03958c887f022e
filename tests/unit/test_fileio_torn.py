"""The simulated file system's torn power loss (`SimulatedFileIO.torn`): of what was written to
a file since its last sync, each 512-byte sector survives whole or not at all, at random (a disk
writes a sector whole), and so does the file's new size; what was synced always survives. The
power-loss sweeps run with it too (tests/crash)."""

from __future__ import annotations

import random

from blocktrail.simfileio import SimulatedFileIO

PAGE, SECTOR = 4096, 512
OLD, NEW = b"o", b"n"


def _after_power_loss(seed: int) -> bytes:
    """Four synced pages of OLD; then pages 1 and 2 overwritten with NEW, page 4 appended,
    nothing synced; the power lost with ``seed``. -> the file's content."""
    fs = SimulatedFileIO()
    fs.makedirs("/d")
    fs.replace_atomic("/d/f", OLD * 4 * PAGE)
    handle = fs.open("/d/f")
    handle.pwrite(NEW * 2 * PAGE, PAGE)
    handle.pwrite(NEW * PAGE, 4 * PAGE)
    fs.torn = random.Random(seed)
    fs.power_loss()
    return fs.read_file("/d/f")


def test_each_unsynced_sector_survives_whole_or_not_at_all() -> None:
    seen: set[bytes] = set()
    for seed in range(64):
        content = _after_power_loss(seed)
        assert len(content) in (4 * PAGE, 5 * PAGE), seed
        sectors = [content[i : i + SECTOR] for i in range(0, len(content), SECTOR)]
        per_page = PAGE // SECTOR
        for index, sector in enumerate(sectors):
            page = index // per_page
            if page in (0, 3):  # never written since the sync
                assert sector == OLD * SECTOR, seed
            elif page in (1, 2):
                assert sector in (OLD * SECTOR, NEW * SECTOR), seed
            else:  # the size came; the data, or not
                assert sector in (NEW * SECTOR, bytes(SECTOR)), seed
        seen.add(bytes(s[0] for s in sectors[per_page : 3 * per_page]))
    assert len(seen) >= 32, f"too few of the possible outcomes came up: {len(seen)}"


def test_a_size_lost_takes_the_data_past_it_along() -> None:
    """A file whose growth was lost reads zeros where it grows again, not the lost data."""
    lost = 0
    for seed in range(32):
        fs = SimulatedFileIO()
        fs.makedirs("/d")
        fs.replace_atomic("/d/f", OLD * (PAGE + 100))
        handle = fs.open("/d/f")
        handle.pwrite(NEW * 2 * PAGE, PAGE)
        fs.torn = random.Random(seed)
        fs.power_loss()
        handle = fs.open("/d/f")
        if handle.size() == PAGE + 100:
            lost += 1
            handle.truncate(3 * PAGE)
            tail = handle.pread(3 * PAGE - (PAGE + 100), PAGE + 100)
            assert tail == bytes(len(tail)), seed
    assert 0 < lost < 32


def test_what_was_synced_survives_every_torn_power_loss() -> None:
    for seed in range(16):
        fs = SimulatedFileIO()
        fs.makedirs("/d")
        fs.replace_atomic("/d/f", OLD * 3 * PAGE)
        handle = fs.open("/d/f")
        handle.pwrite(NEW * PAGE, PAGE)
        handle.fsync()
        handle.pwrite(OLD * PAGE, 2 * PAGE)  # the same bytes again: nothing to lose
        fs.torn = random.Random(seed)
        fs.power_loss()
        assert fs.read_file("/d/f") == OLD * PAGE + NEW * PAGE + OLD * PAGE


def test_what_a_torn_loss_left_is_what_the_next_loss_starts_from() -> None:
    """After the power came back, the disk holds what it holds: a second loss, with nothing
    written since, changes nothing."""
    for seed in range(16):
        fs = SimulatedFileIO()
        fs.makedirs("/d")
        fs.replace_atomic("/d/f", OLD * 2 * PAGE)
        fs.open("/d/f").pwrite(NEW * 3 * PAGE, 0)
        fs.torn = random.Random(seed)
        fs.power_loss()
        first = fs.read_file("/d/f")
        fs.power_loss()
        assert fs.read_file("/d/f") == first, seed
