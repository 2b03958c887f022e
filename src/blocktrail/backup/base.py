"""Which restore point an incremental builds on, and whether it can carry one.

A base must be whole: its manifest intact (checksum, ID, base link), its page tables readable,
no page of it lost, and every page the incremental changes readable. A point that is not is
passed over for the next older one (the incremental then reads more, and is right); the report
says which and why. Chunks of the base that are lost (damaged, in quarantine) are read from the
source again, so the new point never inherits a chunk the repository no longer has.

A point that failed verification, or whose audit caught the tracker missing changes, proves the
tracker lied somewhere before it: an incremental since any older point would ask the tracker
about that window. So such a point **taints** every older one: the walk stops and the backup
reads everything, saying why. A point whose parent chain (up to its full or healed point)
holds such a point inherited its wrong chunks and taints the same way. A healed point's content
was compared with its source, so its chain stops at itself: newer than a failure, it is a base.

A point of an NBD export whose change label names a dirty bitmap the server did not agree to
(its fallback reason says so) taints the same way: blocktrail before it checked that recorded
the bitmap's label regardless, though the bitmap did not exist then and so need not have
recorded the writes since; an incremental built on it may have missed them too.
"""

from __future__ import annotations

from dataclasses import dataclass

from blocktrail.backup.plan import BasePoint, ReadPlan
from blocktrail.repo import Repository, RestorePoint
from blocktrail.repo.errors import RepositoryError
from blocktrail.repo.manifest import PointLookup, link_problems, parent_chain
from blocktrail.repo.objects import ZERO_DIGEST
from blocktrail.repo.pointwalk import PointWalk


@dataclass(frozen=True, slots=True)
class BaseChoice:
    base: BasePoint | None
    point: RestorePoint | None
    passed_over: tuple[str, ...]  # "<point or file>: why it is not the base"
    no_base: str | None = None  # why no point may be the base (a newer one is tainted)


def choose_base(store: Repository, disk_id: str,
                exclude: dict[str, str] | None = None) -> BaseChoice:
    """The newest whole restore point of the disk that no newer tainted point rules out (see
    the module's note); None, with the reason in ``no_base``, once a tainted one is reached.
    The manifests are read newest first, as far as the choice needs: the points newer than
    the base, and the parents their chains name."""
    exclude = exclude or {}
    walk = PointWalk(store)
    # After the listing: an index file names every object of a listed point (written first).
    store.reload_index()
    lost = store.lost_objects()
    passed: list[str] = []

    def choice(point: RestorePoint | None, no_base: str | None = None) -> BaseChoice:
        base = None if point is None else \
            BasePoint(point.id, point.change_id, point.size_bytes, point.chunk_size)
        damaged = [f"{name}: {message}" for name, message in walk.damaged]
        return BaseChoice(base, point, (*damaged, *passed), no_base)

    for point in walk.newest_first():
        if point.disk_id != disk_id:
            continue
        tainted = _tainted(point, walk)
        if tainted is not None:
            return choice(None, tainted)
        why = exclude.get(point.id) or _not_whole(store, point, walk, lost)
        if why is not None:
            passed.append(f"restore point {point.id}: {why}")
            continue
        return choice(point)
    return choice(None)


def _tainted(point: RestorePoint, by_id: PointLookup) -> str | None:
    """Why neither ``point`` nor any older point may be the base: it, or a point of its parent
    chain up to its full or healed point, taints (`RestorePoint.taint`). A forgotten parent
    ends the chain: nothing more is known of it, and `forget` keeps a tainted point while a
    point it keeps has it in its chain (repo/retention.py)."""
    for link in parent_chain(point, by_id):
        which = f"restore point {link.id}" if link is point else \
            f"restore point {link.id}, which restore point {point.id} builds on,"
        taint = link.taint
        if taint == "failed":
            return (f"{which} failed verification: the change tracker may have missed changes "
                    "since an older point; reading everything")
        if taint == "tracker-missed":
            return (f"the audit of {which} caught the change tracker missing changes: it may "
                    "have missed more since an older point; reading everything")
        if taint == "refused-bitmap":
            return (f"{which} records the dirty bitmap {link.change_id} as its change label, "
                    "but the NBD server did not agree to that bitmap when it was taken (an "
                    "earlier blocktrail recorded it regardless): nothing says the bitmap "
                    "recorded every write since then; reading everything")
    return None


def _not_whole(store: Repository, point: RestorePoint, by_id: PointLookup,
               lost: frozenset[bytes]) -> str | None:
    problems = link_problems(point, by_id.get(point.parent) if point.parent else None)
    if problems:
        return "; ".join(problems)
    try:
        pages = store.pages_of(point)
    except RepositoryError as exc:
        return exc.message
    for page in pages:
        if bytes.fromhex(page) in lost:
            return f"its page {page} is lost ({store.index.why_missing(bytes.fromhex(page))})"
    return None


def prepare_incremental(store: Repository, point: RestorePoint,
                        plan: ReadPlan) -> tuple[str | None, list[int]]:
    """-> (why ``point`` cannot carry this incremental, or None; the chunks of the point the
    repository has no usable copy of: the backup reads them from the source again)."""
    try:
        # the pages the incremental changes must be readable: the writer reads them at commit
        for _ in store.point_pages(point, (index // point.page_chunks for index in plan.chunks)):
            pass
        if not store.lost_objects() and not store.index.damaged_files:
            return None, []
        changed = set(plan.chunks)
        return None, [index for index, name in store.page_entries(point)
                      if name != ZERO_DIGEST and index not in changed
                      and not store.has_chunk(name)]
    except RepositoryError as exc:
        return exc.message, []
