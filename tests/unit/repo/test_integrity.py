"""Damaged copies go to quarantine and are never used again; a spare copy is used instead; the
chunk index ignores deleted packs; prune frees space before it writes; a failed backup leaves
nothing behind but what an index file names. On both backends, except where a test is about
local files (a full file system, temporary files)."""

from __future__ import annotations

import errno
import json
import os
import random
from pathlib import Path

import pytest

from blocktrail.errors import NoSpace
from blocktrail.fileio import OsFileIO
from blocktrail.repo import Repository, RestorePoint, RetentionPolicy, layout
from blocktrail.repo import index as index_file
from blocktrail.repo import quarantine as q
from blocktrail.repo.backend import ObjectNotFound as BackendNotFound
from blocktrail.repo.errors import ObjectMissing, RepositoryError, RepositoryNoSpace
from repodamage import repo_files
from s3server import TEST_ENCRYPTION, TEST_PASSWORD, RepoTarget

CS = 64 * 1024


def image(seed: int, chunks: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(CS) for _ in range(chunks)]


def store(repo: Repository, disk_id: str, chunks: list[bytes]) -> RestorePoint:
    writer = repo.begin(disk_id, len(chunks) * CS, None)
    for i, data in enumerate(chunks):
        writer.put_chunk(i, data)
    return writer.commit(kind="full", change_id=None)


def restored(repo: Repository, point: RestorePoint, tmp: Path) -> bytes:
    target = tmp / "r.raw"
    repo.restore(point.id, str(target))
    return target.read_bytes()


@pytest.fixture
def repo(target: RepoTarget) -> Repository:
    return target.init()


def pack_of(loc: object) -> str:
    return layout.pack(loc.pack_id)  # type: ignore[attr-defined]


def index_naming(target: RepoTarget, name: bytes) -> str:
    for object_name in target.names("index/"):
        if name in target.read_index(object_name):
            return object_name
    raise LookupError(f"no index file names {name.hex()}")


@pytest.fixture
def local_repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo", encryption=TEST_ENCRYPTION)


@pytest.mark.encrypted_s3
def test_a_spare_copy_is_used_when_one_is_damaged(repo: Repository, tmp_path: Path,
                                                  target: RepoTarget) -> None:
    chunks = image(1, 4)  # two processes that cannot see each other's chunks yet:
    first = repo.begin("a", 4 * CS, None)  # the same content is stored twice
    second = target.open().begin("b", 4 * CS, None)
    for writer in (first, second):
        for i, data in enumerate(chunks):
            writer.put_chunk(i, data)
    a = first.commit(kind="full", change_id=None)
    b = second.commit(kind="full", change_id=None)
    fresh = target.open()
    name = fresh.chunk_digests(a.id, [2])[2]
    assert name is not None
    loc = fresh.index[name]
    target.flip(pack_of(loc), loc.offset + 48 + 7)
    assert restored(fresh, b, tmp_path) == b"".join(chunks)  # read the other copy
    records = target.names("quarantine/")
    assert records == [layout.quarantine_record(q.record_name((name, loc.pack_id, loc.offset)))]
    record = json.loads(target.read(records[0]))
    assert record["digest"] == name.hex() and record["kind"] == "chunk"
    reopened = target.open()
    assert reopened.index[name] != loc  # the damaged copy is never used again
    report = reopened.check(read_data=True)
    assert report.ok and report.quarantined_before == 1



def _two_copies(target: RepoTarget, seed: int,
                count: int) -> tuple[list[bytes], list[RestorePoint]]:
    """Two disks of the same ``count`` chunks, each backed up by a writer that did not see the
    other's: every chunk has two copies. -> (the chunks, the two points)."""
    chunks = image(seed, count)
    writers = [target.open().begin(d, count * CS, None) for d in "ab"]
    for writer in writers:
        for i, data in enumerate(chunks):
            writer.put_chunk(i, data)
    return chunks, [w.commit(kind="full", change_id=None) for w in writers]

def test_check_reports_a_damaged_copy_with_a_spare_as_harmless(repo: Repository,
                                                               target: RepoTarget) -> None:
    _, points = _two_copies(target, 2, 3)
    name = repo.chunk_digests(points[0].id, [0])[0]
    assert name is not None
    loc = repo.index[name]
    target.flip(pack_of(loc), loc.offset + 60)
    report = target.open().check(read_data=True)
    assert [(p.kind, p.name, p.affected_points) for p in report.problems] == [
        ("chunk", name.hex(), ())]
    assert "intact copy is used" in report.problems[0].detail
    assert target.open().check(read_data=True).ok  # set aside for good


