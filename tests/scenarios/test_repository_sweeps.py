"""Sweeps of whole classes of failure, not samples:

- one flipped byte in every kind of stored object (chunk, page, page table, index file, manifest,
  pack trailer), at several places in each: `check --read-data` finds every one and names it and
  exactly the restore points it affects; those refuse to restore, the others restore exactly;
  the next backup stores again what the disk still has (on a local directory and on S3);
- a full file system at every repository write and fsync of a backup and of a prune (the SQLite
  loop: fail at operation 1, 2, ... until the operation gets through): each run succeeds or
  raises NoSpace, and leaves a repository that checks clean, with no temporary files, that the
  next backup and restore use correctly.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from blocktrail.backup.engine import BackupOptions, run_backup
from blocktrail.backup.sources.local import LocalDiskSource
from blocktrail.disk import Disk
from blocktrail.errors import NoSpace
from blocktrail.repo import Repository, RestorePoint, RetentionPolicy, layout
from blocktrail.repo.errors import RepositoryError
from blocktrail.repo.packs import TRAILER_ENTRY
from repodamage import CS, Golden, NoSpaceAt, make_golden
from s3server import TEST_ENCRYPTION, TEST_PASSWORD, RepoTarget, SeaweedFS


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Golden:
    """Three points; the disk keeps P3's content and is shared by every case (a copied disk is
    a changed disk): each case backs it up into its own copy of the repository."""
    return make_golden(tmp_path_factory.mktemp("sweep") / "g")


@pytest.fixture(scope="module")
def golden_anywhere(request: pytest.FixtureRequest,
                    tmp_path_factory: pytest.TempPathFactory) -> Golden:
    """The same, on a local directory (unencrypted or encrypted) or on S3."""
    root = tmp_path_factory.mktemp("sweep-anywhere") / "g"
    if request.param == "local":
        return make_golden(root)
    if request.param == "local-encrypted":
        return make_golden(root, target=RepoTarget("local", str(root / "repo"), encrypted=True))
    server: SeaweedFS = request.getfixturevalue("s3_server")
    return make_golden(root, target=RepoTarget("s3", server.new_url("sweep"), server))


def next_backup(golden: Golden, repo_dir: Path | RepoTarget) -> RestorePoint:
    where = repo_dir if isinstance(repo_dir, RepoTarget) else RepoTarget("local", str(repo_dir))
    with Disk.open(golden.root / "disk") as disk, where.open() as repo:
        return run_backup(LocalDiskSource(disk), repo, BackupOptions(seed=1)).point


def restore_bytes(repo: Repository, point_id: str, tmp: Path) -> bytes:
    target = tmp / "restore.raw"
    repo.restore(point_id, str(target))
    data = target.read_bytes()
    target.unlink()
    return data


# one flipped byte in every kind of object ---------------------------------------------------------

ENVELOPE_PLACES = {"magic": 0, "kind": 5, "codec": 6, "zero": 7, "plain length": 8,
                   "stored length": 12, "name": 20, "payload": 48, "last byte": -1}


@dataclass(frozen=True)
class Target:
    """What to damage: (file, offsets), the name check reports, the points it affects, the
    points still unrestorable after the next backup (whose content the disk no longer has)."""

    name: str  # the object
    offsets: list[int]
    reported: str  # the name check reports
    affected: set[str]
    after_next_backup: set[str]


def _envelope(repo_at: RepoTarget, name: bytes, place: str) -> tuple[str, int]:
    with repo_at.open() as repo:
        loc = repo.index[name]
    offset = ENVELOPE_PLACES[place]
    return layout.pack(loc.pack_id), loc.offset + (offset if offset >= 0 else
                                                   loc.length + offset)


def _index_naming(repo_at: RepoTarget, name: bytes) -> str:
    return next(n for n in repo_at.names("index/") if name in repo_at.read_index(n))


def _target(golden: Golden, repo_at: RepoTarget, case: str, place: str) -> Target:
    p1, p2, p3 = golden.ids
    with repo_at.open() as repo:
        point = {pid: repo.point(pid) for pid in golden.ids}
        chunk7 = repo.chunk_digests(p3, [7])[7]
        chunk0 = repo.chunk_digests(p3, [0])[0]
        page = {pid: bytes.fromhex(repo.pages_of(point[pid])[0]) for pid in golden.ids}
        table2 = bytes.fromhex(point[p2].tables[0])
        pack1 = repo.index[page[p1]].pack_id
    assert chunk7 is not None and chunk0 is not None
    if case in ("chunk of P3 only", "chunk of every point", "page of P3", "page of P1",
                "table of P2"):
        name, affected, after = {
            "chunk of P3 only": (chunk7, {p3}, set()),
            "chunk of every point": (chunk0, {p1, p2, p3}, set()),
            "page of P3": (page[p3], {p3}, set()),  # the disk still has P3's content
            "page of P1": (page[p1], {p1}, {p1}),
            "table of P2": (table2, {p2}, {p2}),
        }[case]
        obj, offset = _envelope(repo_at, name, place)
        return Target(obj, [offset], name.hex(), affected, after)
    if case == "index file of P2":
        obj = _index_naming(repo_at, table2)
        offset = {"magic": 0, "zero": 12, "entry": 40, "last byte": -1}[place]
        return Target(obj, [offset % len(repo_at.read(obj))], obj, {p2, p3}, {p2})
    if case == "manifest of P2":
        obj = layout.manifest(p2)
        text = repo_at.read(obj)
        size = len(text)
        checksum = size - 3 if repo_at.encrypted else text.index(b'"checksum"') + 20  # the tag
        offset = {"start": 0, "a third": size // 3, "two thirds": 2 * size // 3,
                  "checksum": checksum}[place]
        return Target(obj, [offset], f"points/{p2}.json", {p2}, {p2})
    obj = layout.pack(pack1)
    data = repo_at.read(obj)
    size = len(data)
    entries = repo_at.trailer_start(data)  # an encrypted pack's MAC follows the entries
    offset = {"count": size - 8, "magic": size - 1, "digest": entries + 3,
              "offset": entries + TRAILER_ENTRY.size + 32, "length": entries + 40,
              "zero": entries + 44}[place]
    return Target(obj, [offset], pack1, set(), set())


CASES = [(case, place) for case in ("chunk of P3 only", "chunk of every point")
         for place in ENVELOPE_PLACES] + \
    [(case, place) for case in ("page of P3", "page of P1", "table of P2")
     for place in ("magic", "kind", "zero", "stored length", "payload", "last byte")] + \
    [("index file of P2", place) for place in ("magic", "zero", "entry", "last byte")] + \
    [("manifest of P2", place) for place in ("start", "a third", "two thirds", "checksum")] + \
    [("pack trailer of P1", place)
     for place in ("count", "magic", "digest", "offset", "length", "zero")]


# every case on a local directory; on S3 two places of each kind of object (CI time)
RUNS = [("local", c, p) for c, p in CASES] + \
    [("s3", c, p) for c, p in CASES if p in ("magic", "payload", "start", "checksum", "entry",
                                              "count", "offset")]
# encrypted, on a local directory: every place of a chunk's envelope, two of every other kind
RUNS += [("local-encrypted", c, p) for c, p in CASES
         if c == "chunk of P3 only" or p in ("magic", "payload", "start", "checksum", "entry",
                                             "count", "offset")]


@pytest.mark.parametrize("golden_anywhere, case, place", RUNS, indirect=["golden_anywhere"],
                         ids=[f"{b}-{c}-{p}" for b, c, p in RUNS])
def test_one_flipped_byte_anywhere_is_found_named_and_contained(
        golden_anywhere: Golden, tmp_path: Path, case: str, place: str) -> None:
    golden = golden_anywhere
    repo_at = golden.repo.copy(f"{tmp_path.name[-24:]}")
    target = _target(golden, repo_at, case, place)
    for offset in target.offsets:
        repo_at.flip(target.name, offset)
    with repo_at.open() as repo:
        report = repo.check(read_data=True)
        assert not report.ok, f"{case} at {place}: not found"
        named = [p for p in report.problems if p.name == target.reported]
        assert named, [(p.kind, p.name) for p in report.problems]
        if target.affected:
            assert set(named[0].affected_points) == target.affected
        assert report.affected_points == target.affected
        for point_id in golden.ids:
            if point_id in target.affected:
                with pytest.raises(RepositoryError):
                    repo.restore(point_id, str(tmp_path / "refused.raw"))
                assert not (tmp_path / "refused.raw").exists()
            else:
                assert restore_bytes(repo, point_id, tmp_path) == golden.contents[point_id]
    new = next_backup(golden, repo_at)
    with repo_at.open() as repo:
        assert restore_bytes(repo, new.id, tmp_path) == golden.contents[golden.ids[2]]
        after = repo.check(read_data=True)
        assert after.affected_points == target.after_next_backup, after.problems


# a full file system at every write ---------------------------------------------------------------

def _sweep(make: Callable[[Path], Path], operation: Callable[[Path, NoSpaceAt], object],
           afterwards: Callable[[Path], None], tmp_path: Path) -> int:
    """Run ``operation`` on a fresh copy with ENOSPC at its 1st, 2nd, ... write, up to its
    last; after each run check the copy. -> how many runs it took."""
    n = 1
    while True:
        repo_dir = make(tmp_path / f"run{n}")
        before_packs = set(repo_dir.rglob("*.pack"))
        before_index = set((repo_dir / "index").iterdir())
        fs = NoSpaceAt(n)
        try:
            operation(repo_dir, fs)
        except NoSpace as exc:
            assert "\n" not in exc.message and "free space" in exc.message
        with Repository.open(repo_dir, password=TEST_PASSWORD) as repo:
            report = repo.check(read_data=True)
            assert report.ok, (n, report.problems)
            assert repo.temp_files() == [], n
        if set(repo_dir.rglob("*.pack")) - before_packs:  # a pack no index names is deleted
            assert set((repo_dir / "index").iterdir()) - before_index, n
        afterwards(repo_dir)
        shutil.rmtree(repo_dir.parent)
        if fs.ops < n:  # every write of the run has failed once, also one passed over
            return n
        n += 1


def test_no_space_at_every_write_of_a_backup(golden: Golden, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("blocktrail.repo.sink.PACK_TARGET_BYTES", 3 * CS)  # several packs
    p1, _, p3 = golden.ids
    base = tmp_path / "base"
    shutil.copytree(golden.root / "repo", base / "repo")
    with Repository.open(base / "repo",
                         password=TEST_PASSWORD) as repo:  # keep P1 only: the backup stores more
        for point_id in golden.ids[1:]:
            (base / "repo" / "points" / f"{point_id}.json").unlink()
        repo.prune()

    def make(dest: Path) -> Path:
        shutil.copytree(base / "repo", dest / "repo")
        return dest / "repo"

    def operation(repo_dir: Path, fs: NoSpaceAt) -> None:
        with Disk.open(golden.root / "disk") as disk, \
                Repository.open(repo_dir, fs, password=TEST_PASSWORD) as repo:
            report = run_backup(LocalDiskSource(disk), repo, BackupOptions(seed=1))
        assert report.kind == "incremental" and report.point.parent == p1

    def afterwards(repo_dir: Path) -> None:
        with Repository.open(repo_dir, password=TEST_PASSWORD) as repo:
            assert restore_bytes(repo, p1, tmp_path) == golden.contents[p1]
            for point in repo.points():
                assert restore_bytes(repo, point.id, tmp_path) in (golden.contents[p1],
                                                                   golden.contents[p3])
        point = next_backup(golden, repo_dir)
        with Repository.open(repo_dir, password=TEST_PASSWORD) as repo:
            assert restore_bytes(repo, point.id, tmp_path) == golden.contents[p3]

    assert _sweep(make, operation, afterwards, tmp_path) > 12


def test_no_space_at_every_write_of_a_prune(tmp_path: Path) -> None:
    rng = random.Random(3)
    base = tmp_path / "base" / "repo"
    images = [[rng.randbytes(CS) for _ in range(6)] for _ in range(4)]
    with Repository.init(base, encryption=TEST_ENCRYPTION) as repo:
        ids = []
        for chunks in images:
            writer = repo.begin("d", 6 * CS, None)
            for i, data in enumerate(chunks):
                writer.put_chunk(i, data)
            ids.append(writer.commit(kind="full", change_id=None).id)
        repo.forget(RetentionPolicy(keep_last=2))

    def make(dest: Path) -> Path:
        shutil.copytree(base, dest / "repo")
        return dest / "repo"

    def operation(repo_dir: Path, fs: NoSpaceAt) -> None:
        with Repository.open(repo_dir, fs, password=TEST_PASSWORD) as repo:
            assert repo.prune().packs_deleted == 2

    def afterwards(repo_dir: Path) -> None:
        with Repository.open(repo_dir, password=TEST_PASSWORD) as repo:
            for point_id, chunks in zip(ids[2:], images[2:], strict=True):
                assert restore_bytes(repo, point_id, tmp_path) == b"".join(chunks)
            writer = repo.begin("d", 6 * CS, None)
            for i, data in enumerate(images[0]):  # content a deleted pack held
                writer.put_chunk(i, data)
            point = writer.commit(kind="full", change_id=None)
            assert restore_bytes(repo, point.id, tmp_path) == b"".join(images[0])

    assert _sweep(make, operation, afterwards, tmp_path) > 4
