"""Key files under SIGKILL: `repo key add`, `passwd` and `remove` killed at every file-system
mutation in turn (`crashpoints.sweep`). After every kill the repository opens with the old or
the new password (never with neither), every key file in it decodes (no partial key file), and
it checks clean; the completed operation leaves exactly what it promised."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from blocktrail.repo import Repository, layout
from blocktrail.repo.errors import WrongPassword
from blocktrail.repo.keys import TEST_KDF, KeyFile
from s3server import TEST_ENCRYPTION, TEST_PASSWORD

sys.path.insert(0, str(Path(__file__).parent))
from crashpoints import Reporter, Trial, sweep

NEW = "new-password"
SECOND = "second-password"


def opens_with(path: Path, password: str) -> bool:
    try:
        with Repository.open(path, password=password) as repo:
            assert repo.check().ok
            return True
    except WrongPassword:
        return False


def key_files_decode(path: Path) -> int:
    """Every key file decodes; -> how many there are (``*.tmp`` leftovers are not key files)."""
    count = 0
    for f in (path / "keys").iterdir():
        if layout.key_id_of(f"keys/{f.name}") is not None:
            KeyFile.from_bytes(f.read_bytes(), f"keys/{f.name}")
            count += 1
    return count


@pytest.mark.parametrize("operation", ["add", "passwd", "remove"])
def test_key_operations_killed_at_every_step(tmp_path: Path, operation: str) -> None:
    golden = tmp_path / "golden"
    with Repository.init(golden, encryption=TEST_ENCRYPTION) as repo:
        first = str(repo.key_id)
        writer = repo.begin("d", 4 * 65536, None)
        writer.put_chunk(1, os.urandom(65536))
        writer.commit(kind="full", change_id=None)
        if operation == "remove":
            repo.add_key(SECOND, TEST_KDF)

    def prepare(reporter: Reporter) -> Any:
        path = tmp_path / f"trial-{os.getpid()}"
        shutil.copytree(golden, path)
        reporter.send("ready", path=str(path))
        return Repository.open(path, password=SECOND if operation == "remove" else TEST_PASSWORD)

    def operate(repo: Any) -> None:
        if operation == "add":
            repo.add_key(NEW, TEST_KDF)
        elif operation == "passwd":
            repo.change_password(NEW)
        else:
            repo.remove_key(first)

    outcomes: set[tuple[bool, bool]] = set()

    def check(trial: Trial) -> None:
        path = Path(trial.events_of("ready")[0]["path"])
        old, new = (SECOND, TEST_PASSWORD) if operation == "remove" else (TEST_PASSWORD, NEW)
        keys = key_files_decode(path)
        works = (opens_with(path, old), opens_with(path, new))
        outcomes.add(works)
        if operation == "remove":
            assert works[0], f"killed at {trial.kill_at}: the key in use is gone"
        else:
            assert any(works), f"killed at {trial.kill_at}: opens with neither password"
        if trial.completed:
            expected = {"add": ((True, True), 2), "passwd": ((False, True), 1),
                        "remove": ((True, False), 1)}[operation]
            assert (works, keys) == expected
        shutil.rmtree(path)

    result = sweep(prepare, operate, check)
    assert result.crash_points >= 2  # the key file's write and rename at least
    assert len(outcomes) >= 2  # both sides of the step were seen
