"""The repository: round trips, dedup, growth, leases, retention, corruption, fault sweeps; on
both backends (a local directory and S3) where the test is not about local files."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from blocktrail.errors import InvalidArgument, NoSpace
from blocktrail.fileio import FileHandle, OsFileIO
from blocktrail.repo import Encryption, Repository, RetentionPolicy, layout
from blocktrail.repo.backend import Backend, BackendError, BackendUnavailable
from blocktrail.repo.errors import (
    ManifestCorrupt,
    ObjectMissing,
    RepositoryBusy,
    RepositoryError,
    RepositoryExists,
    RepositoryNotFound,
)
from blocktrail.repo.keys import TEST_KDF
from blocktrail.repo.leases import Timing
from blocktrail.repo.location import open_backend
from blocktrail.repo.manifest import RestorePoint
from blocktrail.repo.restore import partial_name
from blocktrail.repo.store import Store
from blocktrail.simfileio import SimulatedFileIO
from s3server import TEST_ENCRYPTION, TEST_PASSWORD, TEST_TIMING, RepoTarget, SeaweedFS

CS = 64 * 1024


def image(seed: int, chunks: int, holes: frozenset[int] = frozenset()) -> list[bytes]:
    rng = random.Random(seed)
    return [bytes(CS) if i in holes else rng.randbytes(CS) for i in range(chunks)]


def store(repo: Repository, disk_id: str, chunks: list[bytes], parent: str | None = None,
          only: set[int] | None = None) -> RestorePoint:
    writer = repo.begin(disk_id, len(chunks) * CS, parent)
    for i, data in enumerate(chunks):
        if only is None or i in only:
            writer.put_chunk(i, data)
    return writer.commit(kind="incremental" if parent else "full", change_id=None)


def restored(repo: Repository, point: RestorePoint, tmp: Path) -> bytes:
    target = tmp / f"{point.id}.raw"
    repo.restore(point.id, str(target))
    return target.read_bytes()


@pytest.fixture
def repo(target: RepoTarget) -> Repository:
    return target.init()


@pytest.mark.encrypted_s3
def test_round_trip_holes_and_sparse_restore(repo: Repository, tmp_path: Path) -> None:
    chunks = image(1, 40, holes=frozenset({0, 5, 39}))
    point = store(repo, "d", chunks)
    assert restored(repo, point, tmp_path) == b"".join(chunks)
    target = tmp_path / f"{point.id}.raw"
    assert target.stat().st_blocks * 512 < 38 * CS + 16 * 4096  # holes stay holes
    assert point.stats["new_chunks"] == 37


@pytest.mark.parametrize("where", [0, 63, 64, CS // 2, CS - 1])
@pytest.mark.parametrize("tail", [CS // 3, 10], ids=["short-tail", "tail-under-64"])
def test_a_chunk_of_zeros_but_one_byte_is_no_hole(repo: Repository, tmp_path: Path,
                                                   where: int, tail: int) -> None:
    """Holes are found by comparing with zeros, the first bytes first: one byte anywhere makes
    the chunk data, stored and restored as it was; a short last chunk of zeros, even one
    shorter than the bytes compared first, is a hole (the audit and verify say so too)."""
    almost = bytearray(CS)
    almost[where] = 0x5A
    writer = repo.begin("d", 2 * CS + tail, None)  # the last chunk short
    chunks = [bytes(CS), bytes(almost), bytes(tail)]
    for i, data in enumerate(chunks):
        writer.put_chunk(i, data)
    point = writer.commit(kind="full", change_id=None)
    assert point.stats["new_chunks"] == 1  # the two chunks of zeros are holes
    assert restored(repo, point, tmp_path) == b"".join(chunks)


@pytest.mark.encrypted_s3
def test_incremental_inherits_and_costs_what_changed(repo: Repository, tmp_path: Path,
                                                    target: RepoTarget) -> None:
    chunks = image(2, 1024)  # 64 MiB disk
    full = store(repo, "d", chunks)
    before = target.stored_bytes()
    changed = {3, 100, 517, 800, 1023}
    newer = list(chunks)
    for i in changed:
        newer[i] = os.urandom(CS)
    inc = store(repo, "d", newer, parent=full.id, only=changed)
    growth = target.stored_bytes() - before
    assert growth <= 2 * len(changed) * CS, growth
    assert restored(repo, inc, tmp_path) == b"".join(newer)
    assert restored(repo, full, tmp_path) == b"".join(chunks)


def test_zeroed_chunk_in_incremental_is_a_hole_not_the_parent(repo: Repository,
                                                             tmp_path: Path) -> None:
    chunks = image(3, 8)
    full = store(repo, "d", chunks)
    newer = list(chunks)
    newer[4] = bytes(CS)
    inc = store(repo, "d", newer, parent=full.id, only={4})
    assert restored(repo, inc, tmp_path) == b"".join(newer)


def test_dedup_across_points_and_disks(repo: Repository, tmp_path: Path,
                                      target: RepoTarget) -> None:
    chunks = image(4, 64)
    store(repo, "disk-a", chunks)
    size = target.stored_bytes()
    other = store(repo, "disk-b", chunks)
    assert other.stats["new_chunks"] == 0
    assert target.stored_bytes() - size < 64 * 1024  # a manifest and nothing else new
    assert restored(repo, other, tmp_path) == b"".join(chunks)


def test_deleting_a_point_never_breaks_another(repo: Repository, tmp_path: Path) -> None:
    chunks = image(5, 32)
    full = store(repo, "d", chunks)
    newer = list(chunks)
    newer[7] = os.urandom(CS)
    inc = store(repo, "d", newer, parent=full.id, only={7})
    assert [p.id for p in repo.forget(RetentionPolicy(keep_last=1))] == [full.id]
    repo.prune()
    assert repo.check(read_data=True).ok
    assert restored(repo, inc, tmp_path) == b"".join(newer)


def test_retention_policies() -> None:
    from blocktrail.repo.retention import points_to_keep

    def point(day: int, hour: int) -> RestorePoint:
        stamp = f"2026-11-{day:02d}T{hour:02d}:00:00+00:00"
        return RestorePoint(f"202611{day:02d}T{hour:02d}0000Z-x", "d", 1, CS, 1024, (), "full",
                            None, None, None, stamp, "t")

    points = [point(d, h) for d in range(1, 29) for h in (1, 13)]
    keep = points_to_keep(points, RetentionPolicy(keep_last=3, keep_daily=5, keep_weekly=2))
    expected = {"28T13", "28T01", "27T13",  # last 3
                "26T13", "25T13", "24T13",  # newest of each of the 5 newest days (+28, 27)
                "22T13"}  # newest of the week before (the newest week's is 28T13)
    assert keep == {f"202611{k[:2]}T{k[3:]}0000Z-x" for k in expected}
    assert points_to_keep(points, RetentionPolicy()) == {p.id for p in points}


def test_a_point_that_taints_stays_while_a_kept_point_builds_on_it() -> None:
    """kept_for_taint: the chain of a kept point up to its last point that taints, and nothing
    past it nor past a full or healed point (there the chain ends)."""
    from blocktrail.repo.retention import kept_for_taint

    def point(n: int, kind: str, parent: int | None, verify: str = "unverified",
              trusted: bool = True) -> RestorePoint:
        return RestorePoint(f"20261101T0000{n:02d}Z-x", "d", 1, CS, 1024, (), kind,
                            None if parent is None else f"20261101T0000{parent:02d}Z-x", None,
                            None, f"2026-11-01T00:00:{n:02d}+00:00", "t", verify, trusted)

    full, failed = point(0, "full", None), point(1, "incremental", 0, "failed")
    between, child = point(2, "incremental", 1), point(3, "incremental", 2)
    points = [full, failed, between, child]
    assert kept_for_taint(points, {child.id}) == {failed.id, between.id}
    assert kept_for_taint(points, {failed.id}) == set()  # kept anyway; the full is no taint
    assert kept_for_taint(points, {child.id, between.id}) == {failed.id}
    caught = point(1, "incremental", 0, trusted=False)  # its audit caught the tracker
    assert kept_for_taint([full, caught, between, child], {child.id}) == {caught.id, between.id}
    ok_now = point(1, "incremental", 0, "ok")  # verified again: B is no taint, its parent is
    failed_full = point(0, "full", None, "failed")
    assert kept_for_taint([failed_full, ok_now, between, child], {child.id}) == \
        {failed_full.id, ok_now.id, between.id}
    healed = point(2, "healed", 1)  # ends its chain: the failed point before it is no matter
    assert kept_for_taint([full, failed, healed, point(3, "incremental", 2)],
                          {point(3, "incremental", 2).id}) == set()
    assert kept_for_taint([full, point(1, "incremental", 0), between, child],
                          {child.id}) == set()  # no taint: the policy alone decides


@pytest.mark.encrypted_s3
def test_prune_beside_a_running_backup_deletes_nothing_it_may_use(
        repo: Repository, tmp_path: Path, target: RepoTarget) -> None:
    chunks = image(20, 4)
    old = store(repo, "x", chunks)
    assert repo.forget(RetentionPolicy(keep_last=1), "x") == []
    for p in repo.points():  # forget the only point of "x": its pack is unused now
        repo.delete_manifest(p.id)
    early = target.open().begin("d", 4 * CS, None)  # before the prune:
    # it read the index then, and may use that pack
    for i, data in enumerate(chunks):
        early.put_chunk(i, data)
    report = repo.prune()  # does not wait for it, and deletes nothing it may use
    assert report.packs_condemned == 1 and report.packs_deleted == 0
    assert report.packs_waiting == 1 and len(report.waiting_for) == 1
    late = target.open().begin("e", 4 * CS, None)  # after the prune
    for i, data in enumerate(chunks):
        late.put_chunk(i, data)
    late_point = late.commit(kind="full", change_id=None)
    assert late_point.stats["new_chunks"] == 4  # never refers to a condemned pack
    early_point = early.commit(kind="full", change_id=None)
    assert early_point.stats["new_chunks"] == 0  # it deduplicated against the old pack
    report = repo.prune()  # the writer is gone: the old pack is needed now, and kept
    assert report.packs_deleted == 0 and report.packs_waiting == 0
    for point in (early_point, late_point):
        assert restored(target.open(), point, tmp_path) == b"".join(chunks)
    assert repo.check(read_data=True).ok
    assert old.id not in {p.id for p in repo.points()}


@pytest.mark.parametrize("packs", [[1], "a pack ID", ["../../x"], [None], {"a": 1}, None],
                         ids=["int", "str", "not-an-id", "null-item", "object", "null"])
def test_a_gc_run_file_of_the_wrong_types_is_a_damaged_run(
        repo: Repository, target: RepoTarget, packs: object) -> None:
    """A condemned list whose ``packs`` is not a list of pack IDs is damaged: that run is
    dropped (its prune stopped early), nothing is deleted for it."""
    point = store(repo, "d", image(21, 2))
    pack_id = sorted(repo.pack_ids())[0]
    run = "20261201T000000000Z-00000000"
    target.write(layout.gc_condemned(run), json.dumps(
        {"format": "blocktrail-gc", "version": 1,
         "packs": pack_id if packs == "a pack ID" else packs}).encode())
    target.write(layout.gc_writers(run), b'{"format": "blocktrail-gc", "version": 1, '
                                         b'"writers": []}')
    writer = target.open().begin("w", CS, None)  # a backup runs: prune takes the leased path
    try:
        assert target.open().lost_objects() == frozenset()  # the condemned list is ignored
        report = repo.prune()
    finally:
        writer.close()
    assert report.packs_deleted == 0 and report.packs_waiting == 0
    assert [n for n in target.names("gc/") if run in n] == []
    assert pack_id in repo.pack_ids()
    assert repo.check(read_data=True).ok
    assert point.id in {p.id for p in repo.points()}


@pytest.mark.encrypted_s3
def test_a_point_published_while_prune_reads_the_index_keeps_its_index(
        repo: Repository, tmp_path: Path, target: RepoTarget,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A backup writes its pack, its index file and its manifest while a prune loads the index
    (as the prune lists the packs). The index the prune writes in place of the files it read
    must still name that pack's objects: a prune that listed the index file but not yet its
    pack took them for lost and dropped them."""
    store(repo, "x", image(30, 4))
    store(repo, "y", image(31, 4))  # two index files: the prune replaces them by one
    chunks = image(32, 4)
    writer = target.open().begin("d", 4 * CS, None)
    for i, data in enumerate(chunks):
        writer.put_chunk(i, data)  # kept in memory until the commit
    loads: list[int] = []
    published: list[RestorePoint] = []
    load_index, pack_ids = Store._load_index, Store.pack_ids

    def counted_load(self: Any) -> Any:
        if self is repo:
            loads.append(1)
        return load_index(self)

    def listed_then_published(self: Any) -> Any:
        listed = pack_ids(self)
        if self is repo and len(loads) == 2 and not published:  # the mark before the sweep
            published.append(writer.commit(kind="full", change_id=None))
        return listed

    monkeypatch.setattr(Store, "_load_index", counted_load)
    monkeypatch.setattr(Store, "pack_ids", listed_then_published)
    repo.prune()
    monkeypatch.undo()
    assert published, "the writer did not publish during the prune's second index load"
    assert restored(target.open(), published[0], tmp_path) == b"".join(chunks)
    repo.prune()
    assert repo.check(read_data=True).ok


