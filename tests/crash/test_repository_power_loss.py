"""A local repository losing power at every durability point of its life (CrashMonkey style).

The kill sweeps (test_repository_crash_points.py) kill the process: the kernel keeps what it
was given. A power loss also takes what no fsync made durable: file data, and directory
entries (a file's, and a new directory's in its parent) whose directory was not fsynced. Here
the repository runs on the simulated file system, which keeps exactly what was made durable
(`SimulatedFileIO.power_loss`). One life of a repository (init, a full backup, two
incrementals, a forget, a prune beside a writer, a restore to a file, a new password) runs
once per durability operation (fsync, directory fsync), losing power just before the N-th;
then the machine comes back (another process) and, against what the test backed up:

- a step that returned is durable: its points restore bit-identical; a forgotten point stays
  forgotten; the restored file is whole;
- the step that was cut is all or nothing: a point it published restores bit-identical, the
  target holds its old bytes or the whole image, the repository opens with the old password
  or the new one;
- `check --read-data` finds nothing wrong (what a cut may leave, ``*.tmp`` files and unused
  packs, is no problem);
- the rest of the life, run again from the step that was cut, ends where an uninterrupted life
  does, and a prune then leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from blocktrail.backup.verify import verify_point
from blocktrail.errors import BlocktrailError
from blocktrail.repo import Repository, layout
from blocktrail.repo import leases as repo_leases
from blocktrail.repo.errors import PasswordInUse, WrongPassword
from blocktrail.repo.localdir import LocalBackend
from blocktrail.repo.objects import KIND_CHUNK
from blocktrail.repo.retention import RetentionPolicy
from blocktrail.simfileio import SimulatedFileIO
from s3server import TEST_ENCRYPTION, TEST_PASSWORD

sys.path.insert(0, str(Path(__file__).parent))
from powercut import PowerCutFileIO
from test_repository_crash_points import CS, IMAGES, MemorySource, backup

ROOT = "/sim/repo"
TARGET = "/sim/out/disk.raw"
OLD_TARGET = b"the target's bytes before the restore"
NEW_PASSWORD = "a new password"


@contextlib.contextmanager
def first_life() -> Iterator[None]:
    """The process of the life that loses power: its leases name a process that is gone once
    the machine is back (the same PID, another start), as a killed writer's do."""
    real = repo_leases.process_identity

    def identity(pid: int | None = None) -> str | None:
        found = real(pid)
        return None if found is None else found.rsplit("/", 1)[0] + "/first-life"

    repo_leases.process_identity = identity
    try:
        yield
    finally:
        repo_leases.process_identity = real


@dataclass
class Life:
    """What the test knows, step by step: the points acknowledged, the points forgotten."""

    fs: PowerCutFileIO
    points: dict[str, bytes] = field(default_factory=dict)  # point -> the bytes it restores
    forgotten: set[str] = field(default_factory=set)
    restored: bool = False
    password: str = TEST_PASSWORD
    step: int = 0  # the steps that returned

    def repo(self) -> Repository:
        """The repository, opened with its password (while a new one is being set, with
        either: never with neither)."""
        try:
            return Repository.open(ROOT, self.fs, password=self.password)
        except WrongPassword:
            if self.step >= len(STEPS) or STEPS[self.step] is not _passwd:
                raise
            self.password = NEW_PASSWORD
            return Repository.open(ROOT, self.fs, password=self.password)


def _init(life: Life) -> None:
    life.fs.makedirs("/sim/out")
    life.fs.fsync_dir("/sim")  # the test's own directories, whatever makedirs does
    life.fs.fsync_dir("/")
    life.fs.replace_atomic(TARGET, OLD_TARGET)
    Repository.init(ROOT, life.fs, encryption=TEST_ENCRYPTION).close()


def _backup(generation: int) -> Callable[[Life], None]:
    def step(life: Life) -> None:
        with life.repo() as repo:
            life.points[backup(repo, generation)] = IMAGES[generation - 1]
    return step


def _forget(life: Life) -> None:
    """Keep the newest point (a run again after a cut forgets what the cut run left)."""
    with life.repo() as repo:
        forgotten = {p.id for p in repo.forget(RetentionPolicy(keep_last=1))}
    life.forgotten = set(life.points) - {max(life.points)}
    assert forgotten <= life.forgotten


