"""The repository's operations on a local directory, killed at every file-system mutation in
turn (`crashpoints.sweep`): a full backup, an incremental, `forget`, `prune` after a forget,
`restore` over an existing file (raw, and qcow2 through the CLI), `repo repair` of a pack with
a damaged trailer, and `verify --heal` of a damaged chunk.

After every kill, against what the test itself backed up (the images are kept here):

- every restore point published before the operation restores bit-identical (a point the
  interrupted operation was healing: bit-identical or refused, never other bytes);
- `check --read-data` finds nothing but the damage the operation was there to repair. What a
  kill may leave is only what docs/repository.md says the next prune or repair collects:
  ``*.tmp`` files ("never read; prune and repo repair delete them"), packs no manifest uses
  ("a crash before the manifest leaves only unreferenced files, which check counts (not as
  damage) and prune deletes"), the verify records of a forgotten point, and the disk lease of
  the dead writer (taken over by the next one);
- the operation is all or nothing: a backup published a point that restores bit-identical, or
  nothing; each point a forget forgets is gone or whole, the newest first; a restore target
  holds its old bytes or the whole image;
- run again, the operation succeeds and ends where an uninterrupted run does (then a prune
  leaves no leftovers and every point still restores).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from blocktrail.backup.engine import BackupOptions, run_backup
from blocktrail.backup.source import SourceSnapshot
from blocktrail.backup.verify import verify_point
from blocktrail.cli.backup import restore as restore_command
from blocktrail.errors import BlocktrailError, StaleChangeId
from blocktrail.extents import Extent
from blocktrail.fileio import OsFileIO
from blocktrail.repo import Repository
from blocktrail.repo.objects import KIND_CHUNK
from blocktrail.repo.prune import PruneReport
from blocktrail.repo.retention import RetentionPolicy
from blocktrail.tracking import DiskChangeInfo
from repodamage import flip, object_file, restored
from s3server import TEST_ENCRYPTION, TEST_PASSWORD

sys.path.insert(0, str(Path(__file__).parent))
from crashpoints import Reporter, Trial, sweep

CS = 64 * 1024  # the repository's chunk size (fixed)
CHUNKS = 6
SIZE = CHUNKS * CS  # 384 KiB
DISK_ID = "5d0c2a8e-1f3b-4c6d-9e7f-0a1b2c3d4e5f"
EPOCH = "7e3f1a2b-4c5d-4e6f-8a9b-0c1d2e3f4a5b"


def _images() -> list[bytes]:
    """V1: five chunks of data and a hole; V2 changes chunk 1; V3 changes chunks 1 and 3."""
    rng = random.Random(11)
    v1 = b"".join(rng.randbytes(CS) for _ in range(CHUNKS - 1)) + bytes(CS)
    v2 = v1[:CS] + rng.randbytes(CS) + v1[2 * CS :]
    v3 = v2[:CS] + rng.randbytes(CS) + v2[2 * CS : 3 * CS] + rng.randbytes(CS) + v2[4 * CS :]
    return [v1, v2, v3]


IMAGES = _images()


class MemorySource:
    """A disk whose states are ``IMAGES[:generations]``; a snapshot is the newest state; the
    change ID of state g is ``EPOCH/g``, and the changes since it are the chunks that differ.
    Nothing of it is a file, so every mutation the sweep counts is the repository's."""

    granularity = CS
    disk_id = DISK_ID

    def __init__(self, generations: int) -> None:
        self.generations = generations
        self.snapshots: dict[str, int] = {}

    def _state(self, snapshot: str) -> bytes:
        return IMAGES[self.snapshots[snapshot]]

    def create_snapshot(self, name: str) -> SourceSnapshot:
        self.snapshots[name] = self.generations - 1
        return self.existing_snapshot(name)

    def existing_snapshot(self, name: str) -> SourceSnapshot:
        return SourceSnapshot(name, f"{EPOCH}/{self.snapshots[name]}", SIZE)

    def remove_snapshot(self, name: str) -> None:
        del self.snapshots[name]

    def query_changed_areas(self, change_id: str, start_offset: int,
                            snapshot: str) -> DiskChangeInfo:
        epoch, _, generation = change_id.partition("/")
        if epoch != EPOCH:
            raise StaleChangeId(f"change ID {change_id} is not this disk's")
        old, new = IMAGES[int(generation)], self._state(snapshot)
        changed = [Extent(i * CS, CS) for i in range(start_offset // CS, CHUNKS)
                   if old[i * CS : (i + 1) * CS] != new[i * CS : (i + 1) * CS]]
        return DiskChangeInfo(start_offset, SIZE - start_offset, changed)

    def allocated_areas(self, snapshot: str) -> list[Extent]:
        state = self._state(snapshot)
        return [Extent(i * CS, CS) for i in range(CHUNKS) if any(state[i * CS : (i + 1) * CS])]

    def pread(self, snapshot: str, count: int, offset: int) -> bytes:
        return self._state(snapshot)[offset : offset + count]

    def snapshot_size(self, snapshot: str) -> int:
        return SIZE

    def close(self) -> None:
        pass


def backup(repo: Repository, generations: int) -> str:
    report = run_backup(MemorySource(generations), repo, BackupOptions(seed=1))
    return report.point.id


def open_repo(path: Path) -> Repository:
    return Repository.open(path, password=TEST_PASSWORD)


# ------------------------------------------------------------------ the golden repositories


@dataclass
class Golden:
    """Repositories in the states the operations start from, built once."""

    root: Path
    contents: dict[str, bytes] = field(default_factory=dict)  # point -> the bytes it restores
    ids: list[str] = field(default_factory=list)  # P1 (full, V1), P2 (V2), P3 (V3)
    damage: dict[str, set[tuple[str, str]]] = field(default_factory=dict)  # what check finds

    def path(self, state: str) -> Path:
        return self.root / state


def _copy(golden: Golden, source: str, dest: str) -> Path:
    shutil.copytree(golden.path(source), golden.path(dest))
    return golden.path(dest)


def build_golden(root: Path) -> Golden:
    g = Golden(root)
    Repository.init(g.path("empty"), encryption=TEST_ENCRYPTION).close()
    with open_repo(_copy(g, "empty", "one")) as repo:
        g.ids.append(backup(repo, 1))
    with open_repo(_copy(g, "one", "three")) as repo:
        g.ids += [backup(repo, 2), backup(repo, 3)]
        for point_id in g.ids[:2]:  # verify records, which a forget deletes with the point
            repo.set_verify_state(point_id, "ok")
        assert [p.kind for p in repo.points()] == ["full", "incremental", "incremental"]
    g.contents = dict(zip(g.ids, IMAGES, strict=True))
    with open_repo(_copy(g, "three", "forgotten")) as repo:
        assert {p.id for p in repo.forget(RetentionPolicy(keep_last=1))} == set(g.ids[:2])
    with open_repo(_copy(g, "forgotten", "forgotten-pruned")) as repo:  # uninterrupted
        assert repo.prune().packs_deleted >= 1  # so the sweep has something to delete
    with open_repo(_copy(g, "three", "damaged-trailer")) as repo:
        first = repo.index.get(repo.codec.name(KIND_CHUNK, IMAGES[0][:CS]))
        assert first is not None
        pack = object_file(g.path("damaged-trailer"), first)
        flip(pack, pack.stat().st_size - 1)  # the trailer's magic
    with open_repo(_copy(g, "three", "damaged-chunk")) as repo:
        third = repo.index.get(repo.codec.name(KIND_CHUNK, IMAGES[2][3 * CS : 4 * CS]))
        assert third is not None
        flip(object_file(g.path("damaged-chunk"), third), third.offset + third.length // 2)
    for state, kind in (("damaged-trailer", "pack"), ("damaged-chunk", "chunk")):
        with open_repo(_copy(g, state, f"{state}-probe")) as repo:  # a check writes quarantine
            g.damage[state] = {(p.kind, p.name) for p in repo.check(read_data=True).problems}
            assert {k for k, _ in g.damage[state]} == {kind}, g.damage[state]
    return g


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Golden:
    return build_golden(tmp_path_factory.mktemp("golden"))


# ------------------------------------------------------------------------------ checks


def assert_restore(repo: Repository, points: dict[str, bytes], scratch: Path, where: str) -> None:
    for point_id, content in points.items():
        assert restored(repo, point_id, scratch) == content, \
            f"{where}: restore point {point_id} does not restore to what was backed up"


def assert_checks(repo: Repository, where: str, tolerated: Set[tuple[str, str]] = frozenset()
                  ) -> None:
    """`check --read-data` finds no problem but ``tolerated`` ones (kind, name)."""
    report = repo.check(read_data=True)
    unexpected = [p for p in report.problems if (p.kind, p.name) not in tolerated]
    assert not unexpected, f"{where}: check finds {[p.detail for p in unexpected]}"


def assert_no_leftovers(repo: Repository, where: str) -> None:
    """After the operation ran again and a prune: nothing reclaimable is left."""
    repo.prune()
    report = repo.check(read_data=True)
    assert report.ok, f"{where}: check finds {[p.detail for p in report.problems]}"
    assert (report.unreferenced_files, report.temp_files) == (0, 0), where
    assert not repo.backend.leftovers(), where


# ------------------------------------------------------------------------------ the operations


@dataclass(frozen=True)
class Operation:
    name: str
    start: str  # the golden state it starts from
    operate: Callable[[Golden, Path, Reporter], None]  # in the child, armed
    judge: Callable[[Golden, Path, Trial, Path], None]  # in the parent, after each trial
    minimum: int  # crash points an operation of this kind has at least
    landmark: str  # a mutation (regex) the sweep must kill at: the step that publishes


def _backup_operate(generations: int) -> Callable[[Golden, Path, Reporter], None]:
    def operate(g: Golden, path: Path, reporter: Reporter) -> None:
        with open_repo(path) as repo:
            reporter.send("published", point=backup(repo, generations))
    return operate


def _backup_judge(generations: int) -> Callable[[Golden, Path, Trial, Path], None]:
    def judge(g: Golden, path: Path, trial: Trial, scratch: Path) -> None:
        where = f"backup killed at mutation {trial.kill_at}"
        before = dict(list(g.contents.items())[: generations - 1])
        with open_repo(path) as repo:
            points = {p.id: p for p in repo.points()}
            new = sorted(set(points) - set(before))
            assert set(before) <= set(points), f"{where}: a point published before is gone"
            assert len(new) <= 1, f"{where}: {new}"
            if trial.completed:
                assert new == [trial.events_of("published")[0]["point"]], where
            if new:  # published: whole, of the right kind
                assert points[new[0]].kind == ("full" if generations == 1 else "incremental")
            assert_restore(repo, {**before, **dict.fromkeys(new, IMAGES[generations - 1])},
                           scratch, where)
            assert_checks(repo, where)
            again = backup(repo, generations)  # the run again, over what the kill left
            # on top of the point the killed run published, if it did: an incremental
            assert repo.point(again).kind == ("full" if generations == 1 and not new
                                              else "incremental"), where
            assert_restore(repo, {**before, again: IMAGES[generations - 1]}, scratch,
                           f"{where}, then run again")
            assert_no_leftovers(repo, f"{where}, then run again")
            assert len(repo.points()) == len(before) + len(new) + 1
    return judge


def _forget_operate(g: Golden, path: Path, reporter: Reporter) -> None:
    with open_repo(path) as repo:
        repo.forget(RetentionPolicy(keep_last=1))


def _forget_judge(g: Golden, path: Path, trial: Trial, scratch: Path) -> None:
    where = f"forget killed at mutation {trial.kill_at}"
    p1, p2, p3 = g.ids
    with open_repo(path) as repo:
        left = [p.id for p in repo.points()]
        # whole points only, the newest forgotten first: never P2 without P1
        assert left in ([p1, p2, p3], [p1, p3], [p3]), f"{where}: {left}"
        if trial.completed:
            assert left == [p3], where
        assert_restore(repo, {p: g.contents[p] for p in left}, scratch, where)
        assert_checks(repo, where)
        for point_id in left:  # a point kept keeps its verify state
            assert repo.point(point_id).verify_state == ("unverified" if point_id == p3
                                                         else "ok"), where
        repo.forget(RetentionPolicy(keep_last=1))
        assert [p.id for p in repo.points()] == [p3], where
        assert_no_leftovers(repo, f"{where}, then run again")
        assert not repo.verify_records(), f"{where}: verify records of forgotten points stay"
        assert_restore(repo, {p3: g.contents[p3]}, scratch, f"{where}, then run again")


def _prune(repo: Repository, beside_writer: bool) -> PruneReport:
    """``beside_writer``: while a writer of this machine holds the repository lock shared (as
    every backup does), so that prune takes its two-phase path: condemn the dead packs and name
    the writers (``gc/``), then, none being left, mark again and sweep (repo/prune.py)."""
    if not beside_writer:
        return repo.prune()
    writer = repo.backend.host_lock(exclusive=False, wait=True)
    assert writer is not None
    try:
        return repo.prune()
    finally:
        writer.release()


def _prune_operate(beside_writer: bool) -> Callable[[Golden, Path, Reporter], None]:
    def operate(g: Golden, path: Path, reporter: Reporter) -> None:
        with open_repo(path) as repo:
            report = _prune(repo, beside_writer)
            reporter.send("pruned", packs_deleted=report.packs_deleted)
    return operate


def _pack_files(path: Path) -> set[str]:
    return {p.name for p in (path / "packs").rglob("*.pack")}


def _prune_judge(beside_writer: bool) -> Callable[[Golden, Path, Trial, Path], None]:
    def judge(g: Golden, path: Path, trial: Trial, scratch: Path) -> None:
        where = f"prune killed at mutation {trial.kill_at}"
        p3 = g.ids[2]
        with open_repo(path) as repo:
            assert [p.id for p in repo.points()] == [p3], where
            assert_restore(repo, {p3: g.contents[p3]}, scratch, where)
            assert_checks(repo, where)
            if trial.completed:
                assert trial.events_of("pruned")[0]["packs_deleted"] >= 1, where
            else:
                _prune(repo, beside_writer)
            assert_restore(repo, {p3: g.contents[p3]}, scratch, f"{where}, then run again")
            assert _pack_files(path) == _pack_files(g.path("forgotten-pruned")), where
            assert len(list((path / "index").iterdir())) == 1, where
            assert not list((path / "gc").iterdir()), f"{where}: a collection's run stays"
            assert_no_leftovers(repo, f"{where}, then run again")
    return judge


OLD_TARGET = random.Random(5).randbytes(100_000)  # what the restore target held


def _restore_operate(fmt: str, *, unnamed: bool = True
                     ) -> Callable[[Golden, Path, Reporter], None]:
    """``unnamed`` False: as on a file system without files with no name (O_TMPFILE)."""
    def operate(g: Golden, path: Path, reporter: Reporter) -> None:
        if not unnamed:  # in the child only
            OsFileIO.create_unnamed = lambda self, directory: None  # type: ignore[method-assign]
        target, point = path.parent / "target", g.ids[2]
        if fmt == "raw":
            with open_repo(path) as repo:
                repo.restore(point, str(target))
        else:  # the CLI does the conversion
            restore_command.main([str(path), point, "--to", str(target), "--format", fmt],
                                 standalone_mode=False)
    return operate


def _image_of(target: Path, fmt: str, scratch: Path) -> bytes:
    if fmt == "raw":
        return target.read_bytes()
    raw = scratch / "converted.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(target), str(raw)],
                   check=True, capture_output=True)
    data = raw.read_bytes()
    raw.unlink()
    return data


def _restore_judge(fmt: str, *, unnamed: bool = True
                   ) -> Callable[[Golden, Path, Trial, Path], None]:
    def judge(g: Golden, path: Path, trial: Trial, scratch: Path) -> None:
        where = f"restore ({fmt}{'' if unnamed else ', named files'}) killed at mutation " \
            f"{trial.kill_at}"
        target, p3 = path.parent / "target", g.ids[2]
        old = target.read_bytes() == OLD_TARGET
        # Beside the target, a kill may leave the file the image was written to (never under
        # the target's name): a restore writes a file with no name (the qcow2 one converts
        # one such file into another), named ``TARGET.partial-*`` only once it is whole:
        # nothing else, and never part of an image. Without such files, the raw image is
        # ``TARGET.partial-*`` from the start, and the qcow2 conversion works in a temporary
        # directory beside the target.
        others = {p.name for p in target.parent.iterdir()} - {"repo", "target"}
        scratch_name = "tmp" if fmt == "qcow2" and not unnamed else "target.partial-"
        assert all(name.startswith(scratch_name) for name in others), f"{where}: {others}"
        if unnamed:
            assert all(_image_of(target.parent / name, fmt, scratch) == g.contents[p3]
                       for name in others), f"{where}: a partial image is left"
        if trial.completed:
            assert not others and not old, where
        if not old:
            assert _image_of(target, fmt, scratch) == g.contents[p3], \
                f"{where}: the target holds neither its old bytes nor the image"
        with open_repo(path) as repo:
            if fmt == "raw":
                repo.restore(p3, str(target))
            else:
                restore_command.main([str(path), p3, "--to", str(target), "--format", fmt],
                                     standalone_mode=False)
            assert _image_of(target, fmt, scratch) == g.contents[p3], f"{where}, then run again"
            assert_checks(repo, where)
            assert_no_leftovers(repo, where)
    return judge


def _repair_operate(g: Golden, path: Path, reporter: Reporter) -> None:
    with open_repo(path) as repo:
        repo.repair()


def _repair_judge(g: Golden, path: Path, trial: Trial, scratch: Path) -> None:
    where = f"repair killed at mutation {trial.kill_at}"
    damage = g.damage["damaged-trailer"]  # the pack with a damaged trailer
    with open_repo(path) as repo:
        assert [p.id for p in repo.points()] == g.ids, where
        assert_restore(repo, g.contents, scratch, where)
        assert_checks(repo, where, tolerated=set() if trial.completed else damage)
        report = repo.repair()
        assert report.ok, f"{where}, then run again: {report}"
        assert_restore(repo, g.contents, scratch, f"{where}, then run again")
        assert_no_leftovers(repo, f"{where}, then run again")


def _heal_operate(g: Golden, path: Path, reporter: Reporter) -> None:
    source = MemorySource(3)
    source.create_snapshot("p3")  # the point's own state
    with open_repo(path) as repo:
        report = verify_point(repo, g.ids[2], source, "p3", heal=True)
        reporter.send("healed", bytes=report.restored_bytes)


def _heal_judge(g: Golden, path: Path, trial: Trial, scratch: Path) -> None:
    where = f"verify --heal killed at mutation {trial.kill_at}"
    p3 = g.ids[2]
    damage = g.damage["damaged-chunk"]  # the damaged copy of P3's chunk 3
    with open_repo(path) as repo:
        assert [p.id for p in repo.points()] == g.ids, where
        assert_restore(repo, {p: g.contents[p] for p in g.ids[:2]}, scratch, where)
        try:
            data: bytes | None = restored(repo, p3, scratch)
        except BlocktrailError:  # refused: not healed yet
            data = None
        assert data in (None, g.contents[p3]), f"{where}: P3 restores to other bytes"
        healed = data is not None
        if trial.completed:
            assert healed and trial.events_of("healed")[0]["bytes"] > 0, where
        assert_checks(repo, where, tolerated=set() if healed else damage)
        source = MemorySource(3)
        source.create_snapshot("p3")
        report = verify_point(repo, p3, source, "p3", heal=True)
        assert not report.differing_areas, where
        assert repo.point(p3).verify_state == "ok", where
        assert_restore(repo, g.contents, scratch, f"{where}, then run again")
        assert_no_leftovers(repo, f"{where}, then run again")


MANIFEST = r"rename \d{8}T\d{9}Z-[0-9a-f]{8}\.json"  # a manifest or a verify record
OPERATIONS = [
    Operation("full-backup", "empty", _backup_operate(1), _backup_judge(1), 15, MANIFEST),
    Operation("incremental-backup", "one", _backup_operate(2), _backup_judge(2), 15, MANIFEST),
    Operation("forget", "three", _forget_operate, _forget_judge, 8,
              r"unlink \d{8}T\d{9}Z-[0-9a-f]{8}\.json"),
    Operation("prune", "forgotten", _prune_operate(False), _prune_judge(False), 10,
              r"unlink \w+\.pack"),
    Operation("prune-beside-writer", "forgotten", _prune_operate(True), _prune_judge(True), 30,
              r"rename [\w-]+\.condemned\.json"),
    Operation("restore-raw", "three", _restore_operate("raw"), _restore_judge("raw"), 6,
              "rename target"),
    Operation("restore-qcow2", "three", _restore_operate("qcow2"), _restore_judge("qcow2"), 9,
              "rename target"),
    Operation("restore-raw-named", "three", _restore_operate("raw", unnamed=False),
              _restore_judge("raw", unnamed=False), 6, "rename target"),
    Operation("restore-qcow2-scratch-directory", "three",
              _restore_operate("qcow2", unnamed=False), _restore_judge("qcow2", unnamed=False),
              9, "rename target"),
    Operation("repair", "damaged-trailer", _repair_operate, _repair_judge, 15,
              r"unlink \w+\.pack"),
    Operation("verify-heal", "damaged-chunk", _heal_operate, _heal_judge, 20, MANIFEST),
]


def lay_out_trial(g: Golden, operation: Operation, where: Path) -> Path:
    """A trial's directory: a copy of the repository the operation starts from, and the
    restore target with other content. -> the repository's path."""
    where.mkdir()
    shutil.copytree(g.path(operation.start), where / "repo")
    (where / "target").write_bytes(OLD_TARGET)
    return where / "repo"


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda o: o.name)
def test_repository_operation_killed_at_every_step(golden: Golden, operation: Operation,
                                                   tmp_path: Path) -> None:
    if operation.name.startswith("restore-qcow2") and shutil.which("qemu-img") is None:
        pytest.skip("qemu-img (Debian package qemu-utils) is missing")
    scratch = tmp_path / "scratch"
    scratch.mkdir()

    def prepare(reporter: Reporter) -> Any:
        trial = lay_out_trial(golden, operation, tmp_path / f"trial-{uuid.uuid4().hex[:8]}")
        reporter.send("ready", path=str(trial))
        return trial, reporter

    def operate(state: Any) -> None:
        operation.operate(golden, *state)

    outcomes: list[bool] = []

    def check(trial: Trial) -> None:
        path = Path(trial.events_of("ready")[0]["path"])
        operation.judge(golden, path, trial, scratch)
        outcomes.append(trial.completed)
        shutil.rmtree(path.parent)

    result = sweep(prepare, operate, check)
    assert result.crash_points >= operation.minimum, result.mutations
    assert any(re.fullmatch(operation.landmark, m) for m in result.mutations), result.mutations
    assert outcomes[-1] and not any(outcomes[:-1])


