"""`prune`: garbage collection, safe against backups running at the same time (docs/storage.md,
"Garbage collection").

Mark and sweep, with the grace period bound to the writers, not to a clock:

1. **Mark**: every object some manifest needs (its tables, their pages, their chunks). A pack
   that holds a copy of none of them is dead.
2. **Condemn**: the dead packs are named in ``gc/<run>.condemned.json``; *then* the leases of
   the writers running now are listed and named in ``gc/<run>.writers.json``. A writer that
   starts later lists ``gc/`` after its lease exists, so it sees the condemned packs and never
   refers to an object in them (it stores such an object again); a writer listed may already
   have read the index and deduplicated against one.
3. **Sweep** (this prune, if those writers finish within ``wait_s``, else a later one): once every
   writer a run names is gone (its lease deleted, taken over or expired), the manifests are
   read again, and a condemned pack is deleted only if it still holds nothing any manifest
   needs. Then an index file of the entries left replaces the index files that were read (with
   more files naming the spare copies of objects another waiting run may still delete), and
   the run's objects, the quarantine records of deleted packs and the verify records of
   forgotten points are deleted.

So a chunk stored during a collection, or by a backup that started before it, is never deleted:
the backup's own new packs either were not listed yet, or are condemned and then kept by its
manifest, which exists when its lease is gone. A writer whose lease expired (killed, stalled)
publishes nothing any more (repo/leases.py), so its uploads are collected like any orphan.

On a local directory with no writer at all (the machine-wide lock taken exclusively), the
sweep follows the mark at once, with nothing written before the dead packs are deleted, so a
prune can free space on a full file system.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field

from blocktrail.pipeline import read_ahead
from blocktrail.repo import index as index_file
from blocktrail.repo import layout
from blocktrail.repo.backend import BackendError, ObjectNotFound
from blocktrail.repo.errors import ManifestCorrupt, ObjectMissing, RepositoryError
from blocktrail.repo.index import ChunkIndex
from blocktrail.repo.leases import (
    Lease,
    LeaseRecord,
    boot_clock,
    list_leases,
    live_writers,
    read_lease,
)
from blocktrail.repo.objects import ZERO_DIGEST
from blocktrail.repo.packs import Location
from blocktrail.repo.store import (
    Store,
    condemned_list,
    new_index_name,
    stamp,
    writers_list,
)


@dataclass
class PruneReport:
    packs_deleted: int = 0
    index_files_replaced: int = 0
    bytes_freed: int = 0
    kept_partly_used_packs: int = 0
    temp_files_deleted: int = 0
    quarantine_records_deleted: int = 0
    packs_condemned: int = 0  # by this prune
    packs_waiting: int = 0  # condemned, to be deleted once the writers named finish
    waiting_for: list[str] = field(default_factory=list)  # those writers
    verify_records_deleted: int = 0
    damaged_copies: list[str] = field(default_factory=list)  # found checking the copy kept


@dataclass(frozen=True, slots=True)
class _Run:
    run: str
    packs: frozenset[str]
    writers: tuple[tuple[str, str], ...] | None  # (lease name, owner); None: never named


def prune_repository(store: Store, wait_s: float = 0.0) -> PruneReport:
    """Collect garbage; wait up to ``wait_s`` for the writers running now to finish."""
    backend = store.backend
    if backend.host_locks:
        alone = backend.host_lock(exclusive=True, wait=False)
        if alone is not None:  # no writer on this machine, and none can start meanwhile
            try:
                # nor a writer of another machine that shares the directory through a file
                # system whose locks do not reach here (its lease is live): else as below
                if not live_writers(backend, store.timing.margin):
                    return _prune_alone(store)
            finally:
                alone.release()
    with Lease.acquire(backend, layout.MAINTENANCE_LEASE, purpose="maintenance",
                       timing=store.timing, what="prune") as lease:
        host = backend.host_lock(exclusive=False, wait=True) if backend.host_locks else None
        try:
            return _prune_leased(store, lease, wait_s)
        finally:
            if host is not None:
                host.release()


def _prune_alone(store: Store) -> PruneReport:
    report = PruneReport()
    for run in _runs(store):  # condemned lists of prunes before: nobody waits on them now
        _delete_run(store, run.run)
    index, live = _mark(store)
    dead = set(store.pack_ids()) - _live_packs(index, live)
    report.packs_condemned = len(dead)
    _sweep(store, index, live, dead, report)
    return _finish(store, report)


def _finish(store: Store, report: PruneReport) -> PruneReport:
    """What every prune ends with: the leftovers of writes cut short, and the index read
    again."""
    report.temp_files_deleted = store.delete_temp_files()
    report.verify_records_deleted = _drop_orphan_verify_records(store)
    _drop_dead_writer_leases(store)
    store.reload_index()
    return report


def _drop_dead_writer_leases(store: Store) -> None:
    """The leases of writers of no disk (a restore, a verify, serve, a heal) that can publish
    nothing more: a killed one leaves its lease under a name no one takes over. Each is deleted
    only as it was seen (its version): one renewed meanwhile stays."""
    for record in list_leases(store.backend):
        if layout.is_writer_lease(record.name) and record.expired(store.timing.margin):
            with contextlib.suppress(BackendError, OSError):  # renewed or gone meanwhile
                store.backend.delete(record.name, record.info.etag)


def _prune_leased(store: Store, lease: Lease, wait_s: float) -> PruneReport:
    report = PruneReport()
    runs = _runs(store)
    for run in [r for r in runs if r.writers is None]:
        _delete_run(store, run.run)
    runs = [r for r in runs if r.writers is not None]
    index, live = _mark(store)
    dead = set(store.pack_ids()) - _live_packs(index, live) - {p for r in runs for p in r.packs}
    if dead:
        runs.append(_condemn(store, lease, dead))
        report.packs_condemned = len(dead)
    deadline = boot_clock() + wait_s
    while True:
        waiting = {r.run: _still_running(store, r) for r in runs}
        if not any(waiting.values()) or boot_clock() >= deadline:
            break
        time.sleep(min(1.0, store.timing.renew_every))
    ready = [r for r in runs if not waiting[r.run]]
    for run in runs:
        if waiting[run.run]:
            report.packs_waiting += len(run.packs)
            report.waiting_for += [w.describe() for w in waiting[run.run]]
    if ready or not runs:
        lease.check("delete packs")
        index, live = _mark(store)
        _sweep(store, index, live, {p for r in ready for p in r.packs}, report)
        for run in ready:
            _delete_run(store, run.run)
    return _finish(store, report)


# ---------------------------------------------------------------------------- runs


def _runs(store: Store) -> list[_Run]:
    """The condemned lists there are; ``writers`` None for a run whose prune stopped before
    it named them (nothing of it was deleted: it is dropped)."""
    found: dict[str, dict[str, str]] = {}
    for info in store.backend.list(layout.GC):
        parsed = layout.gc_run_of(info.name)
        if parsed is not None:
            found.setdefault(parsed[0], {})[parsed[1]] = info.name
    runs = []
    for run, parts in sorted(found.items()):
        packs: frozenset[str] = frozenset()
        writers = None
        try:
            if "condemned" in parts:
                packs = condemned_list(store.backend.load(parts["condemned"]))
            if "writers" in parts:
                writers = writers_list(store.backend.load(parts["writers"]))
        except (ValueError, ObjectNotFound):
            packs, writers = frozenset(), None  # damaged or half gone: start that run again
        if "condemned" not in parts:
            writers = None
        runs.append(_Run(run, packs, writers))
    return runs


def _condemn(store: Store, lease: Lease, dead: set[str]) -> _Run:
    """Name the dead packs, then the writers running now (in this order: see the module)."""
    run = stamp()
    consequence = "nothing was deleted"
    lease.check("condemn unused packs")
    with store.writing("condemning unused packs", consequence):
        store.backend.create(layout.gc_condemned(run), json.dumps(
            {"format": "blocktrail-gc", "version": 1, "packs": sorted(dead)}).encode())
    writers = tuple((w.name, w.owner) for w in list_leases(store.backend)
                    if w.purpose != "maintenance" and not w.expired(store.timing.margin))
    with store.writing("naming the running writers", consequence):
        store.backend.create(layout.gc_writers(run), json.dumps(
            {"format": "blocktrail-gc", "version": 1, "writers": writers}).encode())
    return _Run(run, frozenset(dead), writers)


def _still_running(store: Store, run: _Run) -> list[LeaseRecord]:
    """The writers a run waits for that are still there with the same owner, unexpired."""
    running = []
    for name, owner in run.writers or ():
        record = read_lease(store.backend, name)
        if record is not None and record.owner == owner \
                and not record.expired(store.timing.margin):
            running.append(record)
    return running


def _delete_run(store: Store, run: str) -> None:
    for name in (layout.gc_writers(run), layout.gc_condemned(run)):
        store.backend.delete(name)


# ---------------------------------------------------------------------------- mark


def _refuse_damage(index: ChunkIndex) -> None:
    if index.damaged_files:
        names = ", ".join(layout.index_file(n) for n, _ in index.damaged_files)
        raise RepositoryError(f"cannot prune: {names} cannot be read, and the packs only they "
                              "name would look unused; run `blocktrail repo repair` first")


def _mark(store: Store) -> tuple[ChunkIndex, set[bytes]]:
    """The chunk index, and every object some manifest needs: its tables, their pages, their
    chunks. Read order (restic's): the manifests first, then the index, so that the index
    files (and packs) of every manifest read are seen."""
    points = []
    for filename in store.manifest_files():
        try:
            points.append(store.load_manifest(filename))
        except FileNotFoundError:
            continue  # forgotten since the listing
        except ManifestCorrupt as exc:
            raise RepositoryError(
                f"cannot prune: {exc.message}; prune cannot tell what that restore point needs. "
                "If the manifest cannot be fixed, move it out of points/ (`blocktrail check` "
                "names every damaged manifest)") from exc
    index = store.reload_index()
    _refuse_damage(index)
    live: set[bytes] = set()
    pages: dict[str, str] = {}  # page -> a restore point that needs it
    for point in points:
        live.update(bytes.fromhex(t) for t in point.tables)
        try:
            pages.update((page, point.id) for page in store.pages_of(point))
        except RepositoryError as exc:
            raise _cannot_tell(exc, point.id) from exc
    window = 32 if store.backend.remote else 4
    items = sorted(pages.items())
    reads = read_ahead(items, lambda item: _read_page(store, *item), window=window,
                       executor=store.io_pool)
    for (page, point_id), plain in zip(items, reads, strict=True):
        if isinstance(plain, RepositoryError):
            raise _cannot_tell(plain, point_id) from plain
        live.add(bytes.fromhex(page))
        live.update(plain[i : i + 32] for i in range(0, len(plain), 32))
    live.discard(ZERO_DIGEST)
    return index, live


def _read_page(store: Store, page: str, point_id: str) -> bytes | RepositoryError:
    try:
        return store.read_page(page, point_id)
    except RepositoryError as exc:
        return exc


def _cannot_tell(exc: RepositoryError, point_id: str) -> RepositoryError:
    return RepositoryError(
        f"cannot prune: {exc.message}; prune cannot tell which chunks restore point {point_id} "
        "needs. Run `blocktrail repo repair`, then heal or forget the restore points it names")


def _live_packs(index: ChunkIndex, live: set[bytes]) -> set[str]:
    """Packs holding a usable copy (the one used, or a spare) of a live object."""
    return {loc.pack_id for name in live for loc in index.copies(name)}


# ---------------------------------------------------------------------------- sweep


def _sweep(store: Store, index: ChunkIndex, live: set[bytes], condemned: set[str],
           report: PruneReport) -> None:
    """Delete the condemned packs that hold nothing live (first: that frees space before
    anything is written), then replace the index files read by one of what is left."""
    live_packs = _live_packs(index, live)
    doomed = sorted(condemned - live_packs)
    with store.writing("deleting unused packs", "no restore point lost anything; run prune "
                       "again"):
        for pack_id in doomed:
            report.bytes_freed += store.delete_pack(pack_id)
            report.packs_deleted += 1
    deleted = set(doomed)
    files = _surviving_copies(store, index, deleted, index.condemned - condemned, report)
    report.kept_partly_used_packs = len({loc.pack_id for n, loc in files[0].items()
                                         if n not in live and loc.pack_id in live_packs})
    freed = (f"the {report.packs_deleted} unused packs deleted first freed "
             f"{report.bytes_freed} bytes; no restore point lost anything")
    old_index_files = index.files
    if doomed or len(old_index_files) > 1 or index.lost():
        for entries in files:  # all of them before any old one goes
            store.write_index(new_index_name(), index_file.encode(entries), freed)
        with store.writing("replacing the old index files", freed):
            for old in old_index_files:
                store.delete_index(old)
        report.index_files_replaced = len(old_index_files)
    report.quarantine_records_deleted = _drop_records_of_deleted_packs(store)


def _surviving_copies(store: Store, index: ChunkIndex, deleted: set[str],
                      waiting: frozenset[str], report: PruneReport
                      ) -> list[dict[bytes, Location]]:
    """The entries of the index files that replace the ones read (`index_file.layered`):
    each object at its copies outside the deleted packs, the one used first if it survives.
    ``waiting``: packs condemned by runs that still wait for their writers. A spare must not
    be dropped with the copy used, nor while the copy named first may still be deleted by a
    waiting run: a writer may have deduplicated against the spare. Where only the first of
    several copies stays named, it is read and checked first (`_intact_first`)."""
    copies: dict[bytes, list[Location]] = {}
    for name in index.names():
        left = [copy for copy in index.copies(name) if copy.pack_id not in deleted]
        if left:
            copies[name] = left
    keep_all: set[bytes] = set()
    for name, left in copies.items():
        if len(left) > 1 and left[0].pack_id not in waiting:
            ordered = _intact_first(store, name, left, report)
            if ordered is None:
                keep_all.add(name)
            else:
                copies[name] = ordered
    return index_file.layered(copies, waiting, frozenset(keep_all))


def _intact_first(store: Store, name: bytes, copies: list[Location],
                  report: PruneReport) -> list[Location] | None:
    """``copies`` of ``name`` with one read whole and found intact at their head: the index
    files written next name that one only, and the packs of the others may be deleted later,
    so a damaged copy there would cost the object. A damaged copy read on the way is put in
    quarantine. -> None when no copy reads intact (then all of them stay named)."""
    for at, loc in enumerate(copies):
        try:
            damage = store.copy_damage(name, loc)
        except ObjectMissing:
            continue  # its pack went meanwhile: not a copy to keep
        if damage is None:
            return [loc, *copies[:at], *copies[at + 1 :]]
        copy = store.set_aside(damage)
        if copy is None:
            continue  # the copy is intact, that index entry was wrong: another names it
        report.damaged_copies.append(copy.reason + (
            "; put in quarantine" if copy.not_recorded is None
            else f"; not put in quarantine: {copy.not_recorded}"))
    return None


def _drop_records_of_deleted_packs(store: Store) -> int:
    count = 0
    packs = store.pack_ids()
    for key in store.quarantined():
        if key[1] not in packs:
            with contextlib.suppress(BackendError):
                store.release_quarantine(key)
                count += 1
    return count


def _drop_orphan_verify_records(store: Store) -> int:
    """Verify records of points that are gone (a forget stopped before it deleted them). The
    records are listed before the manifests: a point published and verified meanwhile keeps
    its record (listed the other way round, its record looked orphaned)."""
    records = store.verify_records()
    points = {f.removesuffix(".json") for f in store.manifest_files()}
    count = 0
    for point_id, names in records.items():
        if point_id not in points:
            for name in names:
                store.backend.delete(name)
                count += 1
    return count