def _prune(life: Life) -> None:
    """Beside a writer holding the repository lock shared, as every backup does: the
    two-phase path through ``gc/`` (condemn, name the writers, then mark again and sweep)."""
    with life.repo() as repo:
        writer = repo.backend.host_lock(exclusive=False, wait=True)
        assert writer is not None
        try:
            repo.prune()
        finally:
            writer.release()


def _restore(life: Life) -> None:
    with life.repo() as repo:
        newest = max(life.points.keys() - life.forgotten)
        repo.restore(newest, TARGET, fileio=life.fs)
    life.restored = True


def _passwd(life: Life) -> None:
    with life.repo() as repo:
        try:
            repo.change_password(NEW_PASSWORD)
        except PasswordInUse as exc:  # a cut one made the new key file: finish as it says
            assert f"repo key remove {ROOT} {repo.key_id}`" in exc.message
            with Repository.open(ROOT, life.fs, password=NEW_PASSWORD) as renewed:
                renewed.remove_key(str(repo.key_id))
    life.password = NEW_PASSWORD


STEPS: list[Callable[[Life], None]] = [_init, _backup(1), _backup(2), _backup(3), _forget,
                                       _prune, _restore, _passwd]


def _run(life: Life) -> None:
    while life.step < len(STEPS):
        STEPS[life.step](life)
        life.step += 1


def _image(repo: Repository, point_id: str) -> bytes:
    """The point's image, restored into memory (the simulated file system)."""
    scratch = SimulatedFileIO()
    scratch.makedirs("/x")
    repo.restore(point_id, "/x/image", fileio=scratch)
    return scratch.read_file("/x/image")


def _judge(life: Life, where: str) -> None:
    """The repository after the machine came back, against what returned before the cut."""
    fs = life.fs
    if life.step == 0 and not fs.exists(f"{ROOT}/config.json"):
        return  # init was cut before it made a repository
    with life.repo() as repo:
        listed = {p.id for p in repo.points()}
        acknowledged = life.points.keys() - life.forgotten
        if STEPS[life.step] is _forget:  # the points it forgets are gone or whole
            acknowledged = {max(acknowledged)}
        assert acknowledged <= listed, f"{where}: points that were backed up are gone: " \
            f"{sorted(acknowledged - listed)}"
        assert not (listed & life.forgotten), f"{where}: forgotten points are back"
        for point_id in listed:
            content = life.points.get(point_id)
            if content is None:  # published by the backup that was cut: a point from now on
                content = life.points[point_id] = IMAGES[life.step - 1]
            assert _image(repo, point_id) == content, \
                f"{where}: restore point {point_id} does not restore to what was backed up"
        report = repo.check(read_data=True)
        assert report.ok, f"{where}: check finds {[p.detail for p in report.problems]}"
    target = fs.read_file(TARGET) if fs.exists(TARGET) else None
    newest = IMAGES[2]
    if life.restored:
        assert target == newest, f"{where}: the restored image is not whole"
    elif life.step >= 1:
        assert target in (OLD_TARGET, newest), f"{where}: the target is neither old nor whole"


def _finish(life: Life, where: str) -> None:
    """The rest of the life, run again from the step that was cut; then nothing is left."""
    if life.step == 0 and life.fs.exists(f"{ROOT}/config.json"):
        life.step = 1  # init made the repository before the cut: the life goes on from there
    _run(life)
    with life.repo() as repo:
        assert {p.id for p in repo.points()} == set(life.points) - life.forgotten, where
        repo.prune()
        report = repo.check(read_data=True)
        assert report.ok, f"{where}: check finds {[p.detail for p in report.problems]}"
        assert (report.unreferenced_files, report.temp_files) == (0, 0), where
        assert not repo.backend.leftovers(), where
    assert life.fs.read_file(TARGET) == IMAGES[2], where
    with pytest.raises(WrongPassword):
        Repository.open(ROOT, life.fs, password=TEST_PASSWORD)


def _durability_operations() -> int:
    life = Life(PowerCutFileIO(0))
    with first_life():
        _run(life)
    return life.fs.count


