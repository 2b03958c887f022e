"""The change tracker: change IDs, queries for changed areas, persistence, epochs."""

from blocktrail.tracking.changeid import ALL_ALLOCATED, ChangeId
from blocktrail.tracking.info import DiskChangeInfo
from blocktrail.tracking.tracker import TRACKER_FORMAT, ChangeTracker, EpochRecord

__all__ = ["ALL_ALLOCATED", "TRACKER_FORMAT", "ChangeId", "ChangeTracker", "DiskChangeInfo",
           "EpochRecord"]