def test_prune_deletes_the_lease_a_killed_reader_left(tmp_path: Path) -> None:
    """A restore (or verify, serve) killed while it reads leaves its lease, under a name no one
    takes over: its process is gone, so forget and prune pass it over, and the next prune
    deletes it. The lease of a reader still running stays."""
    repo = Repository.init(tmp_path / "repo", encryption=TEST_ENCRYPTION)
    point = store(repo, "d", image(95, 4))
    killed = subprocess.run([sys.executable, "-c", f"""
import os
from blocktrail.repo import Repository
repo = Repository.open({str(tmp_path / "repo")!r}, password={TEST_PASSWORD!r})
repo.reader_lease({point.id!r})
os._exit(9)  # killed while it reads: the lease stays
"""], check=False)
    assert killed.returncode == 9
    [left] = [i.name for i in repo.backend.list(layout.LEASES)]
    running = repo.reader_lease(point.id)
    assert running is not None
    try:
        assert repo.prune().packs_waiting == 0
        assert [i.name for i in repo.backend.list(layout.LEASES)] == [running.name]
        assert left != running.name
    finally:
        running.release()


@pytest.mark.parametrize("when", ["before the index is read", "before the packs are read"])
def test_a_check_beside_a_forget_and_prune_finds_nothing_wrong(
        repo: Repository, target: RepoTarget, monkeypatch: pytest.MonkeyPatch,
        when: str) -> None:
    """A forget and a prune run while check reads: after it read the manifests (the index it
    reads next no longer names a forgotten point's objects), or after it listed the packs (a
    pack it lists is deleted as dead before it reads it). Check reports nothing (it reads the
    manifests and the index again before it says a thing is missing), where it said a
    forgotten point's page table, or a dead pack, was missing. What a kept point misses is
    still reported."""
    old = store(repo, "d", image(91, 8))
    kept = store(repo, "d", image(92, 8))  # the newest: `keep_last=1` keeps it alone
    other = target.open()  # another process's view
    ran: list[Any] = []
    hooked = "reload_index" if when == "before the index is read" else "pack_sizes"
    real = getattr(repo, hooked)

    def forget_and_prune_first() -> Any:
        if not ran:
            ran.append(other.forget(RetentionPolicy(keep_last=1), "d"))
            ran.append(other.prune())
        return real()

    monkeypatch.setattr(repo, hooked, forget_and_prune_first)
    report = repo.check(read_data=True)
    monkeypatch.undo()
    assert [p.id for p in ran[0]] == [old.id] and ran[1].packs_deleted >= 1
    assert report.ok, report.problems
    pack = next(iter({loc.pack_id for _, loc in repo.index.items()}))
    repo.backend.delete(layout.pack(pack))  # a pack the kept point needs, gone
    found = repo.check()
    assert not found.ok and found.affected_points == {kept.id}