@pytest.mark.parametrize("torn", [False, True], ids=["unsynced lost", "unsynced torn"])
def test_a_repository_loses_power_at_every_durability_point(torn: bool) -> None:
    total = _durability_operations()
    assert total >= 50, total  # every step makes its writes durable
    for cut_at in range(1, total + 1):
        life = Life(PowerCutFileIO(cut_at, cut_at if torn else None))
        with first_life():
            try:
                _run(life)
            except Exception:  # whatever the operation made of the loss
                if not life.fs.dead:
                    raise
        where = f"power lost before durability operation {cut_at} of {total}, " \
                f"in step {life.step} ({STEPS[life.step].__name__})"
        assert life.fs.dead, f"{where}: the life ended without reaching it"
        life.fs.restart()
        _judge(life, where)
        _finish(life, where)


# ------------------------------------------------------------------ repairing what is damaged

@dataclass(frozen=True)
class Mending:
    name: str
    damage: str  # "trailer": the last byte of a pack; "chunk": a byte inside P3's chunk 3
    operate: Callable[[Repository], object]


def _heal(repo: Repository) -> object:
    source = MemorySource(3)
    source.create_snapshot("p3")
    return verify_point(repo, max(p.id for p in repo.points()), source, "p3", heal=True)


MENDINGS = [Mending("repair", "trailer", lambda repo: repo.repair()),
            Mending("verify-heal", "chunk", _heal)]


def _damaged(mending: Mending) -> tuple[PowerCutFileIO, list[str], set[tuple[str, str]]]:
    """Three points, then the damage, all durable. -> (the file system, the points, what
    check finds)."""
    life = Life(PowerCutFileIO(0))
    with first_life():
        for step in STEPS[:4]:
            step(life)
    fs = life.fs
    with life.repo() as repo:
        chunk = IMAGES[0][:CS] if mending.damage == "trailer" else IMAGES[2][3 * CS : 4 * CS]
        loc = repo.index.get(repo.codec.name(KIND_CHUNK, chunk))
        assert loc is not None
        path = repo.backend.path(layout.pack(loc.pack_id))
    offset = fs.seal(path)[0] - 1 if mending.damage == "trailer" else loc.offset + loc.length // 2
    fs.tamper(path, bytes([fs.read_file(path)[offset] ^ 1]), offset)
    fs.open(path).fsync()
    with _copy(fs).repo() as repo:  # on a copy: a check that finds damage quarantines it
        damage = {(p.kind, p.name) for p in repo.check(read_data=True).problems}
    assert {kind for kind, _ in damage} == {"pack" if mending.damage == "trailer" else "chunk"}
    return fs, sorted(life.points), damage


def _copy(fs: SimulatedFileIO) -> Life:
    """A life on a copy of the disk of ``fs``, all its steps done, its power cut nowhere."""
    copy = PowerCutFileIO(0)
    copy.copy_disk_from(fs)
    return Life(copy, step=len(STEPS))


@pytest.mark.parametrize("torn", [False, True], ids=["unsynced lost", "unsynced torn"])
@pytest.mark.parametrize("mending", MENDINGS, ids=lambda m: m.name)
def test_a_repair_loses_power_at_every_durability_point(mending: Mending, torn: bool) -> None:
    """`repo repair` of a pack with a damaged trailer, `verify --heal` of a damaged chunk:
    after a cut, every point restores bit-identical (the healed one, or it is refused until
    healed), check finds nothing but the damage being mended, and mending again ends clean."""
    golden, points, damage = _damaged(mending)
    contents = dict(zip(points, IMAGES, strict=True))
    for cut_at in itertools.count(1):
        life = _copy(golden)
        life.fs.cut_at = cut_at
        life.fs.torn = random.Random(cut_at) if torn else None
        with first_life(), life.repo() as repo:
            try:
                mending.operate(repo)
            except Exception:
                if not life.fs.dead:
                    raise
        if not life.fs.dead:
            break
        where = f"{mending.name}: power lost before durability operation {cut_at}"
        life.fs.restart()
        with life.repo() as repo:
            assert sorted(p.id for p in repo.points()) == points, where
            for point_id, content in contents.items():
                try:
                    image: bytes | None = _image(repo, point_id)
                except BlocktrailError:  # refused: the damaged chunk is not healed yet
                    image = None
                assert image == content or (image is None and mending.damage == "chunk"), \
                    f"{where}: point {point_id} restores to other bytes"
            problems = {(p.kind, p.name) for p in repo.check(read_data=True).problems}
            assert problems <= damage, f"{where}: check finds {problems - damage}"
            mending.operate(repo)
            for point_id, content in contents.items():
                assert _image(repo, point_id) == content, f"{where}, then mended again"
            repo.prune()
            report = repo.check(read_data=True)
            assert report.ok, f"{where}, then mended again: {report.problems}"
            assert (report.unreferenced_files, report.temp_files) == (0, 0), where
    assert cut_at > 4, f"{mending.name}: only {cut_at - 1} durability operations"


