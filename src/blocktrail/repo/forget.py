"""`forget`: delete the manifests (and verify records) of the restore points a retention
policy does not keep, per disk. The data goes at the next `prune`.

A point that a running backup of its disk builds on (its lease names it as the base) is kept,
whatever the policy says (Proxmox Backup Server's rule): the next forget decides again. One that
a backup takes as its base while it is being forgotten is put back (`delete_points`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from blocktrail.repo import layout
from blocktrail.repo.backend import ObjectExists, ObjectNotFound
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
    protected = [p for p in gone if p.id in bases]
    gone = [p for p in gone if p.id not in bases]
    if not dry_run:
        put_back = delete_points(store, gone, "some restore points may not be forgotten yet; "
                                              "run forget again")
        protected += [p for p in gone if p.id in put_back]
        gone = [p for p in gone if p.id not in put_back]
    return ForgetResult(tuple(gone), tuple(protected))


def running_bases(store: Store) -> set[str]:
    """The points that running backups build on (their disks' unexpired leases name them)."""
    return {lease.base for lease in list_leases(store.backend)
            if lease.base and not lease.expired(store.timing.margin)}


def delete_points(store: Store, points: list[RestorePoint], consequence: str) -> set[str]:
    """Delete the points' manifests and verify records (one gone already is skipped). -> the
    points put back as they were: a backup named one as its base after the caller looked at
    the leases. A backup names its base, then checks that it is there; this deletes, then
    looks at the leases again: whichever comes second sees the other."""
    if not points:
        return set()
    records = store.verify_records()
    saved: dict[str, list[tuple[str, bytes]]] = {}
    with store.writing("forgetting restore points", consequence):
        for point in points:
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
    with store.writing("putting back the base of a running backup", "run forget again"):
        for point_id in sorted(put_back):
            for name, data in saved[point_id]:  # its verify records first
                with contextlib.suppress(ObjectExists):
                    store.backend.create(name, data)
    return put_back
