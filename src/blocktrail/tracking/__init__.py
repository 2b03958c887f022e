"""The change tracker: change IDs, queries for changed areas, persistence, epochs.

The names below load their modules on first use (PEP 562), so a command that only parses a
change ID does not pay for numpy and pyroaring."""

from __future__ import annotations

from typing import TYPE_CHECKING

from blocktrail.lazy import lazy_names

if TYPE_CHECKING:
    from blocktrail.tracking.changeid import ALL_ALLOCATED, ChangeId
    from blocktrail.tracking.info import DiskChangeInfo
    from blocktrail.tracking.tracker import TRACKER_FORMAT, ChangeTracker, EpochRecord

_WHERE = {"ALL_ALLOCATED": "changeid", "ChangeId": "changeid", "DiskChangeInfo": "info",
          "TRACKER_FORMAT": "tracker", "ChangeTracker": "tracker", "EpochRecord": "tracker"}
__all__ = ["ALL_ALLOCATED", "TRACKER_FORMAT", "ChangeId", "ChangeTracker", "DiskChangeInfo",
           "EpochRecord"]


__getattr__ = lazy_names(__name__, globals(), _WHERE)
