"""Virtual disks: a base layer and snapshot delta layers, with a change tracker.

The names below load their modules on first use (PEP 562): importing a light module of this
package (the importer's checks, say) does not load numpy."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blocktrail.disk.consolidation import Consolidation
    from blocktrail.disk.disk import Disk, SnapshotView
    from blocktrail.disk.meta import Snapshot

_WHERE = {"Consolidation": "consolidation", "Disk": "disk", "SnapshotView": "disk",
          "Snapshot": "meta"}
__all__ = ["Consolidation", "Disk", "Snapshot", "SnapshotView"]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
