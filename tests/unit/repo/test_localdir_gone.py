"""A local repository directory moved away (or unmounted) is never made again, empty, where it
was: a lease renewed or released meanwhile, or any other write, fails instead."""

from __future__ import annotations

from pathlib import Path

import pytest

from blocktrail.repo.localdir import LocalBackend


def test_a_repository_moved_away_is_not_made_again(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    backend = LocalBackend(str(root))
    backend.create("leases/writer-a.json", b"{}")  # a new repository: made as needed
    root.rename(tmp_path / "away")
    with pytest.raises(FileNotFoundError, match="moved away or unmounted"):
        backend.create("leases/writer-b.json", b"{}")
    with pytest.raises(FileNotFoundError):
        backend.host_lock(exclusive=False, wait=True)
    assert not root.exists()
    (tmp_path / "away").rename(root)
    backend.create("leases/writer-b.json", b"{}")
    backend.close()
