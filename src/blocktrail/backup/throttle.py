"""A backup source read no faster than a bandwidth limit (a job's ``bandwidth``, the host's
``--backup-bandwidth``): every other call passes through unchanged."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from blocktrail.backup.source import Source, SourceSnapshot
from blocktrail.extents import Extent
from blocktrail.tracking import DiskChangeInfo


class Throttle:
    """At most ``rate`` bytes a second, shared by every reading thread: each read reserves
    its share of a timeline and waits until that share has passed."""

    def __init__(self, rate_bytes_per_s: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._rate, self._clock, self._sleep = float(rate_bytes_per_s), clock, sleep
        self._lock = threading.Lock()
        self._free_at = clock()

    def take(self, count: int) -> None:
        with self._lock:
            now = self._clock()
            self._free_at = max(self._free_at, now) + count / self._rate
            wait = self._free_at - now
        if wait > 0:
            self._sleep(wait)


class ThrottledSource:
    """A Source whose reads go no faster than the throttle lets them."""

    def __init__(self, source: Source, throttle: Throttle) -> None:
        self._source, self._throttle = source, throttle

    @property
    def disk_id(self) -> str:
        return self._source.disk_id

    @property
    def granularity(self) -> int:
        return self._source.granularity

    def create_snapshot(self, name: str) -> SourceSnapshot:
        return self._source.create_snapshot(name)

    def remove_snapshot(self, name: str) -> None:
        self._source.remove_snapshot(name)

    def existing_snapshot(self, name: str) -> SourceSnapshot:
        return self._source.existing_snapshot(name)

    def query_changed_areas(self, change_id: str, start_offset: int,
                            snapshot: str) -> DiskChangeInfo:
        return self._source.query_changed_areas(change_id, start_offset, snapshot)

    def allocated_areas(self, snapshot: str) -> list[Extent]:
        return self._source.allocated_areas(snapshot)

    def pread(self, snapshot: str, count: int, offset: int) -> bytes | memoryview:
        self._throttle.take(count)
        return self._source.pread(snapshot, count, offset)

    def snapshot_size(self, snapshot: str) -> int:
        return self._source.snapshot_size(snapshot)

    def close(self) -> None:
        self._source.close()
