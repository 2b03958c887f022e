"""Verify a restore point against its source, chunk by chunk, independently of the tracker."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from blake3 import blake3

from blocktrail.backup.engine import READ_RUN_BYTES
from blocktrail.backup.source import Source
from blocktrail.errors import InvalidArgument
from blocktrail.extents import Extent, merge
from blocktrail.repo import Repository, RestorePoint

Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class VerifyReport:
    point: RestorePoint
    chunks_compared: int
    differing_areas: tuple[Extent, ...]
    healed_point: RestorePoint | None

    @property
    def identical(self) -> bool:
        return not self.differing_areas


def verify_point(repo: Repository, point_id: str, source: Source, snapshot: str | None, *,
                 heal: bool = False, progress: Progress | None = None) -> VerifyReport:
    """Compare every chunk of the point with the source's ``snapshot`` (None: a temporary
    snapshot of the live disk). Records the verify state; with ``heal``, a differing point gets
    a corrected successor (kind "healed") holding the source's data."""
    point = repo.point(point_id)
    temporary = snapshot is None
    if snapshot is None:
        snapshot = source.create_snapshot(f"blocktrail-verify-{point.id}").name
    try:
        size = source.snapshot_size(snapshot)
        if size != point.size_bytes:
            raise InvalidArgument(
                f"the source holds {size} bytes, restore point {point.id} {point.size_bytes}: "
                "it is not this point's disk state (verify against DISK@SNAPSHOT of the point)")
        differing, corrected, compared = _compare(repo, point, source, snapshot, progress)
        healed = None
        if differing and heal:
            writer = repo.begin(point.disk_id, point.size_bytes, parent=point.id)
            for index, data in corrected:
                writer.put_chunk(index, data)
            healed = writer.commit(kind="healed", change_id=point.change_id,
                                   fallback_reason=None, tracker_trusted=True,
                                   stats={"healed_chunks": len(corrected)})
            healed = repo.set_verify_state(healed.id, "ok")
        point = repo.set_verify_state(point.id, "failed" if differing else "ok")
        return VerifyReport(point, compared, tuple(merge(differing)), healed)
    finally:
        if temporary:
            source.remove_snapshot(snapshot)


def _compare(repo: Repository, point: RestorePoint, source: Source, snapshot: str,
             progress: Progress | None) -> tuple[list[Extent], list[tuple[int, bytes]], int]:
    cs = point.chunk_size
    expected = dict(repo.page_entries(point))
    differing: list[Extent] = []
    corrected: list[tuple[int, bytes]] = []
    per_run = READ_RUN_BYTES // cs
    total = len(expected)
    for first in range(0, total, per_run):
        offset = first * cs
        data = source.pread(snapshot, min(per_run * cs, point.size_bytes - offset), offset)
        for i in range(0, len(data), cs):
            index = first + i // cs
            chunk = data[i : i + cs]
            actual = bytes(32) if chunk.count(0) == len(chunk) else blake3(chunk).digest()
            if actual != expected[index]:
                differing.append(Extent(index * cs, len(chunk)))
                corrected.append((index, chunk))
        if progress is not None:
            progress(min(first + per_run, total), total)
    return differing, corrected, total