@pytest.mark.encrypted_s3
def test_prune_keeps_naming_a_copy_a_writer_deduplicated_against(
        repo: Repository, tmp_path: Path, target: RepoTarget) -> None:
    """An object whose first copy is in a condemned pack, stored again in a pack that is not:
    a writer that starts later refers to the second copy, and the sweep that deletes the first
    keeps the second named in the index."""
    chunks = image(21, 4)
    store(repo, "x", chunks)
    for p in repo.points():  # the old pack is unused now
        repo.delete_manifest(p.id)
    early = target.open().begin("d", 4 * CS, None)  # running across the prune: it waits
    for i, data in enumerate(image(22, 4)):
        early.put_chunk(i, data)
    assert repo.prune().packs_condemned == 1
    again = target.open().begin("e", 4 * CS, None)  # sees the pack condemned: stores it again
    for i, data in enumerate(chunks):
        again.put_chunk(i, data)
    stored_again = again.commit(kind="full", change_id=None)
    assert stored_again.stats["new_chunks"] == 4
    repo.delete_manifest(stored_again.id)  # forgotten: only a running writer needs the copy
    late = target.open().begin("f", 4 * CS, None)
    for i, data in enumerate(chunks):
        late.put_chunk(i, data)
    early.commit(kind="full", change_id=None)
    repo.prune()  # the first copies' pack is deleted; the second copies' waits for `late`
    late_point = late.commit(kind="full", change_id=None)
    assert late_point.stats["new_chunks"] == 0  # it deduplicated against the second copies
    assert restored(target.open(), late_point, tmp_path) == b"".join(chunks)
    repo.prune()
    assert repo.check(read_data=True).ok
    assert restored(target.open(), late_point, tmp_path) == b"".join(chunks)