def test_prune_names_an_intact_copy_when_the_one_named_first_is_damaged(
        repo: Repository, target: RepoTarget, tmp_path: Path) -> None:
    """Two copies of the same chunks (two writers that could not see each other's); the copy
    named first is damaged and nobody has read it yet. Prune names one copy of each object
    from then on: it reads the one it keeps, finds it damaged, puts it in quarantine and keeps
    the intact one; the prunes after it delete nothing a point needs."""
    chunks, points = _two_copies(target, 13, 3)
    name = repo.chunk_digests(points[0].id, [1])[1]
    assert name is not None
    loc = target.open().index[name]
    target.flip(pack_of(loc), loc.offset + 60)
    report = target.open().prune()
    assert len(report.damaged_copies) == 1 and name.hex() in report.damaged_copies[0]
    assert target.names("quarantine/") == [
        layout.quarantine_record(q.record_name((name, loc.pack_id, loc.offset)))]
    target.open().prune()
    target.open().prune()
    for point in points:
        assert restored(target.open(), point, tmp_path) == b"".join(chunks)
    assert target.open().check(read_data=True).ok


def test_prune_keeps_every_copy_when_none_reads_intact(repo: Repository,
                                                       target: RepoTarget) -> None:
    _, points = _two_copies(target, 14, 2)
    name = repo.chunk_digests(points[0].id, [0])[0]
    assert name is not None
    copies = target.open().index.copies(name)
    assert len(copies) == 2
    for copy in copies:
        target.flip(pack_of(copy), copy.offset + 60)
    assert len(target.open().prune().damaged_copies) == 2
    named = [loc for n in target.names("index/") for k, loc in target.read_index(n).items()
             if k == name]
    assert sorted(named) == sorted(copies)


def test_a_record_is_its_name(repo: Repository, tmp_path: Path, target: RepoTarget) -> None:
    point = store(repo, "d", image(3, 2))
    name = repo.chunk_digests(point.id, [1])[1]
    assert name is not None
    loc = repo.index[name]
    record = q.record_name((name, loc.pack_id, loc.offset))
    target.write(layout.quarantine_record(record), b"not even json")  # still quarantines
    fresh = target.open()
    assert not fresh.has_chunk(name) and name in fresh.lost_objects()
    with pytest.raises(ObjectMissing, match="damaged and in quarantine"):
        fresh.restore(point.id, str(tmp_path / "x.raw"))
    assert q.parse_record_name(record) == (name, loc.pack_id, loc.offset)
    for bad in ("x.json", f"{name.hex()}-{loc.pack_id}-01.json", record + ".tmp"):
        assert q.parse_record_name(bad) is None


@pytest.mark.parametrize("where", ["envelope zero byte", "trailer zero field"])
def test_reserved_bytes_must_be_zero(repo: Repository, target: RepoTarget, where: str) -> None:
    point = store(repo, "d", image(4, 2))
    name = repo.chunk_digests(point.id, [0])[0]
    assert name is not None
    loc = repo.index[name]
    pack = pack_of(loc)
    if where == "envelope zero byte":
        target.flip(pack, loc.offset + 7)
        expected = {("chunk", name.hex())}
    else:
        target.flip(pack, len(target.read(pack)) - 8 - 4)  # the last trailer entry's zero field
        expected = {("pack", loc.pack_id)}
    report = target.open().check(read_data=True)
    assert {(p.kind, p.name) for p in report.problems} == expected


def test_the_index_ignores_entries_of_deleted_packs(repo: Repository, tmp_path: Path,
                                                   target: RepoTarget) -> None:
    old, new = image(5, 3), image(6, 3)
    a = store(repo, "a", old)
    b = store(repo, "b", new)
    name = repo.chunk_digests(a.id, [0])[0]
    assert name is not None
    target.delete(pack_of(repo.index[name]))  # as a prune killed midway
    fresh = target.open()
    assert not fresh.has_chunk(name)
    report = fresh.check()
    assert [(p.kind, p.affected_points) for p in report.problems] == [("table", (a.id,))]
    assert "is missing" in report.problems[0].detail
    assert restored(fresh, b, tmp_path) == b"".join(new)
    again = store(fresh, "a", old)  # nothing deduplicates against the deleted pack
    assert again.stats["new_chunks"] == 3
    assert restored(target.open(), again, tmp_path) == b"".join(old)


