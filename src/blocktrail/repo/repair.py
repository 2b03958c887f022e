"""`repo repair`: rebuild the chunk index from what the packs really hold.

Under the exclusive repository lock (restic's `repair index` is the model): every pack is read
whole, its trailer and every object in it checked; damaged copies go to quarantine; the intact
objects of a pack whose trailer is damaged are copied to a new pack; a fresh index file naming
every intact object is written, and only then are the old index files (and the packs with a
damaged trailer) deleted; temporary files of writes that never finished are deleted. Manifests
are never written: repair cannot make a restore point restore wrong, it names each one that
cannot be fully restored and what it lacks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from blocktrail.pipeline import read_ahead
from blocktrail.repo import index as index_file
from blocktrail.repo import layout
from blocktrail.repo.backend import ObjectNotFound
from blocktrail.repo.errors import ChunkCorrupt, ObjectMissing, RepositoryBusy, RepositoryError
from blocktrail.repo.leases import Lease, live_writers
from blocktrail.repo.manifest import TABLE_PAGES, RestorePoint
from blocktrail.repo.objects import KIND_CHUNK, KIND_TABLE, ZERO_DIGEST
from blocktrail.repo.packs import Location, read_trailer, walk_envelopes
from blocktrail.repo.quarantine import KIND_NAMES, CopyKey, DamagedCopy
from blocktrail.repo.sink import PackSink
from blocktrail.repo.store import Store, new_index_name

ADVICE = ("A backup of the disk stores again every chunk its source still has (the next "
          "restore point is whole); `blocktrail verify POINT --against SOURCE --heal` stores "
          "a point's lost chunks again from its source. A point whose page or page table is "
          "lost cannot be healed: take a new backup, then forget it.")


@dataclass(frozen=True, slots=True)
class UnrestorablePoint:
    point_id: str
    missing: tuple[str, ...]  # what it lacks: "chunk <digest> at disk offset N", ...

    def to_json(self) -> dict[str, Any]:
        return {"point": self.point_id, "missing": list(self.missing)}


@dataclass(frozen=True, slots=True)
class RepairReport:
    packs_read: int
    objects_intact: int
    damaged: tuple[DamagedCopy, ...]  # put in quarantine
    damaged_trailers: tuple[str, ...]  # packs whose objects were copied to a new pack, deleted
    objects_copied: int
    index_files_replaced: int
    damaged_index_files: tuple[str, ...]
    temp_files_deleted: int
    quarantine_released: int  # records of copies that read intact now
    points: int
    unrestorable: tuple[UnrestorablePoint, ...]
    packs_gone: tuple[str, ...] = ()  # listed, then gone before they were read

    @property
    def ok(self) -> bool:
        """Every restore point can be restored whole."""
        return not self.unrestorable

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "packs_read": self.packs_read,
                "objects_intact": self.objects_intact,
                "damaged_objects": [c.to_json() for c in self.damaged],
                "damaged_trailers": list(self.damaged_trailers),
                "objects_copied": self.objects_copied,
                "index_files_replaced": self.index_files_replaced,
                "damaged_index_files": list(self.damaged_index_files),
                "temp_files_deleted": self.temp_files_deleted,
                "quarantine_released": self.quarantine_released, "points": self.points,
                "unrestorable_points": [u.to_json() for u in self.unrestorable],
                "packs_gone": list(self.packs_gone),
                "advice": None if self.ok else ADVICE}


@dataclass
class _PackScan:
    intact: list[tuple[bytes, Location]]
    damaged: list[DamagedCopy]
    trailer_problem: str | None
    salvage: list[tuple[bytes, bytes, int]]  # name, envelope, plain length
    gone: bool = False  # the pack was listed, and gone when it was read


_BUSY = "cannot repair the repository: backups are running in this repository; try again later"


@contextlib.contextmanager
def _alone(repo: Store) -> Iterator[None]:
    """Repair runs with no writer: on a local directory under the machine-wide lock taken
    exclusively (and no writer's lease live: one of another machine sharing the directory,
    whose lock this one may not see); on object storage under the maintenance lease,
    refusing while any writer's lease is live (a writer that starts meanwhile is safe: repair
    deletes only packs whose intact objects it copied, and index files it read)."""
    backend = repo.backend
    if backend.host_locks:
        lock = backend.host_lock(exclusive=True, wait=False)
        if lock is None:
            raise RepositoryBusy(_BUSY)
        try:
            if live_writers(backend, repo.timing.margin):
                raise RepositoryBusy(_BUSY)
            yield
        finally:
            lock.release()
        return
    with Lease.acquire(backend, layout.MAINTENANCE_LEASE, purpose="maintenance",
                       timing=repo.timing, what="repair the repository"):
        if live_writers(backend, repo.timing.margin):
            raise RepositoryBusy(_BUSY)
        yield


def repair_repository(repo: Store) -> RepairReport:
    with _alone(repo):
        return _repair_locked(repo)


def _repair_locked(repo: Store) -> RepairReport:
    damaged_index_files = tuple(n for n, _ in repo.reload_index().damaged_files)
    old_index_files = repo.index_files()
    pack_ids = sorted(repo.pack_ids())
    intact: dict[bytes, Location] = {}
    damaged: list[DamagedCopy] = []
    bad_trailers: list[str] = []
    salvage: dict[bytes, tuple[bytes, int]] = {}
    scans = read_ahead(pack_ids, lambda p: _scan_pack(repo, p), window=4,
                       executor=repo.io_pool)
    spares: dict[bytes, list[Location]] = {}  # more intact copies of an object
    gone: list[str] = []
    for pack_id, scan in zip(pack_ids, scans, strict=True):
        if scan.gone:
            gone.append(pack_id)
        for name, loc in scan.intact:
            if intact.setdefault(name, loc) is not loc:
                spares.setdefault(name, []).append(loc)
        damaged += scan.damaged
        if scan.trailer_problem is not None:
            bad_trailers.append(pack_id)
            for name, envelope, plain_length in scan.salvage:
                salvage.setdefault(name, (envelope, plain_length))
    for copy in damaged:
        repo.quarantine(copy)
    copied = _copy_out(repo, intact, spares, salvage, old_index_files)
    for pack_id in bad_trailers:  # its intact objects are in a new pack, no index names it
        repo.delete_pack(pack_id)
    released = 0
    for key in repo.quarantined():
        if _is_intact_copy(intact, key) or key[1] in bad_trailers:
            repo.release_quarantine(key)  # read whole and intact just now, or its pack gone
            released += key[1] not in bad_trailers
    temp_deleted = repo.delete_temp_files()
    index = repo.reload_index()
    points, damaged_manifests = repo.scan_points()
    unrestorable = [UnrestorablePoint(name.removesuffix(".json"), (f"its manifest: {message}",))
                    for name, message in damaged_manifests]
    for point in points:
        missing = _missing_of(repo, point, index.get)
        if missing:
            unrestorable.append(UnrestorablePoint(point.id, tuple(missing)))
    return RepairReport(
        packs_read=len(pack_ids), objects_intact=len(index), damaged=tuple(damaged),
        damaged_trailers=tuple(bad_trailers), objects_copied=copied,
        index_files_replaced=len(old_index_files), damaged_index_files=damaged_index_files,
        temp_files_deleted=temp_deleted, quarantine_released=released,
        points=len(points) + len(damaged_manifests),
        unrestorable=tuple(sorted(unrestorable, key=lambda u: u.point_id)),
        packs_gone=tuple(gone))


def _is_intact_copy(intact: dict[bytes, Location], key: CopyKey) -> bool:
    loc = intact.get(key[0])
    return loc is not None and (loc.pack_id, loc.offset) == (key[1], key[2])


def _copy_out(repo: Store, intact: dict[bytes, Location], spares: dict[bytes, list[Location]],
              salvage: dict[bytes, tuple[bytes, int]], old_index_files: list[str]) -> int:
    """Copy the salvaged objects no intact pack holds to new packs, write the fresh index
    files (`index_file.layered`: the spares of an object whose first copy a waiting collection
    may delete, too), then delete the old ones. -> objects copied."""
    consequence = "the index files were not changed"
    sink = PackSink(repo, lambda name: name in intact, consequence=consequence,
                    checkpoint=False)
    try:
        for name, (envelope, plain_length) in sorted(salvage.items()):
            sink.add(name, envelope, plain_length)
        copied = sink.finish_packs()
        intact.update(copied)
        copies = {name: [loc, *spares.get(name, ())] for name, loc in intact.items()}
        for entries in index_file.layered(copies, repo.condemned_packs()):
            repo.write_index(new_index_name(), index_file.encode(entries), consequence)
        sink.named_elsewhere()
    finally:
        sink.close()
    for old in old_index_files:
        repo.delete_index(old)
    return len(copied)


def _scan_pack(repo: Store, pack_id: str) -> _PackScan:
    """Read a pack whole and check every object in it (found by its trailer, or, when the
    trailer is damaged, by walking the envelopes)."""
    where = f"pack {pack_id}"
    try:
        data = repo.read_pack(pack_id)
    except (ObjectNotFound, ObjectMissing):
        return _PackScan([], [], None, [], gone=True)  # the points it held are named
    try:
        entries, trailer_problem = read_trailer(data, where, pack_id=pack_id,
                                                trailer_key=repo.codec.trailer_key), None
    except ChunkCorrupt as exc:
        entries, trailer_problem = walk_envelopes(data, repo.codec), exc.message
    scan = _PackScan([], [], trailer_problem, [])
    for name, offset, length in entries:
        envelope = data[offset : offset + length]
        kind = envelope[5] if len(envelope) > 5 and envelope[5] in KIND_NAMES else KIND_CHUNK
        try:
            plain = repo.codec.open(envelope, kind, name, f"{KIND_NAMES[kind]} {name.hex()} in "
                                  f"{where} at offset {offset}")
        except ChunkCorrupt as exc:
            scan.damaged.append(DamagedCopy(name, kind, pack_id, offset, length, exc.message))
            continue
        if trailer_problem is None:
            scan.intact.append((name, Location(pack_id, offset, length, len(plain))))
        else:
            scan.salvage.append((name, envelope, len(plain)))
    return scan


Locate = Callable[[bytes], Location | None]


def _missing_of(repo: Store, point: RestorePoint, locate: Locate) -> list[str]:
    """What the point needs that has no intact copy, with the disk range it covers."""
    page_bytes = point.chunk_size * point.page_chunks
    missing: list[str] = []
    for table_no, table in enumerate(point.tables):
        first_page = table_no * TABLE_PAGES
        if locate(bytes.fromhex(table)) is None:
            missing.append(f"page table {table} (disk bytes {first_page * page_bytes}-"
                           f"{min(point.size_bytes, (first_page + TABLE_PAGES) * page_bytes)})")
            continue
        try:
            plain = repo.read_page(table, point.id, KIND_TABLE)
        except RepositoryError as exc:
            missing.append(exc.message)
            continue
        for slot in range(0, len(plain), 32):
            page_no = first_page + slot // 32
            missing += _missing_in_page(repo, point, plain[slot : slot + 32].hex(), page_no,
                                        locate)
    return missing


def _missing_in_page(repo: Store, point: RestorePoint, page: str, page_no: int,
                     locate: Locate) -> list[str]:
    cs, pc = point.chunk_size, point.page_chunks
    start = page_no * pc * cs
    if locate(bytes.fromhex(page)) is None:
        return [f"page {page} (disk bytes {start}-{min(point.size_bytes, start + pc * cs)})"]
    try:
        plain = repo.read_page(page, point.id)
    except RepositoryError as exc:
        return [exc.message]
    missing = []
    for slot in range(0, len(plain), 32):
        name = plain[slot : slot + 32]
        if name != ZERO_DIGEST and locate(name) is None:
            missing.append(f"chunk {name.hex()} at disk offset {start + slot // 32 * cs}")
    return missing
