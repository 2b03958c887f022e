"""A repository's restore points newest first, each manifest read only when the walk reaches it.

A backup's base is the newest whole point of its disk, and the points newer than it are of
other disks: the walk that finds it reads those and stops, with the parents it looks up on the
way, instead of every manifest of a repository that holds many disks and a long history (each
one a read, a decryption and a checksum; a request, on object storage).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from blocktrail.repo.errors import ManifestCorrupt
from blocktrail.repo.manifest import RestorePoint

if TYPE_CHECKING:
    from blocktrail.repo.store import Store

BATCH = 16  # manifests read at once, on the repository's I/O threads


class PointWalk:
    """The restore points listed when it is made: `newest_first`, and any of them by ID
    (`get`, a `PointLookup`: a parent). Each manifest is read once, with the state of its
    newest verify record; one that is damaged is in `damaged` from then on."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._files = sorted(store.manifest_files(), reverse=True)  # IDs begin with the time
        self._listed = {filename.removesuffix(".json") for filename in self._files}
        self._verify_records = store.verify_records()  # names: each is read with its point
        self._read: dict[str, RestorePoint | None] = {}  # None: damaged, or forgotten since
        self.damaged: list[tuple[str, str]] = []  # (manifest file, what is wrong), as read

    def newest_first(self) -> Iterator[RestorePoint]:
        """The intact points, newest first (a damaged manifest is passed, and noted)."""
        for start in range(0, len(self._files), BATCH):
            batch = self._files[start : start + BATCH]
            self._read_files([f for f in batch if f.removesuffix(".json") not in self._read])
            for filename in batch:
                point = self._read[filename.removesuffix(".json")]
                if point is not None:
                    yield point

    def get(self, point_id: str, /) -> RestorePoint | None:
        """The point ``point_id``; None if it was not listed (a name a manifest gives as its
        parent is read only when it is one of the repository's), is damaged, or was forgotten
        since."""
        if point_id not in self._listed:
            return None
        if point_id not in self._read:
            self._read_files([f"{point_id}.json"])
        return self._read[point_id]

    def _read_files(self, files: list[str]) -> None:
        store, records = self._store, self._verify_records
        results = store.read_all(lambda filename: store.read_point(filename, records), files)
        for filename, result in zip(files, results, strict=True):
            if isinstance(result, ManifestCorrupt):
                self.damaged.append((filename, result.message))
            self._read[filename.removesuffix(".json")] = \
                result if isinstance(result, RestorePoint) else None