@pytest.mark.encrypted_s3
def test_a_damaged_index_file_is_skipped_and_prune_refuses(repo: Repository, tmp_path: Path,
                                                           target: RepoTarget) -> None:
    a = store(repo, "a", image(7, 2))
    b = store(repo, "b", image(8, 2))
    name = repo.chunk_digests(a.id, [0])[0]
    assert name is not None
    target.flip(index_naming(target, name), 30)
    fresh = target.open()
    assert restored(fresh, b, tmp_path)  # the other index file still loads
    report = fresh.check()
    index_problems = [p for p in report.problems if p.kind == "index"]
    assert len(index_problems) == 1 and index_problems[0].affected_points == (a.id,)
    with pytest.raises(RepositoryError, match="repo repair"):
        fresh.prune()
    assert fresh.repair().ok
    assert target.open().check(read_data=True).ok


@pytest.mark.parametrize("entry", [{"offset": 1 << 63}, {"offset": (1 << 64) - 1},
                                   {"length": 0}, {"length": 47}],
                         ids=["offset-2^63", "offset-2^64-1", "length-0", "length-47"])
def test_an_index_entry_no_pack_can_hold_makes_its_file_damaged(
        repo: Repository, tmp_path: Path, target: RepoTarget, entry: dict[str, int]) -> None:
    """An index file (read first) naming an object at an offset past any pack, or shorter than
    an envelope header: the whole file counts as damaged, as for a bad checksum; restore
    reads the object through the other index file, check reports the file, prune refuses,
    repair rebuilds the index."""
    point = store(repo, "a", image(15, 2))
    name = repo.chunk_digests(point.id, [0])[0]
    assert name is not None
    repo.write_index("0000.idx", index_file.encode({name: repo.index[name]._replace(**entry)}))
    fresh = target.open()
    assert restored(fresh, point, tmp_path) == b"".join(image(15, 2))
    report = fresh.check(read_data=True)
    assert [(p.kind, p.name) for p in report.problems] == [("index", "index/0000.idx")]
    assert "no pack can hold" in report.problems[0].detail
    with pytest.raises(RepositoryError, match="repo repair"):
        fresh.prune()
    assert fresh.repair().ok
    assert target.open().check(read_data=True).ok


def test_repair_reports_a_pack_that_goes_while_it_runs(local_repo: Repository,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    point = store(local_repo, "a", image(16, 2))
    gone = sorted(local_repo.pack_ids())[0]
    read_pack = local_repo.read_pack

    def vanishing(pack_id: str) -> bytes:
        if pack_id == gone:
            raise BackendNotFound(f"no object {layout.pack(pack_id)}")
        return read_pack(pack_id)

    monkeypatch.setattr(local_repo, "read_pack", vanishing)
    report = local_repo.repair()
    assert report.packs_gone == (gone,) and report.to_json()["packs_gone"] == [gone]
    assert [u.point_id for u in report.unrestorable] == [point.id]


class FailIndexWrites(OsFileIO):
    """ENOSPC for index files (a file system too full for one more file); records unlinks."""

    def __init__(self) -> None:
        self.unlinked: list[str] = []

    def replace_atomic(self, path: str, data: bytes | bytearray) -> None:
        if path.endswith(".idx"):
            raise OSError(errno.ENOSPC, "No space left on device")
        super().replace_atomic(path, data)

    def unlink(self, path: str) -> None:
        self.unlinked.append(path)
        super().unlink(path)


def test_prune_frees_space_before_it_writes(local_repo: Repository, tmp_path: Path) -> None:
    repo = local_repo
    old = store(repo, "d", image(9, 8))
    kept = store(repo, "d", image(10, 8))
    repo.forget(RetentionPolicy(keep_last=1))
    (tmp_path / "repo" / "packs" / "ab").mkdir(exist_ok=True)
    (tmp_path / "repo" / "packs" / "ab" / "ab01.pack.tmp").write_bytes(b"half a pack")
    fio = FailIndexWrites()
    with pytest.raises(RepositoryNoSpace, match="unused packs deleted first freed"):
        Repository.open(tmp_path / "repo", fio, password=TEST_PASSWORD).prune()
    assert any(p.endswith(".pack") for p in fio.unlinked)  # the dead pack went first
    fresh = Repository.open(tmp_path / "repo", password=TEST_PASSWORD)
    assert fresh.check(read_data=True).ok
    assert restored(fresh, kept, tmp_path) == b"".join(image(10, 8))
    report = fresh.prune()  # space is there now
    assert report.temp_files_deleted == 1 and report.index_files_replaced == 2
    assert not any("tmp" in f for f in repo_files(tmp_path / "repo"))
    assert old.id not in {p.id for p in fresh.points()}


def test_prune_deletes_the_records_of_the_packs_it_deletes(repo: Repository,
                                                           target: RepoTarget) -> None:
    old = store(repo, "d", image(11, 2))
    store(repo, "d", image(12, 2))
    name = repo.chunk_digests(old.id, [0])[0]
    assert name is not None
    loc = repo.index[name]
    target.flip(pack_of(loc), loc.offset + 100)
    assert not repo.check(read_data=True).ok
    assert len(target.names("quarantine/")) == 1
    repo.forget(RetentionPolicy(keep_last=1))
    assert repo.prune().quarantine_records_deleted == 1
    assert target.names("quarantine/") == []
    assert repo.check(read_data=True).ok


def test_a_failed_backup_leaves_no_pack_behind(local_repo: Repository, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """On a local directory (on object storage the packs stay, for a resumed backup: see
    test_a_cut_off_backup_resumes_without_uploading_again)."""
    repo = local_repo
    monkeypatch.setattr("blocktrail.repo.sink.PACK_TARGET_BYTES", 4 * CS)
    before = repo_files(tmp_path / "repo")
    writer = repo.begin("d", 40 * CS, None)
    for i, data in enumerate(image(13, 30)):
        writer.put_chunk(i, data)
    writer.close()  # the source failed: given up before the commit
    assert repo_files(tmp_path / "repo") == before
    point = store(repo, "d", image(14, 3))
    assert restored(repo, point, tmp_path) == b"".join(image(14, 3))


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EDQUOT])
def test_a_backup_whose_manifest_fails_keeps_its_indexed_packs(tmp_path: Path,
                                                               error: int) -> None:
    class NoManifests(OsFileIO):
        def replace_atomic(self, path: str, data: bytes | bytearray) -> None:
            if "/points/" in path:
                raise OSError(error, os.strerror(error))
            super().replace_atomic(path, data)

    Repository.init(tmp_path / "repo", encryption=TEST_ENCRYPTION).close()
    with pytest.raises(NoSpace, match="nothing was published"):
        store(Repository.open(tmp_path / "repo", NoManifests(),
                              password=TEST_PASSWORD), "d", image(15, 3))
    fresh = Repository.open(tmp_path / "repo", password=TEST_PASSWORD)
    report = fresh.check(read_data=True)
    assert report.ok and report.unreferenced_files == 1 and fresh.points() == []
    assert fresh.prune().packs_deleted == 1


