"""Virtual disks: a base layer and snapshot delta layers, with a change tracker.

The names below load their modules on first use (PEP 562): importing a light module of this
package (the importer's checks, say) does not load numpy."""

from __future__ import annotations

from typing import TYPE_CHECKING

from blocktrail.lazy import lazy_names

if TYPE_CHECKING:
    from blocktrail.disk.consolidation import Consolidation
    from blocktrail.disk.disk import Disk, SnapshotView
    from blocktrail.disk.meta import Snapshot

_WHERE = {"Consolidation": "consolidation", "Disk": "disk", "SnapshotView": "disk",
          "Snapshot": "meta"}
__all__ = ["Consolidation", "Disk", "Snapshot", "SnapshotView"]


__getattr__ = lazy_names(__name__, globals(), _WHERE)
