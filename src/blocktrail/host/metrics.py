"""The host's Prometheus metrics, served at ``GET /metrics`` beside the API (the API's token on
TCP). Per disk: bytes read and written, write-intent flushes, snapshots (now, and taken by the
host), consolidation durations, tracking resets by reason; per disk and repository (``host
--repo``): restore points and the time of the newest; the host's running jobs.

Disk state is read when scraped, from the disks themselves (nothing is copied into a second
set of counters that could drift); counters of events only the API sees (snapshots taken,
consolidations) are kept here. Counters restart with the host, as Prometheus expects.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from blocktrail.disk import Disk
from blocktrail.errors import BlocktrailError
from blocktrail.host.points import PointCatalog

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CONSOLIDATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
RESET_REASONS = (  # an epoch's reason -> a label value with few values
    ("by request", "request"), ("unclean shutdown", "unclean_shutdown"),
    ("changed outside", "changed_outside"), ("format upgraded", "format_upgrade"),
    ("reverted", "revert"), ("restored from", "restore"))


def reset_reason(reason: str) -> str:
    return next((label for text, label in RESET_REASONS if text in reason), "other")


class HostMetrics:
    def __init__(self, disks: Callable[[], list[tuple[str, Disk]]],
                 catalog: PointCatalog | None = None,
                 jobs_running: Callable[[], int] = lambda: 0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.snapshots_created = Counter(
            "blocktrail_disk_snapshots_created_total", "Snapshots taken through the host",
            ["disk"], registry=self.registry)
        self.consolidation = Histogram(
            "blocktrail_disk_consolidation_seconds",
            "How long removing a snapshot (merging its layer) took", ["disk"],
            buckets=CONSOLIDATION_BUCKETS, registry=self.registry)
        self.registry.register(_StateCollector(disks, catalog, jobs_running))

    @contextmanager
    def consolidating(self, disk: str) -> Iterator[None]:
        """Time a snapshot removal (only one that succeeded is observed)."""
        started = time.perf_counter()
        yield
        self.consolidation.labels(disk).observe(time.perf_counter() - started)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    def __init__(self, disks: Callable[[], list[tuple[str, Disk]]],
                 catalog: PointCatalog | None, jobs_running: Callable[[], int]) -> None:
        self._disks, self._catalog, self._jobs_running = disks, catalog, jobs_running

    def describe(self) -> list[Metric]:
        return []  # generated at each scrape: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        disks = self._disks()
        read = CounterMetricFamily("blocktrail_disk_read_bytes",
                                   "Bytes read from the disk (snapshots included)", labels=["disk"])
        written = CounterMetricFamily("blocktrail_disk_written_bytes",
                                      "Bytes written, zeroed or trimmed", labels=["disk"])
        flushes = CounterMetricFamily("blocktrail_disk_intent_flushes",
                                      "Write-intent bitmap flushes (fsyncs)", labels=["disk"])
        snaps = GaugeMetricFamily("blocktrail_disk_snapshots", "Snapshots the disk has",
                                  labels=["disk"])
        size = GaugeMetricFamily("blocktrail_disk_size_bytes", "The disk's size",
                                 labels=["disk"])
        resets = CounterMetricFamily(
            "blocktrail_disk_tracking_resets",
            "Tracking epochs started after the first (every older change ID refused), by reason",
            labels=["disk", "reason"])
        epoch_start = GaugeMetricFamily("blocktrail_disk_tracking_epoch_start_timestamp_seconds",
                                        "When the current tracking epoch started",
                                        labels=["disk"])
        ids: dict[str, str] = {}
        for name, disk in disks:
            try:
                bytes_read, bytes_written = disk.io_bytes
                epochs = disk.tracker.epochs
                read.add_metric([name], bytes_read)
                written.add_metric([name], bytes_written)
                flushes.add_metric([name], disk.tracker.intent_fsyncs)
                snaps.add_metric([name], len(disk.snapshots))
                size.add_metric([name], disk.size_bytes)
            except BlocktrailError:
                continue  # closed or failed meanwhile: its next scrape tells
            counts: dict[str, int] = {}
            for epoch in epochs[1:]:
                label = reset_reason(epoch.reason)
                counts[label] = counts.get(label, 0) + 1
            for label, count in sorted(counts.items()):
                resets.add_metric([name, label], count)
            epoch_start.add_metric([name], _timestamp(epochs[-1].created_at))
            ids[disk.disk_id] = name
        yield from (read, written, flushes, snaps, size, resets, epoch_start)
        yield GaugeMetricFamily("blocktrail_host_disks", "Disks the host serves",
                                value=len(disks))
        yield GaugeMetricFamily("blocktrail_host_jobs_running",
                                "Console jobs (backup, verify) running now",
                                value=self._jobs_running())
        if self._catalog is not None:
            yield from self._points(ids, self._catalog)

    @staticmethod
    def _points(ids: dict[str, str], catalog: PointCatalog) -> Iterator[Metric]:
        count = GaugeMetricFamily("blocktrail_disk_restore_points",
                                  "Restore points of the disk in the repository",
                                  labels=["disk", "repository"])
        newest = GaugeMetricFamily("blocktrail_disk_last_backup_timestamp_seconds",
                                   "When the disk's newest restore point was taken",
                                   labels=["disk", "repository"])
        readable = GaugeMetricFamily("blocktrail_repository_readable",
                                     "1 if the host can read the repository's points",
                                     labels=["repository"])
        for view in catalog.views():
            readable.add_metric([view.path], 0 if view.problem else 1)
            per_disk: dict[str, tuple[int, float]] = {}
            for point in view.points:
                name = ids.get(point.disk_id)
                if name is None:
                    continue
                seen, last = per_disk.get(name, (0, 0.0))
                per_disk[name] = (seen + 1, max(last, point.created.timestamp()))
            for name, (seen, last) in sorted(per_disk.items()):
                count.add_metric([name, view.path], seen)
                newest.add_metric([name, view.path], last)
        yield from (count, newest, readable)


def _timestamp(iso: str) -> float:
    from datetime import datetime
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return 0.0