# Every operation but the qcow2 restore, whose converted file qemu-img writes itself (not
# through the file layer): it reaches the target through it (fsync, link, rename, directory
# fsync).
STRACED = [o.name for o in OPERATIONS if not o.name.startswith("restore-qcow2")]
_SYSCALL_KIND = {"pwrite64": "write", "write": "write", "pwritev": "write",
                 "fsync": "fsync", "fdatasync": "fsync", "rename": "rename",
                 "renameat": "rename", "renameat2": "rename", "unlink": "unlink",
                 "unlinkat": "unlink", "ftruncate": "truncate", "truncate": "truncate",
                 "fallocate": "fallocate", "mkdir": "mkdir", "mkdirat": "mkdir",
                 "rmdir": "rmdir", "link": "link", "linkat": "link"}


def test_no_repository_mutation_bypasses_the_file_layer(tmp_path: Path) -> None:
    """strace, from outside, sees exactly the mutations of the trial's files (the repository,
    the restore target) that the sweeps above kill at: nothing goes around the file layer."""
    from hostproc import require_tools
    require_tools("strace")
    log = tmp_path / "strace.log"
    out = subprocess.run(
        ["strace", "-f", "-qq", "-y", "-o", str(log), "-e",
         "trace=access,faccessat,faccessat2," + ",".join(_SYSCALL_KIND),
         sys.executable, str(Path(__file__).with_name("strace_repo_op.py")), str(tmp_path),
         *STRACED], capture_output=True, text=True, timeout=120, check=True)
    counted = json.loads(out.stdout)
    seen: dict[str, list[str]] = {name: [] for name in STRACED}
    inside: str | None = None
    for line in log.read_text().splitlines():
        if marker := re.search(r"/blocktrail-mark-(begin|end)-([\w-]+)", line):
            inside = marker.group(2) if marker.group(1) == "begin" else None
            continue
        match = re.match(r"\d+\s+(\w+)\((.*)", line)
        if inside and match and match.group(1) in _SYSCALL_KIND \
                and str(tmp_path / inside) in match.group(2):
            seen[inside].append(_SYSCALL_KIND[match.group(1)])
    for name in STRACED:
        expected = [p.split()[0].replace("fsync-dir", "fsync") for p in counted[name]]
        expected = [k for k in expected if k != "create"]  # strace's openat is not traced
        assert seen[name], f"{name}: strace saw no mutation"
        assert sorted(seen[name]) == sorted(expected), (name, seen[name], counted[name])
