"""`forget`: delete the manifests (and verify records) of the restore points a retention
policy does not keep, per disk. The data goes at the next `prune`.

A point that a running backup of its disk builds on (its lease names it as the base) is kept,
whatever the policy says (Proxmox Backup Server's rule): the next forget decides again. One that
a backup takes as its base while it is being forgotten is put back (`delete_points`).

A point that taints (`RestorePoint.taint` says why) is kept while a point that stays (kept by
the policy or as a base) has it in its parent chain, with the points between them
(repo/retention.py, `kept_for_taint`): without it, the child would look like a good base.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from blocktrail.repo import layout
from blocktrail.repo.backend import ObjectExists, ObjectNotFound
from blocktrail.repo.leases import list_leases
from blocktrail.repo.manifest import RestorePoint
from blocktrail.repo.retention import RetentionPolicy, kept_for_taint, points_to_keep
from blocktrail.repo.store import Store


@dataclass(frozen=True, slots=True)
class ForgetResult:
    forgotten: tuple[RestorePoint, ...]
    kept_as_base: tuple[RestorePoint, ...]  # the policy would forget them; a backup uses them
    # the policy would forget them; a point that stays builds on them, and they are (or lead
    # to) a point that taints (RestorePoint.taint)
    kept_for_taint: tuple[RestorePoint, ...] = ()


def forget_points(store: Store, policy: RetentionPolicy, disk_id: str | None = None,
                  dry_run: bool = False) -> ForgetResult:
    points = store.points(disk_id)
    bases = running_bases(store)
    gone: list[RestorePoint] = []
    protected: list[RestorePoint] = []
    tainted: list[RestorePoint] = []
    for disk in sorted({p.disk_id for p in points}):
        mine = [p for p in points if p.disk_id == disk]
        keep = points_to_keep(mine, policy)
        protected += [p for p in mine if p.id not in keep and p.id in bases]
        keep |= bases
        chains = kept_for_taint(mine, keep)
        tainted += [p for p in mine if p.id in chains]
        gone += [p for p in mine if p.id not in keep | chains]
    if not dry_run:
        put_back = delete_points(store, gone, "some restore points may not be forgotten yet; "
                                              "run forget again")
        chains = {q for p in put_back for q in kept_for_taint(gone, {p})}  # came back with p
        protected += [p for p in gone if p.id in put_back - chains]
        tainted += [p for p in gone if p.id in chains]
        gone = [p for p in gone if p.id not in put_back]
    return ForgetResult(tuple(gone), tuple(protected), tuple(tainted))


def running_bases(store: Store) -> set[str]:
    """The points that running backups build on (their disks' unexpired leases name them)."""
    return {lease.base for lease in list_leases(store.backend)
            if lease.base and not lease.expired(store.timing.margin)}


def delete_points(store: Store, points: list[RestorePoint], consequence: str) -> set[str]:
    """Delete the points' manifests and verify records (one gone already is skipped). -> the
    points put back as they were: a backup named one as its base after the caller looked at
    the leases. A backup names its base, then checks that it is there; this deletes, then
    looks at the leases again: whichever comes second sees the other. A point put back takes
    back the points of its chain that taint (and those between), as `forget_points` keeps them.

    The newest go first: a point's children before it, so neither a backup listing the points
    meanwhile nor a forget that stops half-way leaves a child without the parent that taints
    it."""
    if not points:
        return set()
    records = store.verify_records()
    saved: dict[str, list[tuple[str, bytes]]] = {}
    with store.writing("forgetting restore points", consequence):
        for point in sorted(points, key=lambda p: p.id, reverse=True):
            names = [*records.get(point.id, []), layout.manifest(point.id)]  # the manifest last
            found = []
            for name in names:
                with contextlib.suppress(ObjectNotFound):
                    found.append((name, store.backend.load(name)))
            if found and found[-1][0] == names[-1]:  # else going already: nothing to put back
                saved[point.id] = found
            for name in reversed(names):
                with contextlib.suppress(ObjectNotFound):
                    store.backend.delete(name)
    put_back = running_bases(store) & saved.keys()
    put_back |= kept_for_taint(points, put_back) & saved.keys()
    with store.writing("putting back the base of a running backup", "run forget again"):
        for point_id in sorted(put_back):  # the oldest first: a parent before its child
            for name, data in saved[point_id]:  # its verify records first
                with contextlib.suppress(ObjectExists):
                    store.backend.create(name, data)
    return put_back