@pytest.mark.parametrize("first", ["copy condemned first", "copy stored again first"])
def test_a_sweep_keeps_every_copy_while_another_run_may_delete_the_one_it_names(
        repo: Repository, tmp_path: Path, target: RepoTarget, first: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two collections wait for their writers. The object's first copy is in a pack the second
    one condemned; a writer stored it again, and a later writer deduplicated against that
    second copy. When the first run's sweep rewrites the index it must keep naming the second
    copy, whichever copy the index files name first (their names decide): the second run then
    deletes the first copy's pack."""
    import secrets

    from blocktrail.repo import prune, sink

    def index_names(prefix: str) -> None:  # index files sort in the order the test wants
        for module in (sink, prune):
            monkeypatch.setattr(module, "new_index_name",
                                lambda: f"{prefix}{secrets.token_hex(15)}.idx")

    def begin(disk_id: str, chunks: list[bytes]) -> Any:
        writer = target.open().begin(disk_id, len(chunks) * CS, None)
        for i, data in enumerate(chunks):
            writer.put_chunk(i, data)
        return writer

    condemned_first, again_first = ("00", "ff") if first == "copy condemned first" \
        else ("ff", "00")
    chunks = image(31, 4)
    index_names(condemned_first)
    a = begin("a", chunks).commit(kind="full", change_id=None)
    index_names("11")
    c = begin("c", image(32, 4)).commit(kind="full", change_id=None)
    repo.delete_manifest(c.id)
    w0 = begin("w0", image(33, 2))
    index_names("22")
    assert repo.prune().packs_condemned == 1  # run 1: c's pack, waits for w0
    repo.delete_manifest(a.id)
    early = begin("early", image(34, 2))
    assert repo.prune().packs_condemned == 1  # run 2: the first copies' pack, waits for early
    index_names(again_first)
    again = begin("again", chunks).commit(kind="full", change_id=None)
    assert again.stats["new_chunks"] == 4  # the first copies are condemned: stored again
    repo.delete_manifest(again.id)  # forgotten: only a running writer will need the copies
    late = begin("late", chunks)  # deduplicates against the second copies
    w0.commit(kind="full", change_id=None)
    index_names("33")
    repo.prune()  # run 1's sweep rewrites the index; run 2 still waits for `early`
    early.commit(kind="full", change_id=None)
    repo.prune()  # run 2's sweep: the first copies' pack is deleted
    late_point = late.commit(kind="full", change_id=None)
    assert late_point.stats["new_chunks"] == 0
    assert repo.check(read_data=True).ok
    assert restored(target.open(), late_point, tmp_path) == b"".join(chunks)
    repo.prune()  # no run waits: one copy each again
    assert len(repo.index_files()) == 1
    assert restored(target.open(), late_point, tmp_path) == b"".join(chunks)


@pytest.mark.encrypted_s3
def test_concurrent_writers_share_the_repository(repo: Repository, tmp_path: Path,
                                                 target: RepoTarget) -> None:
    import threading

    points: list[RestorePoint] = []
    data = {name: image(i + 10, 48) for i, name in enumerate("abc")}

    def backup(name: str) -> None:
        points.append(store(repo, name, data[name]))

    threads = [threading.Thread(target=backup, args=(n,)) for n in "abc"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert repo.check(read_data=True).ok
    fresh = target.open()
    for point in points:
        assert restored(fresh, point, tmp_path) == b"".join(data[point.disk_id])


# corruption -------------------------------------------------------------------------------------

def _two_points(repo: Repository) -> tuple[RestorePoint, RestorePoint, list[bytes]]:
    chunks = image(6, 16)
    full = store(repo, "d", chunks)
    newer = list(chunks)
    newer[9] = os.urandom(CS)
    return full, store(repo, "d", newer, parent=full.id, only={9}), newer


@pytest.mark.encrypted_s3
def test_flipped_byte_in_a_chunk_is_reported_and_restore_refuses(
        repo: Repository, tmp_path: Path, target: RepoTarget) -> None:
    full, inc, _ = _two_points(repo)
    name = repo.chunk_digests(inc.id, [9])[9]
    assert name is not None
    loc = repo.index[name]
    target.flip(layout.pack(loc.pack_id), loc.offset + 100, 0xFF)
    fresh = target.open()
    assert fresh.check().ok  # structure is fine; only reading the data finds it
    report = fresh.check(read_data=True)
    assert [(p.kind, p.name) for p in report.problems] == [("chunk", name.hex())]
    assert report.problems[0].affected_points == (inc.id,)
    target = tmp_path / "out.raw"
    with pytest.raises(ObjectMissing, match=f"{name.hex()}.*damaged and in quarantine"):
        fresh.restore(inc.id, str(target))  # check put the damaged copy in quarantine
    assert not target.exists() and not list(tmp_path.glob("out.raw.partial*"))
    assert restored(fresh, full, tmp_path)  # the other point still restores


@pytest.mark.parametrize("unnamed", [True, False], ids=["unnamed", "named"])
def test_a_restore_names_its_file_only_once_the_image_is_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unnamed: bool) -> None:
    """The image is written to a file with no name (O_TMPFILE), which a killed restore leaves
    nowhere, named beside the target once whole and renamed over it. Where the file system
    cannot make such a file, it is written under ``TARGET.partial-*`` from the start."""
    repo = Repository.init(tmp_path / "repo", encryption=TEST_ENCRYPTION)
    chunks = image(7, 24)
    point = store(repo, "d", chunks)
    out = tmp_path / "out"
    out.mkdir()
    (out / "disk.raw").write_bytes(b"old")
    if not unnamed:
        monkeypatch.setattr(OsFileIO, "create_unnamed", lambda self, directory: None)
    seen: list[set[str]] = []
    repo.restore(point.id, str(out / "disk.raw"),
                 lambda done, total: seen.append(set(os.listdir(out))))
    assert seen and (out / "disk.raw").read_bytes() == b"".join(chunks)
    assert os.listdir(out) == ["disk.raw"]
    if unnamed:  # while it is written, the old target alone has a name
        assert all(names == {"disk.raw"} for names in seen), seen
    else:
        assert all(len(names) == 2 and any(n.startswith("disk.raw.partial-") for n in names)
                   for names in seen), seen


@pytest.mark.parametrize("unnamed", [True, False], ids=["unnamed", "named"])
def test_a_restore_into_a_directory_it_may_write_but_not_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unnamed: bool) -> None:
    """A drop box (mode 1733) cannot be opened to be synced: the restore succeeds all the same,
    as a `cp` there would, instead of failing after the target was replaced. (Root reads any
    directory: the refusal is made.)"""
    repo = Repository.init(tmp_path / "repo", encryption=TEST_ENCRYPTION)
    chunks = image(9, 4)
    point = store(repo, "d", chunks)
    drop = tmp_path / "drop"
    drop.mkdir()
    real_fsync_dir = OsFileIO.fsync_dir

    def fsync_dir(self: OsFileIO, path: str) -> None:
        if Path(path) == drop:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        real_fsync_dir(self, path)

    monkeypatch.setattr(OsFileIO, "fsync_dir", fsync_dir)
    if not unnamed:
        monkeypatch.setattr(OsFileIO, "create_unnamed", lambda self, directory: None)
    assert repo.restore(point.id, str(drop / "disk.raw")) > 0
    assert (drop / "disk.raw").read_bytes() == b"".join(chunks)
    assert os.listdir(drop) == ["disk.raw"]


@pytest.mark.parametrize("unnamed", [True, False], ids=["unnamed", "named"])
def test_a_restore_to_a_name_as_long_as_a_name_may_be(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unnamed: bool) -> None:
    """The name the image has beside its target before the rename is cut to what a file name
    may be there: a target named with 255 bytes restores. The file is its owner's alone."""
    repo = Repository.init(tmp_path / "repo", encryption=TEST_ENCRYPTION)
    chunks = image(8, 4)
    point = store(repo, "d", chunks)
    if not unnamed:
        monkeypatch.setattr(OsFileIO, "create_unnamed", lambda self, directory: None)
    out = tmp_path / "out"
    out.mkdir()
    target = out / ("é" * 100 + "x" * 55)  # 255 bytes
    repo.restore(point.id, str(target))
    assert target.read_bytes() == b"".join(chunks) and os.listdir(out) == [target.name]
    assert target.stat().st_mode & 0o777 == 0o600
    written: list[int] = []
    deep = out / "d"  # a path of 4080 bytes: the target's fits PATH_MAX, its partial's not
    while len(os.fsencode(deep)) < 4080:
        deep /= "d" * min(250, 4080 - len(os.fsencode(deep)) - 1)
    deep.mkdir(parents=True)
    for refused, why in [(out / ("y" * 256), "has 256 bytes, and a file name there has at "
                          "most 255"), (str(out) + "/", "give a file name"),
                         (deep / "img.raw", "path is too long")]:
        with pytest.raises(InvalidArgument, match=why):  # refused before anything is written
            repo.restore(point.id, str(refused), lambda done, total: written.append(done))
    assert not written and sorted(os.listdir(out)) == ["d", target.name]
    assert os.listdir(deep) == []


def test_a_name_cut_short_is_cut_at_a_character(tmp_path: Path) -> None:
    """255 bytes of UTF-8: of its first 238 bytes (255 less the suffix), the cut keeps the x
    and 118 whole é, not the first byte of the 119th."""
    partial = os.path.basename(partial_name(str(tmp_path / ("x" + "é" * 127))))
    assert re.fullmatch(r"xé{118}\.partial-[0-9a-f]{8}", partial), partial


def test_a_restore_through_a_linked_directory_and_up(tmp_path: Path) -> None:
    """``LINK/../FILE``: the image is made, named and renamed where the kernel finds FILE (up
    from where LINK leads), on that file system, and that directory is the one fsynced."""
    other = Path("/dev/shm")
    if not other.is_dir() or other.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second file system at /dev/shm")
    repo = Repository.init(tmp_path / "repo", encryption=TEST_ENCRYPTION)
    chunks = image(9, 4)
    point = store(repo, "d", chunks)
    elsewhere = Path(tempfile.mkdtemp(dir=other))
    try:
        (elsewhere / "sub").mkdir()
        (tmp_path / "link").symlink_to(elsewhere / "sub")
        synced: list[str] = []
        fio = OsFileIO()
        fio.fsync_dir = lambda path: synced.append(os.path.realpath(path))  # type: ignore[method-assign]
        repo.restore(point.id, str(tmp_path / "link" / ".." / "out.raw"), fileio=fio)
        assert (elsewhere / "out.raw").read_bytes() == b"".join(chunks)
        assert sorted(os.listdir(elsewhere)) == ["out.raw", "sub"]
        assert synced == [os.path.realpath(elsewhere)]
    finally:
        shutil.rmtree(elsewhere)


