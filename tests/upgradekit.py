"""The check that the upgrade of a version 1 data directory kept every disk (unit and power-loss
tests)."""

from __future__ import annotations

from blocktrail.host.registry import DiskRegistry

# per disk: (the change ID of its snapshot, its current change ID, its content)
Before = dict[str, tuple[str, str, bytes]]


def check_disks_kept(registry: DiskRegistry, before: Before, changed: tuple[int, int]) -> None:
    """Every disk of ``before``, once, with its content and its change IDs: the same tracking
    epoch, and its snapshot's change ID answered with the one area written after it
    (``changed``: offset, length)."""
    assert sorted(registry.names()) == sorted(before)
    for name, (snap_id, current, content) in before.items():
        disk = registry.get(name)
        assert disk.current_change_id == current, name  # the same epoch: no reset
        assert [(e.offset, e.length) for e in disk.query_changed_areas(
            snap_id).changed_areas] == [changed], name
        assert disk.pread(len(content), 0) == content, name
