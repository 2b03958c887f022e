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


def test_forget_keeps_the_legacy_point_while_a_kept_point_builds_on_it(
        repo: Repository) -> None:
    """Retention keeps the newest, built on the legacy point: forgetting the legacy point would
    end the newest's chain there and make it a base again (for an incremental since its label,
    missing what the legacy point's label never covered)."""
    from blocktrail.repo import RetentionPolicy

    full = point(repo, None)
    legacy = point(repo, REFUSED)
    built_on = point(repo, None, parent=legacy)
    result = repo.forget_points(RetentionPolicy(keep_last=1))
    assert [p.id for p in result.forgotten] == [full.id]
    assert [p.id for p in result.kept_for_taint] == [legacy.id]
    choice = choose_base(repo, DISK)
    assert choice.point is None and choice.no_base is not None
    assert built_on.id in choice.no_base and legacy.id in choice.no_base


def test_the_repository_knows_the_dirty_bitmap_prefix_as_nbd_does() -> None:
    from blocktrail.nbd.proto.constants import DIRTY_BITMAP_PREFIX
    from blocktrail.repo.manifest import BITMAP_LABEL_PREFIX

    assert BITMAP_LABEL_PREFIX == DIRTY_BITMAP_PREFIX
