"""Repository + engine against a model: every listed restore point restores bit-identical to
the disk content at its snapshot, through writes, user snapshots and their consolidation,
resizes, tracker resets, forget/prune, backups that fail part-way (injected I/O errors) and bit
rot in stored objects (found by check, and never restored from or built on again)."""

from __future__ import annotations

import errno
import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from blocktrail.backup.engine import BackupOptions, run_backup
from blocktrail.backup.sources.local import LocalDiskSource
from blocktrail.disk import Disk
from blocktrail.fileio import FileHandle, OsFileIO
from blocktrail.repo import Repository, RetentionPolicy
from blocktrail.repo.errors import RepositoryError
from s3server import TEST_ENCRYPTION, TEST_PASSWORD

CS = 64 * 1024
SIZES = [4 * CS, 6 * CS + 4096, 8 * CS]


class FailAfter(OsFileIO):
    """A repository I/O layer that fails with EIO after ``budget`` operations."""

    def __init__(self, budget: int) -> None:
        self.budget = budget

    def _tick(self) -> None:
        self.budget -= 1
        if self.budget < 0:
            raise OSError(errno.EIO, "injected repository I/O failure")

    def open(self, path: str, *, create: bool = False) -> FileHandle:
        self._tick()
        return super().open(path, create=create)

    def open_read(self, path: str) -> FileHandle:
        self._tick()
        return super().open_read(path)

    def replace_atomic(self, path: str, data: bytes) -> None:
        self._tick()
        super().replace_atomic(path, data)


class BackupMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="bt-model-"))
        self.disk: Disk
        self.expected: dict[str, bytes] = {}  # point id -> disk content at its snapshot
        self.damaged: dict[str, bytes] = {}  # points check found unrestorable after bit rot
        self.rotten: set[tuple[str, int]] = set()  # (pack, offset): a second flip could undo it
        self.user_snapshots = 0

    @initialize(size=st.sampled_from(SIZES))
    def create(self, size: int) -> None:
        self.disk = Disk.create(self.root / "disk", size, 4096, cluster_size=8192)
        Repository.init(self.root / "repo", encryption=TEST_ENCRYPTION).close()

    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        size = self.disk.size_bytes
        offset = data.draw(st.integers(0, size - 1))
        length = data.draw(st.integers(1, min(2 * CS, size - offset)))
        self.disk.pwrite(bytes([data.draw(st.integers(1, 255))]) * length, offset)

    @rule(data=st.data())
    def trim(self, data: st.DataObject) -> None:
        size = self.disk.size_bytes
        offset = data.draw(st.integers(0, size - 1))
        self.disk.trim(data.draw(st.integers(1, size - offset)), offset)

    @rule(full=st.booleans(), audit=st.sampled_from([0.0, 1.0, 100.0]))
    def backup(self, full: bool, audit: float) -> None:
        content = self.disk.pread(self.disk.size_bytes, 0)
        with Repository.open(self.root / "repo", password=TEST_PASSWORD) as repo:
            report = run_backup(LocalDiskSource(self.disk), repo,
                                BackupOptions(force_full=full, audit_percent=audit, seed=1))
        assert report.audit.tracker_trusted, "a correct tracker was caught lying"
        self.expected[report.point.id] = content

    @rule(budget=st.integers(0, 40))
    def failing_backup(self, budget: int) -> None:
        try:
            with Repository.open(self.root / "repo", FailAfter(budget),
                                 password=TEST_PASSWORD) as repo:
                report = run_backup(LocalDiskSource(self.disk), repo)
        except OSError:
            return
        # it finished within the budget: record what it saw (no write happened since)
        self.expected[report.point.id] = self.disk.pread(self.disk.size_bytes, 0)

    @rule()
    def user_snapshot(self) -> None:
        self.user_snapshots += 1
        self.disk.create_snapshot(f"user{self.user_snapshots}")

    @precondition(lambda self: self.disk.snapshots)
    @rule(data=st.data())
    def remove_user_snapshot(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from([s.name for s in self.disk.snapshots]))
        self.disk.remove_snapshot(name)

    @rule(size=st.sampled_from(SIZES))
    def resize(self, size: int) -> None:
        self.disk.resize(size)

    @rule()
    def reset_tracking(self) -> None:
        self.disk.reset_tracking()

    @rule(keep=st.integers(1, 3))
    def forget_and_prune(self, keep: int) -> None:
        with Repository.open(self.root / "repo", password=TEST_PASSWORD) as repo:
            for point in repo.forget(RetentionPolicy(keep_last=keep)):
                self.expected.pop(point.id, None)
                self.damaged.pop(point.id, None)
            try:
                repo.prune()
            except RepositoryError:  # a damaged page or table a point needs: prune refuses
                assert self.damaged

    @rule(pick=st.integers(0, 1 << 16), trailer=st.booleans(), where=st.integers(0, 1 << 16),
          mask=st.integers(1, 255))
    def bit_rot(self, pick: int, trailer: bool, where: int, mask: int) -> None:
        """One byte of one stored object (or of a pack trailer) changes: check --read-data
        finds it, and the points it names refuse to restore from then on."""
        with Repository.open(self.root / "repo", password=TEST_PASSWORD) as repo:
            # in digest order, the same in every replay (pack ids are random)
            copies = [loc for _, loc in sorted(repo.index.items())]
            if not copies:
                return
            loc = copies[pick % len(copies)]
            pack = Path(repo.pack_path(loc.pack_id))
            size = pack.stat().st_size
            with open(pack, "rb") as f:
                f.seek(size - 8)
                count = int.from_bytes(f.read(4), "little")
            start = size - 8 - count * 48  # where the trailer starts (if it is not damaged)
            if trailer and 0 <= start < size:
                offset = start + where % (size - start)
            else:
                offset = loc.offset + where % loc.length
            if (loc.pack_id, offset) in self.rotten:
                return
            self.rotten.add((loc.pack_id, offset))
            with open(pack, "r+b") as f:
                f.seek(offset)
                byte = f.read(1)[0]
                f.seek(offset)
                f.write(bytes([byte ^ mask]))
            report = repo.check(read_data=True)
        assert not report.ok, f"a changed byte at {offset} of pack {loc.pack_id} went unseen"
        for point_id in report.affected_points:
            if point_id in self.expected:
                self.damaged[point_id] = self.expected.pop(point_id)

    @invariant()
    def every_point_restores(self) -> None:
        if not hasattr(self, "disk"):
            return
        with Repository.open(self.root / "repo", password=TEST_PASSWORD) as repo:
            assert {p.id for p in repo.points()} == set(self.expected) | set(self.damaged)
            assert repo.check().affected_points <= set(self.damaged)
            for point_id, content in self.expected.items():
                target = self.root / "restore.raw"
                repo.restore(point_id, str(target))
                assert target.read_bytes() == content, f"restore point {point_id} differs"
                target.unlink()
            for point_id, content in self.damaged.items():
                target = self.root / "restore.raw"
                try:
                    repo.restore(point_id, str(target))
                except RepositoryError:
                    continue
                # a backup stored its lost content again: then it must restore exactly
                assert target.read_bytes() == content, f"restore point {point_id} differs"
                target.unlink()

    def teardown(self) -> None:
        if hasattr(self, "disk") and not self.disk.closed:
            self.disk.close()
        shutil.rmtree(self.root, ignore_errors=True)


TestBackupMachine = BackupMachine.TestCase
TestBackupMachine.settings = settings(max_examples=min(settings.default.max_examples, 150),
                                      stateful_step_count=20)
