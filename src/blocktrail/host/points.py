"""The restore points of the host's disks in the repositories the host was told about (``host
--repo``), for the console and the metrics.

A repository's manifests and verify records are read again only when they changed: a backup
or a forget adds or deletes a file in ``points/`` (and a forget in ``verify/``), a verify adds a
record in ``verify/POINT/``; each moves a directory's modification time. A page or a scrape of a
repository with 10,000 points costs a ``stat`` of ``points/`` and of each ``verify/POINT/``
while nothing changes. A modification time less than a second old is not trusted (file systems
keep it with a coarse clock, so two changes may share one): such a listing is read again next
time. (Local repositories: the directories are the backend's.)
A repository that is not there (yet), or cannot be read, shows as such; it never fails a page.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

from blocktrail.errors import BlocktrailError
from blocktrail.passwords import NO_SOURCES, PasswordSources, password_source
from blocktrail.repo import Repository, RestorePoint, layout
from blocktrail.repo.location import is_s3_url

SETTLED_NS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class RepositoryView:
    path: str
    points: tuple[RestorePoint, ...] = ()
    problem: str | None = None  # why the points could not be read
    damaged_manifests: int = 0

    def of_disk(self, disk_id: str) -> list[RestorePoint]:
        return [p for p in self.points if p.disk_id == disk_id]


@dataclass
class _Cached:
    key: tuple[object, ...] | None = None
    view: RepositoryView | None = None
    repo: Repository | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class PointCatalog:
    """The host's repositories, opened on first use and kept open until `close`."""

    def __init__(self, paths: tuple[str, ...],
                 password: PasswordSources = NO_SOURCES) -> None:
        self.paths = tuple(p if is_s3_url(p) else os.path.abspath(p) for p in paths)
        self.password = password  # of the encrypted ones (one password for all)
        self._cache = {p: _Cached() for p in self.paths}

    def repository(self, path: str) -> Repository:
        """The open repository ``path`` (one of `paths`)."""
        cached = self._cache[path]
        with cached.lock:
            if cached.repo is None:
                # Shown (console, metrics) and restored from even with credentials that may
                # only read; a backup job's first write is refused there (its lease).
                cached.repo = Repository.open(path, password=password_source(self.password),
                                              writes=False)
            return cached.repo

    def view(self, path: str) -> RepositoryView:
        cached = self._cache[path]
        try:
            key, newest = self._listed(path) if is_s3_url(path) else _signature(path)
        except OSError as exc:
            return RepositoryView(path, problem=f"not readable: {exc.strerror or exc}")
        except BlocktrailError as exc:
            return RepositoryView(path, problem=exc.message)
        if cached.view is not None and cached.key == key:
            return cached.view
        try:
            intact, damaged = self.repository(path).scan_points()
        except (BlocktrailError, OSError) as exc:
            message = exc.message if isinstance(exc, BlocktrailError) else str(exc)
            return RepositoryView(path, problem=message)
        view = RepositoryView(path, tuple(intact), None, len(damaged))
        settled = time.time_ns() - newest > SETTLED_NS
        cached.key, cached.view = (key, view) if settled else (None, None)
        return view

    def _listed(self, path: str) -> tuple[tuple[object, ...], int]:
        backend = self.repository(path).backend
        return tuple((i.name, i.etag) for prefix in (layout.POINTS, layout.VERIFY)
                     for i in backend.list(prefix)), 0

    def views(self) -> list[RepositoryView]:
        return [self.view(p) for p in self.paths]

    def close(self) -> None:
        for cached in self._cache.values():
            with cached.lock:
                if cached.repo is not None:
                    cached.repo.close()
                    cached.repo = None


def _signature(path: str) -> tuple[tuple[int, ...], int]:
    """What changes when a manifest or verify record is added or deleted: the modification
    times and link counts of ``points/``, ``verify/`` and the newest ``verify/POINT/``, and the
    number of those. -> (signature, the newest modification time)."""
    points = os.stat(os.path.join(path, "points"))
    verify_dir = os.path.join(path, "verify")
    try:
        verify = os.stat(verify_dir)
    except FileNotFoundError:
        return (points.st_mtime_ns, points.st_nlink), points.st_mtime_ns
    newest_record, count = 0, 0
    with os.scandir(verify_dir) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                count += 1
                newest_record = max(newest_record, entry.stat(follow_symlinks=False).st_mtime_ns)
    newest = max(points.st_mtime_ns, verify.st_mtime_ns, newest_record)
    return (points.st_mtime_ns, points.st_nlink, verify.st_mtime_ns, verify.st_nlink,
            newest_record, count), newest
