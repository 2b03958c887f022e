"""Verify a restore point against its source, chunk by chunk, independently of the tracker.

Both sides are read: the source, and every stored chunk of the point (decompressed and rehashed,
as a restore would), so two different failures are told apart:

- **differs from the source**: the point's digest for a chunk is not the source's (the tracker
  missed a change, or the source is not the point's disk state). With ``heal``, a corrected
  successor point (kind "healed") is written, only when the source is the point's own state
  (the same change ID): the healed point records that change ID and the next incremental asks
  the tracker for changes since it, so it must hold exactly that state.
- **damaged in the repository**: the digest is right but no intact stored copy is left (a damaged
  copy is put in quarantine). With ``heal``, the source's bytes, which have that digest, are
  stored again, and the point itself (and every point sharing that chunk) restores again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from blocktrail.backup.engine import READ_RUN_BYTES
from blocktrail.backup.source import Source, read_exact
from blocktrail.errors import InvalidArgument
from blocktrail.extents import Extent, merge
from blocktrail.fileio import is_zeros
from blocktrail.pipeline import read_ahead
from blocktrail.repo import DamagedCopy, Repository, RestorePoint
from blocktrail.repo.backend import BackendDenied, BackendReadOnly
from blocktrail.repo.errors import RepositoryError
from blocktrail.repo.leases import Lease
from blocktrail.repo.objects import KIND_CHUNK, ZERO_DIGEST, Buffer

Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class VerifyReport:
    point: RestorePoint
    chunks_compared: int
    differing_areas: tuple[Extent, ...]  # the source differs from the point
    healed_point: RestorePoint | None
    damaged_areas: tuple[Extent, ...] = ()  # no intact stored copy (the source matches)
    damaged_copies: tuple[DamagedCopy, ...] = ()  # put in quarantine by this verify
    restored_bytes: int = 0  # stored again from the source (heal)
    not_recorded: str | None = None  # why the verify state was not recorded (read-only)
    not_healed: str | None = None  # why differences were not healed (heal asked for)

    @property
    def identical(self) -> bool:
        """The point restores to exactly what the source holds."""
        return not self.differing_areas and not self.damaged_areas


@dataclass
class _Comparison:
    differing: list[Extent]
    corrected: list[tuple[int, Buffer]]  # the source's bytes where the point differs
    damaged: list[Extent]
    lost: list[Buffer]  # the source's bytes of chunks with no intact stored copy
    copies: list[DamagedCopy]
    compared: int = 0


def verify_point(repo: Repository, point_id: str, source: Source, snapshot: str | None, *,
                 heal: bool = False, progress: Progress | None = None,
                 lease: Lease | None = None) -> VerifyReport:
    """Compare every chunk of the point with the source's ``snapshot`` (None: a temporary snapshot
    of the live disk), and read every stored chunk. The source must be the point's disk (its
    disk ID): another disk is refused before anything is read. Records the verify state; with
    ``heal``, stores lost chunks again (their bytes have the stored digest: any state of the
    source that still holds them will do) and writes a corrected successor for differences
    (under ``lease``, the disk's lease the caller holds; None: one taken for it) when
    ``snapshot`` is the point's own state, else says why not (`VerifyReport.not_healed`). A
    repository that may only be read gets the comparison without the record
    (`VerifyReport.not_recorded`)."""
    with repo.reading(point_id) as point:  # no forget or prune takes it meanwhile
        return _verify(repo, point, source, snapshot, heal, progress, lease)


def _verify(repo: Repository, point: RestorePoint, source: Source, snapshot: str | None,
            heal: bool, progress: Progress | None, lease: Lease | None) -> VerifyReport:
    if source.disk_id != point.disk_id:  # its state would be recorded from another disk
        raise InvalidArgument(
            f"restore point {point.id} was taken of disk {point.disk_id!r}, and the source "
            f"is disk {source.disk_id!r}: verify a point against the disk it was taken of "
            "(an NBD export backed up with --disk-id: give verify the same --disk-id)")
    temporary = snapshot is None
    if snapshot is None:
        taken = source.create_snapshot(f"blocktrail-verify-{point.id}")
        snapshot, change_id = taken.name, taken.change_id
    else:
        change_id = source.existing_snapshot(snapshot).change_id
    try:
        size = source.snapshot_size(snapshot)
        if size != point.size_bytes:
            raise InvalidArgument(
                f"the source holds {size} bytes, restore point {point.id} {point.size_bytes}: "
                "it is not this point's disk state (verify against DISK@SNAPSHOT of the point)")
        found = _compare(repo, point, source, snapshot, progress)
        restored = repo.store_chunks(found.lost) if heal and found.lost else 0
        healed, not_healed = None, None
        if found.differing and heal:
            if change_id == point.change_id:
                healed = _write_healed(repo, point, found.corrected, lease)
            else:
                not_healed = _not_its_state(point, None if temporary else snapshot, change_id)
        whole = not found.differing and (not found.damaged or heal)
        not_recorded = None
        try:
            point = repo.set_verify_state(point.id, "ok" if whole else "failed")
        except (BackendReadOnly, BackendDenied) as exc:  # the comparison stands all the same
            not_recorded = exc.message
        return VerifyReport(point, found.compared, tuple(merge(found.differing)), healed,
                            tuple(merge(found.damaged)), tuple(found.copies), restored,
                            not_recorded, not_healed)
    finally:
        if temporary:
            source.remove_snapshot(snapshot)


def _not_its_state(point: RestorePoint, snapshot: str | None, change_id: str | None) -> str:
    source = "the live disk" if snapshot is None else f"snapshot {snapshot!r}"
    return (f"{source} is not the disk state restore point {point.id} was taken of (change ID "
            f"{change_id}, the point's {point.change_id}), and a healed point must hold exactly "
            "that state: nothing was healed. Heal against the point's own snapshot "
            "(DISK@SNAPSHOT; `backup --snapshot NAME` keeps one), or take a new backup (it is "
            "full: the point failed verification)")


def _write_healed(repo: Repository, point: RestorePoint, corrected: list[tuple[int, Buffer]],
                  lease: Lease | None) -> RestorePoint:
    writer = repo.begin(point.disk_id, point.size_bytes, parent=point.id, lease=lease)
    for index, data in corrected:
        writer.put_chunk(index, data)
    healed = writer.commit(kind="healed", change_id=point.change_id, fallback_reason=None,
                           tracker_trusted=True, stats={"healed_chunks": len(corrected)})
    return repo.set_verify_state(healed.id, "ok")


def _compare(repo: Repository, point: RestorePoint, source: Source, snapshot: str,
             progress: Progress | None) -> _Comparison:
    cs = point.chunk_size
    expected = dict(repo.page_entries(point))
    per_run = READ_RUN_BYTES // cs
    total = len(expected)
    out = _Comparison([], [], [], [], [])
    where = f"restore point {point.id}"

    def read_run(first: int) -> tuple[int, Buffer, list[bool]]:
        """The source's bytes of a run of chunks, and for each: is its stored copy lost?"""
        offset = first * cs
        data = read_exact(source, snapshot, min(per_run * cs, point.size_bytes - offset), offset)
        lost = []
        for index in range(first, first + -(-len(data) // cs)):
            name = expected[index]
            try:
                if name != ZERO_DIGEST:
                    repo.read_chunk(name, where, out.copies)
                lost.append(False)
            except RepositoryError:
                lost.append(True)
        return first, data, lost

    runs = read_ahead(range(0, total, per_run), read_run, window=4, executor=repo.pool)
    for first, data, lost in runs:
        for i in range(0, len(data), cs):
            index = first + i // cs
            chunk = data[i : i + cs]
            actual = ZERO_DIGEST if is_zeros(chunk) \
                else repo.codec.name(KIND_CHUNK, chunk)
            if actual != expected[index]:
                out.differing.append(Extent(index * cs, len(chunk)))
                out.corrected.append((index, chunk))
            elif lost[i // cs]:
                out.damaged.append(Extent(index * cs, len(chunk)))
                out.lost.append(chunk)
        out.compared = min(first + per_run, total)
        if progress is not None:
            progress(out.compared, total)
    out.compared = total
    return out
