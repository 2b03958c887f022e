"""`prune`: delete what no restore point references, in an order that can always free space.

Under the exclusive repository lock: the dead packs are deleted first, then one new index file
is written, then the old index files are deleted. Deleting first is safe because loading the
chunk index ignores every entry whose pack does not exist, so no backup can deduplicate against
a deleted pack, even after a prune killed midway; and it means a full file system gets space
back before anything needs to be written.
"""

from __future__ import annotations

import contextlib
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blocktrail.repo import index as index_file
from blocktrail.repo.errors import ManifestCorrupt, RepositoryError
from blocktrail.repo.objects import ZERO_DIGEST

if TYPE_CHECKING:
    from blocktrail.repo.repository import Repository


@dataclass
class PruneReport:
    packs_deleted: int = 0
    index_files_replaced: int = 0
    bytes_freed: int = 0
    kept_partly_used_packs: int = 0
    temp_files_deleted: int = 0
    quarantine_records_deleted: int = 0


def prune_repository(repo: Repository) -> PruneReport:
    lock = repo.lock(exclusive=True, what="prune")
    try:
        return _prune_locked(repo)
    finally:
        lock.release()


def _live_objects(repo: Repository) -> set[bytes]:
    """Every object some manifest needs: its tables, their pages, their chunks."""
    live: set[bytes] = set()
    pages: dict[str, str] = {}  # page -> a restore point that needs it
    for filename in repo.list_files("points", ".json"):
        try:
            point = repo.load_manifest(filename)
        except ManifestCorrupt as exc:
            raise RepositoryError(
                f"cannot prune: {exc.message}; prune cannot tell what that restore point needs. "
                "If the manifest cannot be fixed, move it out of points/ (`blocktrail check` "
                "names every damaged manifest)") from exc
        live.update(bytes.fromhex(t) for t in point.tables)
        try:
            pages.update((page, point.id) for page in repo.pages_of(point))
        except RepositoryError as exc:
            raise _cannot_tell(exc, point.id) from exc
    for page, point_id in pages.items():
        live.add(bytes.fromhex(page))
        try:
            plain = repo.read_page(page, point_id)
        except RepositoryError as exc:
            raise _cannot_tell(exc, point_id) from exc
        live.update(plain[i : i + 32] for i in range(0, len(plain), 32))
    live.discard(ZERO_DIGEST)
    return live


def _cannot_tell(exc: RepositoryError, point_id: str) -> RepositoryError:
    return RepositoryError(
        f"cannot prune: {exc.message}; prune cannot tell which chunks restore point {point_id} "
        "needs. Run `blocktrail repo repair`, then heal or forget the restore points it names")


def _prune_locked(repo: Repository) -> PruneReport:
    report = PruneReport()
    index = repo.reload_index()  # re-read: other processes may have added index files
    if index.damaged_files:
        names = ", ".join(f"index/{n}" for n, _ in index.damaged_files)
        raise RepositoryError(f"cannot prune: {names} cannot be read, and the packs only they "
                              "name would look unused; run `blocktrail repo repair` first")
    live = _live_objects(repo)
    pack_live: dict[str, bool] = {}
    for name, loc in index.items():
        pack_live[loc.pack_id] = pack_live.get(loc.pack_id, False) or name in live
    live_packs = {pack for pack, used in pack_live.items() if used}
    keep = {n: loc for n, loc in index.items() if loc.pack_id in live_packs}
    report.kept_partly_used_packs = len({loc.pack_id for n, loc in keep.items()
                                         if n not in live})
    repo.close_handles()
    dead = sorted(repo.pack_ids() - live_packs)
    for pack_id in dead:  # 1. free space first
        report.bytes_freed += repo.delete_pack(pack_id)
        report.packs_deleted += 1
    freed = (f"the {report.packs_deleted} unused packs deleted first freed "
             f"{report.bytes_freed} bytes; no restore point lost anything")
    with repo.writing("deleting unused packs", freed):
        for directory in sorted({pack_id[:2] for pack_id in dead}):
            with contextlib.suppress(FileNotFoundError):
                repo.fio.fsync_dir(repo.join("packs", directory))
    old_index_files = repo.list_files("index", ".idx")
    if dead or len(old_index_files) > 1 or index.lost():
        new_name = f"{secrets.token_hex(16)}.idx"  # 2. the index without the dead packs
        repo.write_index(new_name, index_file.encode(keep), freed)
        with repo.writing("replacing the old index files", freed):
            for old in old_index_files:  # 3. then the old index files
                repo.fio.unlink(repo.join("index", old))
            repo.fio.fsync_dir(repo.join("index"))
        report.index_files_replaced = len(old_index_files)
    report.quarantine_records_deleted = _drop_records_of_deleted_packs(repo, live_packs)
    report.temp_files_deleted = repo.delete_temp_files()
    repo.reload_index()
    return report


def _drop_records_of_deleted_packs(repo: Repository, live_packs: set[str]) -> int:
    deleted = 0
    for key in repo.quarantined():
        if key[1] not in live_packs:
            repo.release_quarantine(key)
            deleted += 1
    return deleted