def test_a_full_restore_target_is_no_space(repo: Repository, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    point = store(repo, "d", image(16, 4))

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("blocktrail.fileio.os.pwrite", full)
    target = tmp_path / "out" / "disk.raw"
    target.parent.mkdir()
    with pytest.raises(NoSpace, match=r"restore target .* is full.*nothing was left"):
        repo.restore(point.id, str(target))
    assert os.listdir(target.parent) == []


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EIO])
def test_a_restore_whose_rename_fails_leaves_nothing(local_repo: Repository, tmp_path: Path,
                                                     error: int) -> None:
    class RenameFails(OsFileIO):
        def rename(self, src: str, dst: str) -> None:
            raise OSError(error, os.strerror(error))

    point = store(local_repo, "d", image(18, 4))
    target = tmp_path / "out" / "disk.raw"
    target.parent.mkdir()
    with pytest.raises(NoSpace if error == errno.ENOSPC else OSError):
        local_repo.restore(point.id, str(target), fileio=RenameFails())
    assert os.listdir(target.parent) == []


def test_a_trailer_entry_of_a_copy_in_quarantine_is_still_checked(repo: Repository,
                                                                  target: RepoTarget) -> None:
    point = store(repo, "d", image(17, 3))
    name = repo.chunk_digests(point.id, [0])[0]
    assert name is not None
    loc = repo.index[name]
    pack = pack_of(loc)
    target.flip(pack, loc.offset)  # the envelope's magic: found and put in quarantine
    assert [p.kind for p in repo.check(read_data=True).problems] == ["chunk"]
    report = target.open().check(read_data=True)
    assert report.affected_points == {point.id} and report.quarantined_before == 1
    assert [p.kind for p in report.problems] == ["chunk"]  # the known damage, nothing more
    data = target.read(pack)
    count = int.from_bytes(data[-8:-4], "little")
    start = target.trailer_start(data)
    entry = start + next(i * 48 for i in range(count) if data[start + i * 48 :][:32] == name)
    target.flip(pack, entry + 5)  # now that copy's trailer entry too: no index entry names it
    report = target.open().check(read_data=True)
    assert ("pack", loc.pack_id) in {(p.kind, p.name) for p in report.problems}
