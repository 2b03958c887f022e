"""`forget`: delete the manifests (and verify records) of the restore points a retention
policy does not keep, per disk. The data goes at the next `prune`.

A point that a running backup of its disk builds on (its lease names it as the base) is kept,
whatever the policy says (Proxmox Backup Server's rule): the next forget decides again.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from blocktrail.repo.backend import ObjectNotFound
from blocktrail.repo.leases import list_leases
from blocktrail.repo.manifest import RestorePoint
from blocktrail.repo.retention import RetentionPolicy, points_to_keep
from blocktrail.repo.store import Store


@dataclass(frozen=True, slots=True)
class ForgetResult:
    forgotten: tuple[RestorePoint, ...]
    kept_as_base: tuple[RestorePoint, ...]  # the policy would forget them; a backup uses them


def forget_points(store: Store, policy: RetentionPolicy, disk_id: str | None = None,
                  dry_run: bool = False) -> ForgetResult:
    points = store.points(disk_id)
    gone: list[RestorePoint] = []
    for disk in sorted({p.disk_id for p in points}):
        mine = [p for p in points if p.disk_id == disk]
        keep = points_to_keep(mine, policy)
        gone += [p for p in mine if p.id not in keep]
    bases = running_bases(store)
    protected = tuple(p for p in gone if p.id in bases)
    gone = [p for p in gone if p.id not in bases]
    if not dry_run:
        delete_points(store, gone, "some restore points may not be forgotten yet; run forget "
                                   "again")
    return ForgetResult(tuple(gone), protected)


def running_bases(store: Store) -> set[str]:
    """The points that running backups build on (their disks' unexpired leases name them)."""
    return {lease.base for lease in list_leases(store.backend)
            if lease.base and not lease.expired(store.timing.margin)}


def delete_points(store: Store, points: list[RestorePoint], consequence: str) -> None:
    """Delete the points' manifests and verify records (one gone already is skipped)."""
    if not points:
        return
    records = store.verify_records()
    with store.writing("forgetting restore points", consequence):
        for point in points:
            store.delete_manifest(point.id)
            for name in records.get(point.id, []):
                with contextlib.suppress(ObjectNotFound):
                    store.backend.delete(name)
