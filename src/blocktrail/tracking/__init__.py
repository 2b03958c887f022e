"""The change tracker: change IDs, queries for changed areas, persistence, epochs.

The names below load their modules on first use (PEP 562), so a command that only parses a
change ID does not pay for numpy and pyroaring."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blocktrail.tracking.changeid import ALL_ALLOCATED, ChangeId
    from blocktrail.tracking.info import DiskChangeInfo
    from blocktrail.tracking.tracker import TRACKER_FORMAT, ChangeTracker, EpochRecord

_WHERE = {"ALL_ALLOCATED": "changeid", "ChangeId": "changeid", "DiskChangeInfo": "info",
          "TRACKER_FORMAT": "tracker", "ChangeTracker": "tracker", "EpochRecord": "tracker"}
__all__ = ["ALL_ALLOCATED", "TRACKER_FORMAT", "ChangeId", "ChangeTracker", "DiskChangeInfo",
           "EpochRecord"]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
