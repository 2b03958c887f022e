"""Every crash point of every operation that changes a disk's durable state, swept.

For each operation (create, import, open/close, crash recovery, guest writes on a base and on a
delta top, snapshot create, snapshot removal with its consolidation steps and writes between
them, revert, shrink, grow, tracking reset, tracker checkpoint, close with a removal pending) a
child process is killed with SIGKILL at its 1st file-system mutation, then its 2nd, ... until it
completes (`crashpoints.sweep`). After every kill the disk is reopened and checked against an
independent model built from the child's log (a bytearray, the snapshots' contents, and which
change IDs must be answered or refused):

- the disk opens (or, for an interrupted create or import, does not exist and can be made again);
- every sector holds its content from before or after the interrupted step, every earlier step
  (each flushed) is there, and every snapshot holds its content;
- every change ID still answered reports every granule that differs from its point; every change
  ID the model has retired (reset, revert past it) is refused; IDs that were valid before and
  after the interrupted step are still answered (no needless full backups);
- reopening again gives the same answers (recovery is stable).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from blocktrail.disk import Disk
from blocktrail.disk.consolidation import Consolidation
from blocktrail.disk.importer import import_raw
from blocktrail.errors import DiskNotFound, StaleChangeId
from blocktrail.tracking import ChangeTracker

sys.path.insert(0, str(Path(__file__).parent))
from crashpoints import Reporter, SweepResult, Trial, sweep

from faulty import ClearsIntentBeforeResetCommits, DropsMarksDuringConsolidation

SIZE = 24 * 1024
GRANULARITY = 512
CLUSTER = 1024
SECTOR = 512
SEEDS = int(os.environ.get("BLOCKTRAIL_CRASH_SEEDS", "1"))


# ------------------------------------------------------------------------------ the child side

@dataclass
class Child:
    """What a child works on; every action it takes is logged before and after."""

    reporter: Reporter
    root: Path
    rng: random.Random
    disk: Disk | None = None
    removal: Consolidation | None = None
    tracker: type[ChangeTracker] = ChangeTracker

    @property
    def path(self) -> Path:
        return self.root / "disk"

    def do(self, action: str, **args: Any) -> None:
        self.reporter.send("begin", action=action, **args)
        result = ACTIONS[action](self, **args) or {}
        self.reporter.send("end", action=action, **result)

    # shortcuts the workloads use
    def write(self, offset: int, length: int) -> None:
        self.do("write", offset=offset, data=self.rng.randbytes(length).hex())

    def random_write(self, max_length: int = 3000) -> None:
        length = self.rng.randrange(1, max_length)
        self.write(self.rng.randrange(0, self.size - length), length)

    @property
    def size(self) -> int:
        assert self.disk is not None
        return self.disk.size_bytes


def _create(c: Child, size: int) -> dict[str, Any]:
    c.disk = Disk.create(c.path, size, GRANULARITY, cluster_size=CLUSTER,
                         tracker_class=c.tracker)
    return {"change_id": c.disk.current_change_id}


def _import(c: Child, source: str) -> dict[str, Any]:
    c.disk = import_raw(source, c.path, GRANULARITY, cluster_size=CLUSTER)
    return {"change_id": c.disk.tracker.epochs[-1].epoch + "/0"}


def _open(c: Child) -> None:
    c.disk = Disk.open(c.path, tracker_class=c.tracker, chunk_sources=PointSource.opener)


class PointSource:
    """IMPORT_SOURCE as a restore point in memory (the source of an instant restore)."""

    chunk_size = 4096
    size_bytes = 0  # set below

    @staticmethod
    def opener(info: dict[str, Any]) -> PointSource:
        return PointSource()

    def holes(self) -> list[bool]:
        cs = self.chunk_size
        return [not any(IMPORT_SOURCE[i : i + cs]) for i in range(0, len(IMPORT_SOURCE), cs)]

    def fetch(self, indexes: list[int]) -> Any:
        cs = self.chunk_size
        return ((i, IMPORT_SOURCE[i * cs : (i + 1) * cs]) for i in indexes)

    def describe(self) -> dict[str, Any]:
        return {"point": "memory"}

    def close(self) -> None:
        pass


POINT_ID = "0b8e6c1f-2d5a-4f27-9b1e-6f3a0d7c9e42/3"


def _create_restored(c: Child) -> dict[str, Any]:
    c.disk = Disk.create_restored(c.path, PointSource(), POINT_ID, granularity=GRANULARITY,
                                  cluster_size=CLUSTER)
    return {"change_id": POINT_ID}


def _fill(c: Child) -> dict[str, Any]:
    assert c.disk is not None
    progress = c.disk.fill(2)
    return {"done": progress is None or progress.done}


def _close(c: Child) -> None:
    assert c.disk is not None
    c.disk.close()
    c.disk = None


def _abandon(c: Child) -> None:
    assert c.disk is not None
    c.disk.abandon()
    c.disk = None


def _write(c: Child, offset: int, data: str) -> None:
    assert c.disk is not None
    c.disk.pwrite(bytes.fromhex(data), offset)
    c.disk.flush()


def _zero(c: Child, offset: int, length: int) -> None:
    assert c.disk is not None
    c.disk.zero(length, offset)
    c.disk.flush()


def _trim(c: Child, offset: int, length: int) -> None:
    assert c.disk is not None
    c.disk.trim(length, offset)
    c.disk.flush()


def _snapshot(c: Child, name: str) -> dict[str, Any]:
    assert c.disk is not None
    return {"change_id": c.disk.create_snapshot(name).change_id}


def _remove_begin(c: Child, name: str) -> None:
    assert c.disk is not None
    c.removal = c.disk.begin_remove_snapshot(name)


def _merge_step(c: Child) -> dict[str, Any]:
    assert c.removal is not None
    return {"done": c.removal.step(max_clusters=3)}


def _revert(c: Child, name: str) -> dict[str, Any]:
    assert c.disk is not None
    c.disk.revert_to_snapshot(name)
    return {"change_id": c.disk.current_change_id}


def _resize(c: Child, size: int) -> None:
    assert c.disk is not None
    c.disk.resize(size)


def _reset(c: Child) -> dict[str, Any]:
    assert c.disk is not None
    return {"change_id": c.disk.reset_tracking()}


def _checkpoint(c: Child) -> None:
    assert c.disk is not None
    c.disk.checkpoint()


ACTIONS: dict[str, Callable[..., dict[str, Any] | None]] = {
    "create": _create, "import": _import, "open": _open, "close": _close,
    "abandon": _abandon, "write": _write, "zero": _zero, "trim": _trim,
    "snapshot": _snapshot, "remove_begin": _remove_begin, "merge_step": _merge_step,
    "revert": _revert, "resize": _resize, "reset": _reset, "checkpoint": _checkpoint,
    "create_restored": _create_restored, "fill": _fill,
}


def remove_stepwise(c: Child, name: str, writes_between: int) -> None:
    c.do("remove_begin", name=name)
    done = False
    while not done:
        c.reporter.send("begin", action="merge_step")
        assert c.removal is not None
        done = c.removal.step(max_clusters=3)
        c.reporter.send("end", action="merge_step", done=done)
        if writes_between and not done:
            c.random_write(1500)
            writes_between -= 1


# ------------------------------------------------------------------------------ the model

@dataclass
class Model:
    content: bytearray = field(default_factory=bytearray)
    snapshots: dict[str, bytes] = field(default_factory=dict)  # in creation order
    valid: dict[str, bytes] = field(default_factory=dict)  # change ID -> content at its point
    snapshot_ids: dict[str, str] = field(default_factory=dict)  # snapshot -> change ID
    refused: set[str] = field(default_factory=set)
    exists: bool = False

    def copy(self) -> Model:
        return Model(bytearray(self.content), dict(self.snapshots), dict(self.valid),
                     dict(self.snapshot_ids), set(self.refused), self.exists)


def _set(model: Model, offset: int, data: bytes) -> None:
    model.content[offset : offset + len(data)] = data


def apply(model: Model, begin: dict[str, Any], end: dict[str, Any] | None) -> None:
    """The model's change for one action (``end`` None: its result is not known)."""
    action = begin["action"]
    change_id = (end or {}).get("change_id")
    if action == "create":
        model.exists, model.content = True, bytearray(begin["size"])
        if change_id:
            model.valid[change_id] = bytes(model.content)
    elif action == "create_restored":
        model.exists, model.content = True, bytearray(IMPORT_SOURCE)
        model.valid[POINT_ID] = bytes(IMPORT_SOURCE)
    elif action == "import":
        model.exists = True
        if change_id:
            model.valid[change_id] = bytes(len(IMPORT_SOURCE))
        model.content = bytearray(IMPORT_SOURCE)
    elif action == "write":
        _set(model, begin["offset"], bytes.fromhex(begin["data"]))
    elif action in ("zero", "trim"):
        _set(model, begin["offset"], bytes(begin["length"]))
    elif action == "snapshot":
        model.snapshots[begin["name"]] = bytes(model.content)
        if change_id:
            model.valid[change_id] = bytes(model.content)
            model.snapshot_ids[begin["name"]] = change_id
    elif action == "remove_begin":
        model.snapshots.pop(begin["name"])
    elif action == "revert":
        names = list(model.snapshots)
        target = begin["name"]
        model.content = bytearray(model.snapshots[target])
        for later in names[names.index(target) + 1 :]:
            del model.snapshots[later]
            later_id = model.snapshot_ids.pop(later, None)
            if later_id is not None:
                model.valid.pop(later_id, None)
                model.refused.add(later_id)
    elif action == "resize":
        size = begin["size"]
        if size < len(model.content):
            del model.content[size:]
        else:
            model.content += bytes(size - len(model.content))
    elif action == "reset":
        model.refused |= set(model.valid)
        model.valid.clear()
        model.snapshot_ids.clear()
        if change_id:
            model.valid[change_id] = bytes(model.content)