def test_a_file_with_no_name_is_lost_with_the_power_until_it_is_named() -> None:
    fs = SimulatedFileIO()
    fs.makedirs("/d")
    fs.fsync_dir("/")
    lost = fs.create_unnamed("/d")
    kept = fs.create_unnamed("/d")
    assert lost is not None and kept is not None
    kept.pwrite(b"whole", 0)
    kept.fsync()
    fs.link_unnamed(kept, "/d/kept")
    with pytest.raises(FileExistsError):
        fs.link_unnamed(lost, "/d/kept")
    fs.fsync_dir("/d")
    fs.power_loss()
    assert fs.listdir("/d") == ["kept"] and fs.read_file("/d/kept") == b"whole"


def test_truncated_manifest_is_reported(repo: Repository, tmp_path: Path,
                                        target: RepoTarget) -> None:
    full, inc, _ = _two_points(repo)
    name = layout.manifest(inc.id)
    target.write(name, target.read(name)[:100])
    report = target.open().check()
    assert [(p.kind, p.affected_points) for p in report.problems] == [("manifest", (inc.id,))]
    with pytest.raises(ManifestCorrupt):
        target.open().restore(inc.id, str(tmp_path / "x.raw"))
    assert [p.id for p in target.open().points()] == [full.id]


def test_deleted_index_file_is_reported(repo: Repository, tmp_path: Path,
                                        target: RepoTarget) -> None:
    _, inc, _ = _two_points(repo)
    name = repo.chunk_digests(inc.id, [9])[9]
    holder = next(n for n in target.names("index/")
                  if name in target.read_index(n))
    target.delete(holder)  # the incremental's index file: its chunk 9 is nowhere now
    report = target.open().check()
    # that index file also located the incremental's new page table: it is reported missing
    assert {p.kind for p in report.problems} == {"table"}
    assert report.affected_points == {inc.id}
    with pytest.raises(ObjectMissing):
        target.open().restore(inc.id, str(tmp_path / "y.raw"))


def test_damaged_page_is_reported(repo: Repository, tmp_path: Path,
                                  target: RepoTarget) -> None:
    _, inc, _ = _two_points(repo)
    page = bytes.fromhex(repo.pages_of(inc)[0])
    loc = repo.index[page]
    name = layout.pack(loc.pack_id)
    data = bytearray(target.read(name))  # the page's envelope header: its length field
    data[loc.offset + 8 : loc.offset + 10] = b"\xff\xff"
    target.write(name, bytes(data))
    report = target.open().check()
    assert [(p.kind, p.affected_points) for p in report.problems] == [("page", (inc.id,))]


# fault sweeps -----------------------------------------------------------------------------------

