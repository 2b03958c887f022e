"""The base of an NBD export's incremental: a point whose dirty bitmap label the server had
refused (recorded so by an earlier blocktrail) is no base, nor is any point built on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from blocktrail.backup.base import choose_base
from blocktrail.repo import Repository, RestorePoint
from s3server import RepoTarget

CS = 64 * 1024
DISK = "nbd+unix:///d0?socket=/run/qemu-nbd.sock"
LABEL = "qemu:dirty-bitmap:bm0"
# what the plan recorded for a full whose base's bitmap query the server refused
REFUSED = (f"change ID {LABEL} refused: the NBD server at {DISK} did not agree to {LABEL}: the "
           "export has no bitmap named 'bm0' (export it with qemu-nbd -B bm0, or "
           "bitmaps.0=bm0 in qemu-storage-daemon's --export)")


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return RepoTarget("local", str(tmp_path / "repo")).init()


def point(repo: Repository, fallback_reason: str | None,
          parent: RestorePoint | None = None) -> RestorePoint:
    writer = repo.begin(DISK, 2 * CS, parent.id if parent else None)
    writer.put_chunk(0, bytes([len(repo.points()) + 1]) * CS)
    return writer.commit(kind="incremental" if parent else "full", change_id=LABEL,
                         fallback_reason=fallback_reason)


def test_a_point_labelled_with_a_bitmap_the_server_refused_is_no_base(
        repo: Repository) -> None:
    point(repo, None)
    legacy = point(repo, REFUSED)
    choice = choose_base(repo, DISK)
    assert choice.point is None and choice.no_base is not None
    assert legacy.id in choice.no_base and "did not agree" in choice.no_base


def test_nor_is_an_incremental_built_on_it(repo: Repository) -> None:
    """It read the bitmap since the legacy point: the writes before the bitmap existed were
    never read."""
    legacy = point(repo, REFUSED)
    built_on = point(repo, None, parent=legacy)
    choice = choose_base(repo, DISK)
    assert choice.point is None and choice.no_base is not None
    assert built_on.id in choice.no_base and legacy.id in choice.no_base


@pytest.mark.parametrize("reason", [None, "no earlier verified restore point of this disk",
                                    f"reading {LABEL} from {DISK} failed: EIO"])
def test_a_bitmap_label_the_server_agreed_to_is_a_base(repo: Repository,
                                                       reason: str | None) -> None:
    older = point(repo, REFUSED)
    full = point(repo, reason)  # a full of its own: the refused one is not in its chain
    choice = choose_base(repo, DISK)
    assert choice.point is not None and choice.point.id == full.id, choice.no_base
    assert older.id != full.id