def replay(events: list[dict[str, Any]]) -> tuple[list[Model], str | None]:
    """-> the models the disk may be in (before and after an interrupted action), and the
    action interrupted (None: the log ended between actions)."""
    model = Model()
    pending: dict[str, Any] | None = None
    for event in events:
        if event["event"] == "begin":
            pending = event
        elif event["event"] == "end":
            assert pending is not None and pending["action"] == event["action"]
            apply(model, pending, event)
            pending = None
    if pending is None:
        return [model], None
    after = model.copy()
    apply(after, pending, None)
    return [model, after], pending["action"]


# ------------------------------------------------------------------------------ the checks

def reported_granules(disk: Disk, change_id: str) -> set[int]:
    out: set[int] = set()
    start = 0
    while start < disk.size_bytes:
        info = disk.query_changed_areas(change_id, start)
        for e in info.changed_areas:
            out.update(range(e.offset // GRANULARITY, (e.end - 1) // GRANULARITY + 1))
        start = info.end
    return out


def differing_granules(then: bytes, now: bytes) -> set[int]:
    out = set()
    for g in range(-(-len(now) // GRANULARITY)):
        lo, hi = g * GRANULARITY, min((g + 1) * GRANULARITY, len(now))
        if hi > len(then) or then[lo:hi] != now[lo:hi]:
            out.add(g)
    return out


def tracker_answers(disk: Disk, ids: set[str]) -> dict[str, set[int] | None]:
    answers: dict[str, set[int] | None] = {}
    for change_id in sorted(ids):
        try:
            answers[change_id] = reported_granules(disk, change_id)
        except StaleChangeId:
            answers[change_id] = None
    return answers


def check_disk(path: Path, candidates: list[Model]) -> dict[str, Any]:
    """The disk at ``path`` is in one of the candidate states; -> what it answered."""
    with Disk.open(path, chunk_sources=PointSource.opener) as disk:
        content = disk.pread(disk.size_bytes, 0)
        sized = [m for m in candidates if len(m.content) == len(content)]
        assert sized, f"size {len(content)} is the size of no candidate state"
        for lo in range(0, len(content), SECTOR):
            sector = content[lo : lo + SECTOR]
            assert any(m.content[lo : lo + SECTOR] == sector for m in sized), \
                f"sector at {lo} holds neither its content before nor after the step"
        listed = [s.name for s in disk.snapshots]
        assert any(listed == list(m.snapshots) for m in candidates), \
            f"snapshots {listed} are those of no candidate state"
        for snap in disk.snapshots:
            wanted = next(m.snapshots[snap.name] for m in candidates if snap.name in m.snapshots)
            got = disk.open_snapshot(snap.name).pread(snap.size_bytes, 0)
            assert got == wanted, f"snapshot {snap.name} changed"
        known = {cid for m in candidates for cid in (*m.valid, *m.refused)}
        known |= {s.change_id for s in disk.snapshots}
        answers = tracker_answers(disk, known)
        for change_id, reported in answers.items():
            if reported is None:
                assert not all(change_id in m.valid for m in candidates), \
                    f"{change_id} was valid before and after the step, and is refused"
                continue
            assert not all(change_id in m.refused for m in candidates), \
                f"{change_id} was retired, and is answered"
            thens = [m.valid[change_id] for m in candidates if change_id in m.valid]
            thens += [m.snapshots[s.name] for s in disk.snapshots if s.change_id == change_id
                      for m in candidates if s.name in m.snapshots]
            assert thens, f"{change_id} is answered but the model knows no content for it"
            missed = differing_granules(thens[0], content) - reported
            assert not missed, f"granules {sorted(missed)} changed since {change_id} and " \
                               "are not reported"
        return {"content": content, "snapshots": listed, "answers": answers}


@dataclass
class Case:
    name: str
    prepare: Callable[[Child], None]
    operate: Callable[[Child], None]


def make_check(root: Path, case: Case) -> Callable[[Trial], None]:
    def check(trial: Trial) -> None:
        candidates, interrupted = replay(trial.events)
        where = f"{case.name}, killed at mutation {trial.kill_at} during {interrupted}"
        disk_path = root / "disk"
        try:
            if not (disk_path / "disk.json").exists():
                assert not all(m.exists for m in candidates), \
                    f"{where}: the disk is gone"
                with pytest.raises(DiskNotFound):
                    Disk.open(disk_path)
                assert not any(p.name.endswith(".partial") for p in root.iterdir())
                Disk.create(disk_path, SIZE, GRANULARITY, cluster_size=CLUSTER).close()
                return  # an interrupted create: the name can be created again
            assert any(m.exists for m in candidates), f"{where}: a disk nobody created"
            first = check_disk(disk_path, [m for m in candidates if m.exists])
            again = check_disk(disk_path, [m for m in candidates if m.exists])
            assert first == again, f"{where}: a second open answers differently"
        except AssertionError as exc:
            raise AssertionError(f"{where}: {exc}") from exc
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return check


IMPORT_SOURCE = bytes(4096) + random.Random(7).randbytes(9000) + bytes(3000) + \
    random.Random(8).randbytes(6000)
PointSource.size_bytes = len(IMPORT_SOURCE)


def fill_all(c: Child) -> None:
    done = False
    while not done:
        c.reporter.send("begin", action="fill")
        done = _fill(c)["done"]
        c.reporter.send("end", action="fill", done=done)


def _restored(c: Child) -> None:
    c.do("create_restored")
    c.write(5000, 3000)


def _prepare(steps: Callable[[Child], None], root: Path, seed: int,
             tracker: type[ChangeTracker] = ChangeTracker) -> Callable[[Reporter], Child]:
    def prepare(reporter: Reporter) -> Child:
        root.mkdir(parents=True, exist_ok=True)
        child = Child(reporter, root, random.Random(seed), tracker=tracker)
        (root / "source.raw").write_bytes(IMPORT_SOURCE)
        steps(child)
        return child
    return prepare


def _base(c: Child) -> None:
    c.do("create", size=SIZE)
    for _ in range(3):
        c.random_write()


def _with_snapshots(count: int, big_top: bool = False) -> Callable[[Child], None]:
    def steps(c: Child) -> None:
        _base(c)
        for n in range(1, count + 1):
            c.do("snapshot", name=f"s{n}")
            for _ in range(2):
                c.random_write()
        if big_top:  # more clusters than a final merge takes at once: helper tops
            c.write(0, SIZE - 100)
    return steps


def _then_close(steps: Callable[[Child], None]) -> Callable[[Child], None]:
    def both(c: Child) -> None:
        steps(c)
        c.do("close")
    return both


def _then_abandon(steps: Callable[[Child], None]) -> Callable[[Child], None]:
    def both(c: Child) -> None:
        steps(c)
        c.do("abandon")
    return both


def _writes(c: Child) -> None:
    c.write(100, 5000)  # several granules, clusters and intent regions, unaligned
    c.write(2048, 1024)  # exactly one cluster
    c.do("zero", offset=3000, length=2500)
    c.do("trim", offset=8192, length=4096)
    c.write(SIZE - 700, 700)


CASES = [
    Case("create", lambda c: None, lambda c: c.do("create", size=SIZE)),
    Case("import", lambda c: None, lambda c: c.do("import", source=str(c.root / "source.raw"))),
    Case("open-close", _then_close(_with_snapshots(2)), lambda c: (c.do("open"), c.do("close"))),
    Case("recover-after-crash", _then_abandon(_with_snapshots(1)),
         lambda c: (c.do("open"), c.do("close"))),
    Case("writes-on-base", _base, _writes),
    Case("writes-on-delta", _with_snapshots(1), _writes),
    Case("snapshot-create", _with_snapshots(1), lambda c: c.do("snapshot", name="new")),
    Case("remove-oldest-snapshot", _with_snapshots(2),
         lambda c: remove_stepwise(c, "s1", writes_between=3)),
    Case("remove-newest-snapshot", _with_snapshots(2),
         lambda c: remove_stepwise(c, "s2", writes_between=2)),
    Case("remove-snapshot-big-top", _with_snapshots(1, big_top=True),
         lambda c: remove_stepwise(c, "s1", writes_between=4)),
    Case("close-with-removal-pending", _with_snapshots(2),
         lambda c: (c.do("remove_begin", name="s1"), c.do("close"))),
    Case("revert", _with_snapshots(3), lambda c: c.do("revert", name="s1")),
    Case("shrink", _with_snapshots(1), lambda c: c.do("resize", size=SIZE // 2 + 300)),
    Case("grow", _with_snapshots(1), lambda c: c.do("resize", size=SIZE * 2 - 512)),
    Case("reset", _with_snapshots(2), lambda c: c.do("reset")),
    Case("checkpoint", _with_snapshots(1), lambda c: c.do("checkpoint")),
    Case("create-restored", lambda c: None, lambda c: c.do("create_restored")),
    Case("fill-restored", _restored, lambda c: (c.write(0, 700), fill_all(c), c.write(9000, 99))),
    Case("reopen-restoring", lambda c: (_restored(c), c.do("close")),
         lambda c: (c.do("open"), c.do("close"))),
]
SWEPT: dict[str, SweepResult] = {}


@pytest.mark.parametrize("seed", range(1, SEEDS + 1))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kill_at_every_crash_point(case: Case, seed: int, tmp_path: Path) -> None:
    root = tmp_path / "trial"
    result = sweep(_prepare(case.prepare, root, seed), case.operate, make_check(root, case))
    SWEPT[f"{case.name}[{seed}]"] = result
    assert result.crash_points >= 3, f"{case.name}: only {result.crash_points} crash points"
    print(f"{case.name} (seed {seed}): {result.crash_points} crash points: "
          + ", ".join(sorted({re.sub(r'[0-9a-f]{16}', '*', p) for p in result.mutations})))


@pytest.mark.parametrize(("tracker", "cases"), [
    (ClearsIntentBeforeResetCommits, ["reset"]),
    (DropsMarksDuringConsolidation, ["remove-oldest-snapshot", "remove-newest-snapshot"]),
], ids=["reset-in-the-old-order", "drops-marks-during-consolidation"])
def test_sweep_finds_known_bugs(tracker: type[ChangeTracker], cases: list[str],
                                tmp_path: Path) -> None:
    """The sweep must fail against trackers that re-create real bugs (the reset order this
    project once had; ESXi 6.0's untracked consolidation writes)."""
    for name in cases:
        case = next(c for c in CASES if c.name == name)
        root = tmp_path / name
        with pytest.raises(AssertionError, match="not reported"):
            sweep(_prepare(case.prepare, root, 1, tracker), case.operate, make_check(root, case))


STRACED = ["create", "writes-on-delta", "snapshot-create", "remove-oldest-snapshot",
           "close-with-removal-pending", "revert", "shrink", "reset", "checkpoint"]
_SYSCALL_KIND = {"pwrite64": "write", "write": "write", "pwritev": "write",
                 "fsync": "fsync", "fdatasync": "fsync", "rename": "rename",
                 "renameat": "rename", "renameat2": "rename", "unlink": "unlink",
                 "unlinkat": "unlink", "ftruncate": "truncate", "truncate": "truncate",
                 "fallocate": "fallocate", "mkdir": "mkdir", "mkdirat": "mkdir"}


@pytest.mark.parametrize("name", STRACED)
def test_no_mutation_bypasses_the_file_layer(name: str, tmp_path: Path) -> None:
    """strace, from outside, sees exactly the mutations of the disk's files that the crash
    sweep kills at: nothing the operations do to their files goes around the file layer."""
    from hostproc import require_tools
    require_tools("strace")
    root, log = tmp_path / "trial", tmp_path / "strace.log"
    out = subprocess.run(
        ["strace", "-f", "-qq", "-y", "-o", str(log), "-e",
         "trace=access,faccessat,faccessat2," + ",".join(_SYSCALL_KIND),
         sys.executable, str(Path(__file__).with_name("strace_op.py")), name, str(root)],
        capture_output=True, text=True, timeout=120, check=True)
    counted = json.loads(out.stdout)
    seen: list[str] = []
    inside = False
    for line in log.read_text().splitlines():
        if "/blocktrail-mark-begin" in line:
            inside = True
        elif "/blocktrail-mark-end" in line:
            inside = False
        match = re.match(r"\d+\s+(\w+)\((.*)", line)
        if inside and match and match.group(1) in _SYSCALL_KIND and str(root) in match.group(2):
            seen.append(_SYSCALL_KIND[match.group(1)])
    expected = [p.split()[0].replace("fsync-dir", "fsync") for p in counted]
    expected = [k for k in expected if k != "create"]  # strace's openat is not traced
    assert seen, "strace saw no mutation of the disk's files"
    assert sorted(seen) == sorted(expected), (seen, counted)
