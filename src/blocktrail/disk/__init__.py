"""Virtual disks: a base layer and snapshot delta layers, with a change tracker."""

from blocktrail.disk.consolidation import Consolidation
from blocktrail.disk.disk import Disk, SnapshotView
from blocktrail.disk.meta import Snapshot

__all__ = ["Consolidation", "Disk", "Snapshot", "SnapshotView"]