class FailNth(OsFileIO):
    """Fails the N-th open, write, fsync, rename or unlink with EIO (or ENOSPC)."""

    def __init__(self, fail_at: int, error: int = errno.EIO) -> None:
        self.fail_at, self.error, self.ops = fail_at, error, 0

    def tick(self) -> None:
        self.ops += 1
        if self.ops == self.fail_at:
            raise OSError(self.error, f"injected failure at operation {self.ops}")

    def open(self, path: str, *, create: bool = False) -> FileHandle:
        self.tick()
        return super().open(path, create=create)

    def open_read(self, path: str) -> FileHandle:
        self.tick()
        return super().open_read(path)

    def replace_atomic(self, path: str, data: bytes) -> None:
        self.tick()
        if self.ops + 1 == self.fail_at:  # the rename fails: a half-written temp file stays
            with open(path + ".tmp", "wb") as f:
                f.write(data[: len(data) // 2])
            self.tick()
        super().replace_atomic(path, data)

    def unlink(self, path: str) -> None:
        self.tick()
        super().unlink(path)

    def fsync_dir(self, path: str) -> None:
        self.tick()
        super().fsync_dir(path)

    def read_file(self, path: str) -> bytes:
        self.tick()
        return super().read_file(path)


def _sweep(tmp_path: Path, prepare: Callable[[Repository], object],
           operation: Callable[[Repository], object],
           verify: Callable[[Repository, Path], None]) -> int:
    golden = tmp_path / "golden"
    with Repository.init(golden, encryption=TEST_ENCRYPTION) as repo:
        prepare(repo)
    n = 1
    while True:
        work = tmp_path / f"run{n}"
        shutil.copytree(golden, work)
        fails = FailNth(n, errno.ENOSPC if n % 3 == 0 else errno.EIO)
        try:
            with Repository.open(work, fails, password=TEST_PASSWORD) as faulty:
                operation(faulty)
        except (OSError, RepositoryError, NoSpace):
            assert fails.ops >= n  # only the failure injected fails it
        with Repository.open(work, password=TEST_PASSWORD) as fresh:
            report = fresh.check(read_data=True)
            assert report.ok, (n, report.problems)
            verify(fresh, work)
        shutil.rmtree(work)
        if fails.ops < n:  # every operation of the run has failed once (also where the
            return n  # failure was expected and passed over, as a lease's removal)
        n += 1


def test_fault_sweep_backup(tmp_path: Path) -> None:
    chunks = image(7, 300, holes=frozenset({5, 6}))
    newer = list(chunks)
    for i in range(0, 300, 7):
        newer[i] = os.urandom(CS)
    points: list[RestorePoint] = []

    def prepare(repo: Repository) -> None:
        points.append(store(repo, "d", chunks))

    def operation(repo: Repository) -> None:
        store(repo, "d", newer, parent=points[0].id, only=set(range(0, 300, 7)))

    def verify(repo: Repository, work: Path) -> None:
        assert restored(repo, repo.point(points[0].id), work) == b"".join(chunks)
        for point in repo.points():
            assert restored(repo, point, work) in (b"".join(chunks), b"".join(newer))

    assert _sweep(tmp_path, prepare, operation, verify) > 5


def test_fault_sweep_prune(tmp_path: Path) -> None:
    base = image(8, 200)
    versions = [base]
    for k in range(3):
        nxt = list(versions[-1])
        for i in range(k, 200, 5):
            nxt[i] = os.urandom(CS)
        versions.append(nxt)
    ids: list[str] = []

    def prepare(repo: Repository) -> None:
        parent = None
        for version in versions:
            parent = store(repo, "d", version, parent).id
            ids.append(parent)
        repo.forget(RetentionPolicy(keep_last=2))

    def verify(repo: Repository, work: Path) -> None:
        for point_id, version in zip(ids[-2:], versions[-2:], strict=True):
            assert restored(repo, repo.point(point_id), work) == b"".join(version)

    assert _sweep(tmp_path, prepare, lambda repo: repo.prune(), verify) > 5


class FailingBackend:
    """A backend whose ``fail_at``-th operation fails as a store that went away would (after
    its retries): `BackendUnavailable`. Every operation after it works again. ``failed``:
    the operation and object name that failed (None: none did; the run asked fewer)."""

    OPERATIONS = ("create", "replace", "load", "info", "list", "delete")

    def __init__(self, inner: Backend, fail_at: int) -> None:
        self.inner, self.fail_at, self.ops = inner, fail_at, 0
        self.failed: tuple[str, str] | None = None
        self.log: list[tuple[str, str]] = []  # (operation, object name) of each, in turn
        self._lock = threading.Lock()  # operations come from several threads

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in self.OPERATIONS:
            return attr

        def operation(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.ops += 1
                self.log.append((name, str(args[0]) if args else ""))
                fail = self.ops == self.fail_at
                if fail:
                    self.failed = (name, str(args[0]) if args else "")
            if fail:
                raise BackendUnavailable(f"injected: {name} {args[:1]} failed")
            return attr(*args, **kwargs)

        return operation


def test_fault_sweep_backup_on_object_storage(s3_server: SeaweedFS, tmp_path: Path) -> None:
    """The store fails at the 1st, 2nd, ... request of an incremental backup, up to its last:
    every run succeeds or raises, and leaves a repository that checks clean and restores every
    point. The lease is gone, unless its own delete was the request that failed: then it
    stays, held by nobody, until it expires."""
    golden = RepoTarget("s3", s3_server.new_url("sweep"), s3_server)
    chunks = image(30, 40)
    newer = list(chunks)
    for i in range(0, 40, 3):
        newer[i] = os.urandom(CS)
    with golden.init() as repo:
        first = store(repo, "d", chunks)
    n = 1
    while True:
        work = golden.copy(f"run{n}")
        backend = open_backend(work.location, s3=work.s3)
        failing = FailingBackend(backend, n)
        try:
            with Repository.on(failing, TEST_TIMING, password=TEST_PASSWORD) as faulty:
                store(faulty, "d", newer, parent=first.id, only=set(range(0, 40, 3)))
        except (BackendError, RepositoryError):
            assert failing.failed is not None  # nothing else fails here
        with work.open() as fresh:
            report = fresh.check(read_data=True)
            assert report.ok, (n, report.problems)
            assert restored(fresh, fresh.point(first.id), tmp_path) == b"".join(chunks)
            for point in fresh.points():
                assert restored(fresh, point, tmp_path) in (b"".join(chunks), b"".join(newer))
            leases = work.names("leases/")
            if failing.failed is not None and failing.failed[0] == "delete" \
                    and failing.failed[1].startswith("leases/"):
                assert leases == [failing.failed[1]], n  # its release failed: it expires
            else:
                assert not leases, (n, failing.failed)  # a failed writer leaves no lease
        if failing.failed is None:  # every request of the run has failed once
            break
        n += 1
    assert n > 10


def test_checkpoints_name_each_pack_but_the_last_and_go_once_published(
        s3_server: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On object storage each pack but the last is followed by a checkpoint index file naming
    it (a backup cut off keeps what it uploaded); the last one is named by the index file that
    publishes them all, at once, and then every checkpoint is deleted."""
    monkeypatch.setattr("blocktrail.repo.sink.PACK_TARGET_BYTES", 3 * CS)  # several packs
    target = RepoTarget("s3", s3_server.new_url("checkpoints"), s3_server)
    target.init().close()
    recording = FailingBackend(open_backend(target.location, s3=target.s3), 0)
    chunks = image(31, 13)
    with Repository.on(recording, TEST_TIMING, password=TEST_PASSWORD) as repo:
        point = store(repo, "d", chunks)
    created = [name for op, name in recording.log if op == "create"]
    packs = [name for name in created if name.startswith("packs/")]
    index_files = [name for name in created if name.startswith("index/")]
    assert len(packs) >= 3
    assert len(index_files) == len(packs)  # a checkpoint for each pack but the last, then one
    deleted = {name for op, name in recording.log if op == "delete"
               and name.startswith("index/")}
    assert deleted == set(index_files[:-1])
    assert target.names("index/") == [index_files[-1]]
    with target.open() as fresh:
        assert fresh.check(read_data=True).ok
        assert restored(fresh, point, tmp_path) == b"".join(chunks)


def test_layered_index_files_keep_spares_only_where_a_waiting_run_may_delete_the_first() -> None:
    from blocktrail.repo.index import layered
    from blocktrail.repo.packs import Location

    a, b, c = (Location(p * 32, 0, 10, 10) for p in "abc")
    x, y, z = b"x" * 32, b"y" * 32, b"z" * 32
    files = layered({x: [a, b, c], y: [b, c], z: [c]}, frozenset({"a" * 32}))
    assert files == [{x: a, y: b, z: c}, {x: b}, {x: c}]
    assert layered({x: [a, b], y: [b, c]}, frozenset()) == [{x: a, y: b}]


def test_a_point_published_and_verified_while_prune_lists_keeps_its_verify_record(
        repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    """prune deletes the verify records of forgotten points: a point published and verified
    between its two listings is not one of them."""
    from blocktrail.repo.prune import _drop_orphan_verify_records

    listed = repo.manifest_files
    published: list[RestorePoint] = []

    def listing_then_a_new_point() -> list[str]:
        names = listed()
        if not published:
            published.append(store(repo, "late", image(41, 2)))
            repo.set_verify_state(published[0].id, "ok")
        return names

    monkeypatch.setattr(repo, "manifest_files", listing_then_a_new_point)
    assert _drop_orphan_verify_records(repo) == 0
    monkeypatch.undo()
    assert repo.point(published[0].id).verify_state == "ok"


def after_forget_looks_at_leases(monkeypatch: pytest.MonkeyPatch,
                                 act: Callable[[], None]) -> list[str]:
    """Run ``act`` once, right after forget's first look at the leases of running backups
    (before it deletes anything). -> one entry per look forget took."""
    from blocktrail.repo import forget

    looked = forget.running_bases
    calls: list[str] = []

    def then_act(store_: Store) -> set[str]:
        bases = looked(store_)
        if not calls:
            act()
        calls.append("looked")
        return bases

    monkeypatch.setattr(forget, "running_bases", then_act)
    return calls


def test_a_point_a_backup_takes_as_its_base_while_it_is_forgotten_is_put_back(
        repo: Repository, target: RepoTarget, monkeypatch: pytest.MonkeyPatch) -> None:
    """forget looks at the leases, then a backup names its base in its lease and finds it
    there, then forget deletes it: forget looks again after deleting, and puts it back (with
    its verify record), so the base of a running incremental is never forgotten."""
    from blocktrail.backup.base import choose_base

    old = store(repo, "d", image(51, 4))
    repo.set_verify_state(old.id, "ok")
    newer = store(repo, "d", image(52, 4))
    cannot = {newer.id: "it cannot carry the incremental"}  # the backup builds on `old`
    backup = target.open()
    lease = backup.disk_lease("d")

    def a_backup_starts() -> None:
        choice = choose_base(backup, "d", cannot)
        assert choice.point is not None and choice.point.id == old.id
        backup.record_base(lease, old.id)
        backup.point(old.id)  # the backup checks that its base is there: it is

    calls = after_forget_looks_at_leases(monkeypatch, a_backup_starts)
    try:
        result = repo.forget_points(RetentionPolicy(keep_last=1), "d")
    finally:
        lease.release()
    assert len(calls) == 2
    assert [p.id for p in result.kept_as_base] == [old.id] and result.forgotten == ()
    again = target.open().point(old.id)
    assert again.verify_state == "ok" and again.tables == old.tables
    assert repo.check(read_data=True).ok


def test_a_restore_keeps_its_point_from_forget_and_prune(
        repo: Repository, target: RepoTarget, tmp_path: Path) -> None:
    """A restore to a file holds a lease naming its point (as an incremental names its base):
    a forget meanwhile that would remove the point keeps it, and a prune deletes nothing it
    reads. Once the restore is done, they remove it."""
    chunks = image(71, 40)
    old = store(repo, "d", chunks)
    store(repo, "d", image(72, 4))  # the newest: `keep_last=1` keeps it alone
    other = target.open()  # another process's view
    meanwhile: list[Any] = []

    def progress(done: int, total: int) -> None:
        if not meanwhile:  # the first chunks are written, the rest still to be read
            meanwhile.append(other.forget_points(RetentionPolicy(keep_last=1), "d"))
            meanwhile.append(other.prune())

    out = tmp_path / "old.raw"
    repo.restore(old.id, str(out), progress)
    assert out.read_bytes() == b"".join(chunks)
    forgot, pruned = meanwhile
    assert [p.id for p in forgot.kept_as_base] == [old.id] and forgot.forgotten == ()
    assert pruned.packs_deleted == 0
    assert not list(repo.backend.list(layout.LEASES))  # released
    assert [p.id for p in other.forget(RetentionPolicy(keep_last=1), "d")] == [old.id]
    assert other.prune().packs_deleted >= 1
    assert repo.check(read_data=True).ok


def test_a_base_put_back_takes_back_the_failed_point_it_builds_on(
        repo: Repository, target: RepoTarget, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backup names a point as its base after forget looked at the leases: the base comes
    back, and so does the failed point of its chain (and the one between), or the next backup
    would take the base's child for a good base. The children go first: no listing meanwhile
    sees a child without its parent."""
    full = store(repo, "d", image(61, 4))
    failed = store(repo, "d", image(62, 4), parent=full.id, only={1})
    repo.set_verify_state(failed.id, "failed")
    between = store(repo, "d", image(63, 4), parent=failed.id, only={2})
    base = store(repo, "d", image(64, 4), parent=between.id, only={3})
    store(repo, "d", image(65, 4))  # the newest, full: the policy keeps it alone
    backup = target.open()
    lease = backup.disk_lease("d")
    deleted: list[str] = []

    def delete(name: str, *args: Any) -> None:
        deleted.append(name)
        real_delete(name, *args)

    real_delete = repo.backend.delete
    after_forget_looks_at_leases(monkeypatch, lambda: backup.record_base(lease, base.id))
    monkeypatch.setattr(repo.backend, "delete", delete)
    try:
        result = repo.forget_points(RetentionPolicy(keep_last=1), "d")
    finally:
        lease.release()
    manifests = [layout.point_id_of(n) for n in deleted if layout.point_id_of(n)]
    assert manifests == [base.id, between.id, failed.id, full.id]  # the newest first
    assert [p.id for p in result.forgotten] == [full.id]
    assert [p.id for p in result.kept_as_base] == [base.id]
    assert {p.id for p in result.kept_for_taint} == {failed.id, between.id}
    assert target.open().point(failed.id).verify_state == "failed"


@pytest.mark.parametrize("size_chunks", [3, 5])
def test_a_parent_of_another_size_is_refused_before_anything_is_written(
        repo: Repository, size_chunks: int) -> None:
    """An incremental inherits the parent's pages for what it does not put: a parent whose
    layout differs would leave holes, so begin refuses it (and releases the lease it took)."""
    parent = store(repo, "d", image(61, 4))
    with pytest.raises(InvalidArgument, match=f"cannot be the parent of a point of disk d, "
                                              f"{size_chunks * CS} bytes"):
        repo.begin("d", size_chunks * CS, parent.id)
    writer = repo.begin("d", 4 * CS, parent.id)  # the lease was released
    writer.put_chunk(0, bytes([1]) * CS)
    point = writer.commit(kind="incremental", change_id=None)
    assert point.parent == parent.id


def test_init_again_after_an_init_cut_short_starts_clean(target: RepoTarget) -> None:
    """An encrypted init cut before its config was written left its key file: an init there
    again (encrypted or not) deletes it, and the repository it makes opens (an unencrypted
    one would otherwise look downgraded; an encrypted one would keep a key file that opens
    with the old password and belongs to no repository)."""
    Repository.init(target.location, s3=target.s3, timing=TEST_TIMING,
                    encryption=TEST_ENCRYPTION).close()
    target.delete(layout.CONFIG)  # what a cut init leaves: the key file alone
    with target.init() as repo:
        own = repo.key_id
    assert target.names(layout.KEYS) == ([layout.key_file(own)] if own is not None else [])
    with target.open() as repo:
        assert repo.check().ok


def test_init_refuses_a_repository_whose_config_is_lost(target: RepoTarget) -> None:
    """Data but no config.json: no new repository (its data would become unreadable, and a
    prune would delete it); nothing is written."""
    with target.init() as repo:
        writer = repo.begin("d", CS, None)
        writer.put_chunk(0, b"\x05" * CS)
        writer.commit(kind="full", change_id=None)
    target.delete(layout.CONFIG)
    before = target.names()
    with pytest.raises(RepositoryExists, match=r"holds a repository's objects \(.*\) but no "
                       r"config\.json: it is not new.*Nothing was written"):
        target.init()
    assert target.names() == before
    target.write(layout.CONFIG, b"{}")
    with pytest.raises(RepositoryExists, match="already holds a repository"):
        target.init()


def test_two_inits_at_once_leave_the_winner_whole(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Init B starts while init A has written its key file but not its config (B sees A's key
    as one a cut init left); A's config wins: A's repository keeps its key and opens, B is
    refused and takes only its own key away."""
    from blocktrail.repo.localdir import LocalBackend
    a_key, b_key, a_done = threading.Event(), threading.Event(), threading.Event()
    real_create = LocalBackend.create

    def create(self: LocalBackend, name: str, data: Any) -> Any:
        me = threading.current_thread().name
        if name == layout.CONFIG:
            (b_key if me == "A" else a_done).wait(30)
        try:
            return real_create(self, name, data)
        finally:
            if name.startswith(layout.KEYS):
                (a_key if me == "A" else b_key).set()
            elif name == layout.CONFIG and me == "A":
                a_done.set()

    monkeypatch.setattr(LocalBackend, "create", create)
    outcome: dict[str, object] = {}

    def init(me: str, password: str) -> None:
        try:
            Repository.init(tmp_path / "repo", encryption=Encryption(password, kdf=TEST_KDF)
                            ).close()
            outcome[me] = "created"
        except RepositoryExists as exc:
            outcome[me] = exc

    a = threading.Thread(target=init, args=("A", "a-password"), name="A")
    a.start()
    assert a_key.wait(30)
    b = threading.Thread(target=init, args=("B", "b-password"), name="B")
    b.start()
    a.join(60)
    b.join(60)
    assert outcome["A"] == "created" and isinstance(outcome["B"], RepositoryExists)
    with Repository.open(tmp_path / "repo", password="a-password") as repo:
        assert repo.check().ok
        assert [k.id for k in repo.key_files()] == [repo.key_id]


def test_an_init_that_cannot_delete_a_stray_key_is_made_all_the_same(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once its config is written the repository exists: a stray key file the store then
    fails to delete stays (a key of no repository), and init does not fail for it."""
    from blocktrail.repo.localdir import LocalBackend
    path = tmp_path / "repo"
    Repository.init(path, encryption=TEST_ENCRYPTION).close()
    (path / layout.CONFIG).unlink()  # what a cut init leaves: its key file
    real_delete = LocalBackend.delete

    def delete(self: LocalBackend, name: str, etag: str | None = None) -> None:
        if name.startswith(layout.KEYS):
            raise BackendUnavailable("the store is gone for a moment")
        real_delete(self, name, etag)

    monkeypatch.setattr(LocalBackend, "delete", delete)
    Repository.init(path, encryption=TEST_ENCRYPTION).close()
    monkeypatch.undo()
    with Repository.open(path, password=TEST_PASSWORD) as repo:
        assert repo.check().ok and len(repo.key_files()) == 2


def test_init_refuses_a_directory_holding_files_of_others(tmp_path: Path) -> None:
    """A mistyped path (a home, a directory of VM images): nothing is added to it. A new file
    system's lost+found is no obstacle, nor is what an init cut short left (other tests)."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "vm1.raw").write_bytes(b"an image")
    (home / ".profile").write_text("")
    with pytest.raises(InvalidArgument, match=r"is not empty \(\.profile, vm1\.raw\).*nothing "
                                              "was written"):
        Repository.init(home, encryption=TEST_ENCRYPTION)
    assert sorted(p.name for p in home.iterdir()) == [".profile", "vm1.raw"]
    mounted = tmp_path / "mnt"
    (mounted / "lost+found").mkdir(parents=True)
    Repository.init(mounted, encryption=TEST_ENCRYPTION).close()
    with Repository.open(mounted, password=TEST_PASSWORD) as repo:
        assert repo.check().ok


def test_a_file_where_the_repository_directory_must_be_is_refused_clearly(
        tmp_path: Path) -> None:
    """A mistyped path names a file (a VM image), or a path through one: init refuses it
    before writing anything, and opening says that it is no repository and why, instead of an
    I/O error about a config.json below a file."""
    image = tmp_path / "vm1.raw"
    image.write_bytes(b"an image")
    for path in (image, image / "repo"):
        with pytest.raises(InvalidArgument, match=rf"^{image} is a file: .*nothing was written"):
            Repository.init(path, encryption=TEST_ENCRYPTION)
        with pytest.raises(RepositoryNotFound, match=rf"^{path} is not a blocktrail "
                                                     rf"repository \({image} is a file\)"):
            Repository.open(path, password=TEST_PASSWORD)
    assert [p.name for p in tmp_path.iterdir()] == ["vm1.raw"]
    assert image.read_bytes() == b"an image"


def test_a_forgotten_point_leaves_no_directory_of_its_verify_records(tmp_path: Path) -> None:
    """verify/POINT/ goes with the point's last record: forgotten points leave no empty
    directories behind, which every listing of the verify records would walk."""
    repo = Repository.init(tmp_path / "repo", encryption=TEST_ENCRYPTION)
    chunks = image(6, 4)
    old = store(repo, "d", chunks)
    new = store(repo, "d", chunks)
    for point in (old, new):
        repo.record_verify(point.id, "ok")
        repo.record_verify(point.id, "ok")  # two records: the directory stays until both go
    assert sorted(p.name for p in (tmp_path / "repo" / "verify").iterdir()) == \
        sorted([old.id, new.id])
    assert [p.id for p in repo.forget(RetentionPolicy(keep_last=1))] == [old.id]
    assert [p.name for p in (tmp_path / "repo" / "verify").iterdir()] == [new.id]
    assert repo.point(new.id).verify_state == "ok"
    repo.prune()
    assert repo.check(read_data=True).ok


def test_prune_and_repair_of_a_local_directory_wait_for_a_writer_of_another_machine(
        tmp_path: Path) -> None:
    """A directory shared by two machines through a file system whose locks do not reach from
    one to the other (SMB, sshfs): the other machine's backup holds no lock this one sees, only
    its lease. Prune does not take the quick path of a directory with no writer (which would
    delete, at once, a dead pack the writer deduplicated against), and repair refuses."""
    root = tmp_path / "repo"
    repo = Repository.init(root, encryption=TEST_ENCRYPTION)
    chunks = image(22, 4)
    old = store(repo, "x", chunks)
    repo.delete_manifest(old.id)  # its pack is dead now
    elsewhere = Repository.open(root, password=TEST_PASSWORD)
    elsewhere.backend.host_locks = False  # type: ignore[misc]  # the other machine's view
    writer = elsewhere.begin("d", 4 * CS, None)  # it read the index: it may use that pack
    for i, data in enumerate(chunks):
        writer.put_chunk(i, data)
    report = repo.prune()
    assert report.packs_condemned == 1 and report.packs_deleted == 0
    assert report.packs_waiting == 1 and len(report.waiting_for) == 1
    with pytest.raises(RepositoryBusy):
        repo.repair()
    point = writer.commit(kind="full", change_id=None)
    assert point.stats["new_chunks"] == 0  # it deduplicated against the dead pack
    report = repo.prune()  # the writer is gone: the pack is needed now, and kept
    assert report.packs_deleted == 0 and report.packs_waiting == 0
    assert restored(Repository.open(root, password=TEST_PASSWORD), point, tmp_path) == \
        b"".join(chunks)
    assert repo.check(read_data=True).ok


def test_a_damaged_lease_in_a_local_directory_counts_as_a_writer_until_it_runs_out(
        tmp_path: Path) -> None:
    """A lease file that does not decode (cut short, edited) may be a writer's of another
    machine: prune takes its two-phase path and repair refuses, until it runs out."""
    root = tmp_path / "repo"
    repo = Repository.init(root, encryption=TEST_ENCRYPTION)
    old = store(repo, "x", image(23, 2))
    repo.delete_manifest(old.id)  # its pack is dead now
    (root / "leases" / "disk-0123456789abcdef0123456789abcdef.json").write_bytes(b"{\"own")
    report = repo.prune()
    assert report.packs_condemned == 1 and report.packs_deleted == 0
    assert report.packs_waiting == 1
    with pytest.raises(RepositoryBusy):
        repo.repair()
    aged = time.time() - 2 * Timing().lease_s - 600  # a damaged lease lasts the default
    os.utime(root / "leases" / "disk-0123456789abcdef0123456789abcdef.json", (aged, aged))
    assert repo.prune().packs_deleted == 1


@pytest.mark.parametrize("remote", [False, True])
def test_small_files_are_read_in_order_a_slice_a_task_locally(
        repo: Repository, remote: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """`read_all`: results in the order of the items, on the I/O threads; in a local directory
    each task reads a slice of them in turn, on object storage each one its own."""
    from blocktrail.repo.store import LOCAL_READ_SLICE
    monkeypatch.setattr(repo.backend, "remote", remote)
    threads: dict[int, set[str]] = {}

    def read(item: int) -> int:
        threads.setdefault(item // LOCAL_READ_SLICE, set()).add(threading.current_thread().name)
        return item * 3

    items = list(range(3 * LOCAL_READ_SLICE + 5))
    assert repo.read_all(read, items) == [i * 3 for i in items]
    assert repo.read_all(read, []) == []
    assert all(name.startswith("blocktrail-io") for names in threads.values() for name in names)
    if not remote:
        assert all(len(names) == 1 for names in threads.values())