def test_a_new_directory_is_lost_with_the_power_until_its_parent_is_synced() -> None:
    fs = SimulatedFileIO()
    fs.makedirs("/r/packs")
    fs.mkdir("/r/packs/ab")  # the system call alone
    fs.replace_atomic("/r/packs/ab/1.pack", b"pack")  # the file and its directory synced
    fs.power_loss()
    assert fs.listdir("/r/packs") == [] and not fs.exists("/r/packs/ab/1.pack")
    fs.makedirs("/r/packs/cd")  # synced in its parent
    fs.replace_atomic("/r/packs/cd/2.pack", b"pack")
    fs.power_loss()
    assert fs.listdir("/r/packs") == ["cd"] and fs.read_file("/r/packs/cd/2.pack") == b"pack"


@pytest.mark.parametrize("depth", [1, 3])
def test_makedirs_syncs_each_new_directory_in_its_parent(tmp_path: Path, depth: int) -> None:
    """The real file system: every directory `OsFileIO.makedirs` makes is followed by an fsync
    of its parent (strace, from outside)."""
    import re
    import subprocess

    from hostproc import require_tools
    require_tools("strace")
    made = tmp_path.joinpath(*[f"d{i}" for i in range(depth)])
    log = tmp_path / "strace.log"
    subprocess.run(["strace", "-f", "-qq", "-y", "-o", str(log), "-e", "trace=mkdir,fsync",
                    sys.executable, "-c", "import sys; from blocktrail.fileio import OsFileIO; "
                    "OsFileIO().makedirs(sys.argv[1])", str(made)], check=True, timeout=60)
    made_dirs: list[str] = []
    synced: list[str] = []
    for line in log.read_text().splitlines():
        if m := re.search(r'mkdir\("([^"]+)"', line):
            made_dirs.append(m.group(1))
        elif m := re.search(r"fsync\(\d+<([^>]+)>", line):
            synced.append(m.group(1))
    assert made_dirs == [str(tmp_path.joinpath(*[f"d{i}" for i in range(n + 1)]))
                         for n in range(depth)]
    assert sorted(synced) == sorted(str(Path(d).parent) for d in made_dirs)


def test_a_directory_a_killed_process_made_is_synced_before_a_file_goes_in() -> None:
    """A process killed between its mkdir and the fsync of the parent left the directory
    unsynced: the next writer into it syncs it first, so the file it publishes there survives
    a power loss."""
    fs = SimulatedFileIO()
    fs.makedirs("/r/packs")
    fs.mkdir("/r/packs/ab")  # what the killed process left
    backend = LocalBackend("/r", fs)
    backend.create("packs/ab/" + "0" * 32 + ".pack", b"pack")
    fs.power_loss()
    assert fs.read_file("/r/packs/ab/" + "0" * 32 + ".pack") == b"pack"


def test_a_copy_of_a_disk_holds_what_a_power_loss_leaves() -> None:
    fs = SimulatedFileIO()
    fs.makedirs("/r/packs")
    fs.mkdir("/r/packs/ab")
    fs.replace_atomic("/r/packs/ab/1.pack", b"pack")  # synced in a directory that is not
    fs.replace_atomic("/r/kept", b"kept")
    copy = SimulatedFileIO()
    copy.copy_disk_from(fs)
    fs.power_loss()
    for disk in (copy, fs):
        assert disk.listdir("/r/packs") == [] and not disk.exists("/r/packs/ab/1.pack")
        assert disk.read_file("/r/kept") == b"kept"
