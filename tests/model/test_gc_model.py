"""Garbage collection beside running writers, against a model: writers that each opened the
repository on their own (as separate processes do), began and stored their chunks at one moment
and commit or give up at another, interleaved with forgets and prunes. Chunk contents come from
a small pool, so identical chunks, pages and page tables are stored again and deduplicated all
the time, also against copies in condemned packs. After every prune, and at the end, every
restore point that was committed and not forgotten restores bit-identical, and `check` passes.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, rule

from blocktrail.repo import Encryption, Repository
from blocktrail.repo.writer import PointWriter

CS = 64 * 1024
CHUNKS = 2
POOL = [random.Random(i).randbytes(CS) for i in range(3)]
CONTENTS = st.lists(st.sampled_from([None, 0, 1, 2]), min_size=CHUNKS, max_size=CHUNKS)


class GcMachine(RuleBasedStateMachine):
    writers = Bundle("writers")

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="bt-gc-model-"))
        self.path = self.root / "repo"
        self.open: dict[int, tuple[Repository, PointWriter, bytes]] = {}
        self.expected: dict[str, bytes] = {}  # committed, not forgotten: point -> content
        self.serial = 0

    @initialize()
    def create(self) -> None:
        Repository.init(self.path, encryption=Encryption.none()).close()

    @rule(target=writers, contents=CONTENTS)
    def begin(self, contents: list[int | None]) -> int:
        """A writer opens the repository (reads the index now) and stores its chunks."""
        self.serial += 1
        repo = Repository.open(self.path)
        writer = repo.begin(f"d{self.serial}", CHUNKS * CS, None)
        content = b"".join(bytes(CS) if c is None else POOL[c] for c in contents)
        for i in range(CHUNKS):
            writer.put_chunk(i, content[i * CS : (i + 1) * CS])
        self.open[self.serial] = repo, writer, content
        return self.serial

    @rule(serial=consumes(writers))
    def commit(self, serial: int) -> None:
        repo, writer, content = self.open.pop(serial)
        try:
            point = writer.commit(kind="full", change_id=None)
        finally:
            repo.close()
        self.expected[point.id] = content

    @rule(serial=consumes(writers))
    def give_up(self, serial: int) -> None:
        repo, writer, _ = self.open.pop(serial)
        writer.close()
        repo.close()

    @rule(data=st.data())
    def forget(self, data: st.DataObject) -> None:
        if not self.expected:
            return
        point_id = data.draw(st.sampled_from(sorted(self.expected)))
        with Repository.open(self.path) as repo:
            repo.delete_manifest(point_id)
        del self.expected[point_id]

    @rule()
    def prune(self) -> None:
        with Repository.open(self.path) as repo:
            repo.prune()
        self._all_restore()

    def _all_restore(self) -> None:
        with Repository.open(self.path) as repo:
            for point_id, content in self.expected.items():
                target = self.root / "restored.raw"
                repo.restore(point_id, str(target))
                assert target.read_bytes() == content, f"restore point {point_id} differs"
                target.unlink()

    def teardown(self) -> None:
        try:
            if hasattr(self, "open"):
                for serial in list(self.open):
                    self.commit(serial)
                with Repository.open(self.path) as repo:
                    repo.prune()
                    repo.prune()  # the writers are gone: what waited is decided
                    report = repo.check(read_data=True)
                    assert report.ok, report.problems
                self._all_restore()
        finally:
            for repo, _writer, _content in getattr(self, "open", {}).values():
                repo.close()
            shutil.rmtree(self.root, ignore_errors=True)


TestGcMachine = GcMachine.TestCase
TestGcMachine.settings = settings(max_examples=min(settings.default.max_examples, 100),
                                  stateful_step_count=25)
