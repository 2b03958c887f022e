"""Key files that are damaged, foreign or crafted, and key commands that run at the same time:
a repository opens with any password that is still right, every failure is a typed error that
names the file at fault, and no interleaving of key commands leaves a repository without a key.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from blocktrail.errors import BlocktrailError
from blocktrail.repo import Encryption, Repository, layout
from blocktrail.repo.crypto import KdfFailure, KdfParams
from blocktrail.repo.errors import (
    AuthenticationFailed,
    DowngradeRefused,
    PasswordInUse,
    RepositoryError,
    WrongPassword,
)
from blocktrail.repo.keys import TEST_KDF
from s3server import TEST_ENCRYPTION, TEST_PASSWORD, RepoTarget

CS = 64 * 1024
SECOND = "second-password"


@pytest.fixture(scope="module")
def two_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """An encrypted repository with one restore point and two key files: TEST_PASSWORD's
    (made first) and SECOND's. -> (path, first key id, second key id)."""
    path = tmp_path_factory.mktemp("keys") / "golden"
    with Repository.init(path, encryption=TEST_ENCRYPTION) as repo:
        writer = repo.begin("d", 2 * CS, None)
        writer.put_chunk(0, b"\x07" * CS)
        writer.commit(kind="full", change_id=None)
        first = str(repo.key_id)
        second = repo.add_key(SECOND, TEST_KDF).id
    return path, first, second


def copy_of(two_keys: tuple[Path, str, str], dest: Path) -> tuple[Path, str, str]:
    path, first, second = two_keys
    shutil.copytree(path, dest)
    return dest, first, second


def edit_key(path: Path, key_id: str, change: Callable[[dict[str, Any]], None]) -> Path:
    file = path / layout.key_file(key_id)
    body = json.loads(file.read_text())
    change(body)
    file.chmod(0o644)
    file.write_text(json.dumps(body))
    return file


def edit_config(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    file = path / "config.json"
    body = json.loads(file.read_text())
    change(body)
    file.chmod(0o644)
    file.write_text(json.dumps(body))


def opens_with(path: Path, password: str) -> str | None:
    with Repository.open(path, password=password) as repo:
        return repo.key_id


# ------------------------------------------------------------------------------ crafted KDFs

def test_argon2_refusing_a_salt_is_a_typed_failure() -> None:
    with pytest.raises(KdfFailure, match="argon2id"):
        TEST_KDF.derive(b"password", b"\x00")


@pytest.mark.parametrize("change", [
    lambda body: body["kdf"].update(salt="00"),
    lambda body: body["wrap"].update(nonce="00"),
    lambda body: body["kdf"].update(memory_kib=32 << 20),
], ids=["short-salt", "short-nonce", "32-GiB"])
def test_a_crafted_key_file_tried_first_does_not_block_opening(
        two_keys: tuple[Path, str, str], tmp_path: Path,
        change: Callable[[dict[str, Any]], None]) -> None:
    """A key file someone made to look oldest, with a salt argon2id refuses or 32 GiB of
    memory (past the 16 GiB any key file may ask for): the repository still opens with a
    right password, and the crafted file is named when nothing opens."""
    path, first, second = copy_of(two_keys, tmp_path / "r")
    edit_key(path, second, lambda body: (body.update(created_at="1970-01-01T00:00:00+00:00"),
                                         change(body)))
    assert opens_with(path, TEST_PASSWORD) == first
    with pytest.raises(WrongPassword, match=rf"key file keys/{second}\.json is damaged"):
        opens_with(path, SECOND)


def test_the_cheapest_key_file_is_tried_first(two_keys: tuple[Path, str, str], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A key file with costly (but allowed) parameters, made to look oldest, is not derived
    before a cheap one that opens."""
    path, first, second = copy_of(two_keys, tmp_path / "r")
    costly = KdfParams(time_cost=100, memory_kib=1 << 20, parallelism=1)
    edit_key(path, second, lambda body: (body.update(created_at="1970-01-01T00:00:00+00:00"),
                                         body["kdf"].update(costly.to_json())))
    derived: list[KdfParams] = []
    real = KdfParams.derive

    def spy(self: KdfParams, password: bytes, salt: bytes) -> bytes:
        derived.append(self)
        if self == costly:
            raise AssertionError("the costly key file was derived first")
        return real(self, password, salt)

    monkeypatch.setattr(KdfParams, "derive", spy)
    assert opens_with(path, TEST_PASSWORD) == first
    assert derived == [TEST_KDF]


# ------------------------------------------------------------------------------ repository IDs

def test_new_key_files_record_their_repository(two_keys: tuple[Path, str, str]) -> None:
    path, first, second = two_keys
    repo_id = json.loads((path / "config.json").read_text())["repo_id"]
    for key_id in (first, second):
        assert json.loads((path / layout.key_file(key_id)).read_text())["repo_id"] == repo_id


@pytest.mark.parametrize("recorded", ["\x1b]0;owned\x07", "", 7, "a" * 65])
def test_a_recorded_repository_id_that_is_none_makes_the_key_file_damaged(
        two_keys: tuple[Path, str, str], tmp_path: Path, recorded: object) -> None:
    """What a key file records goes into messages: a terminal escape, an empty or overlong
    one or another type is a damaged key file, named as such, never printed raw."""
    path, first, second = copy_of(two_keys, tmp_path / "r")
    edit_key(path, second, lambda body: body.update(repo_id=recorded))
    assert opens_with(path, TEST_PASSWORD) == first
    with pytest.raises(WrongPassword, match=rf"key file keys/{second}\.json is damaged") as e:
        opens_with(path, SECOND)
    assert "\x1b" not in e.value.message


def test_a_changed_repository_id_is_an_authentication_failure(
        two_keys: tuple[Path, str, str], tmp_path: Path) -> None:
    path, _, _ = copy_of(two_keys, tmp_path / "r")
    edit_config(path, lambda body: body.update(repo_id="0" * 32))
    for password in (TEST_PASSWORD, "not-a-password"):  # the password cannot be judged
        with pytest.raises(AuthenticationFailed, match="another repository") as caught:
            opens_with(path, password)
        assert not isinstance(caught.value, WrongPassword)


def test_a_key_file_copied_in_from_another_repository_stops_nothing(
        two_keys: tuple[Path, str, str], tmp_path: Path) -> None:
    """Another repository's key file of the same password, copied into keys/ and made to be
    tried first, opens nothing here: the repository's own key file still opens; without it,
    opening names the foreign key file (AuthenticationFailed, not WrongPassword)."""
    path, first, _ = copy_of(two_keys, tmp_path / "r")
    with Repository.init(tmp_path / "other", encryption=TEST_ENCRYPTION) as other:
        foreign = str(other.key_id)
    copied = path / layout.key_file(foreign)
    copied.write_bytes((tmp_path / "other" / layout.key_file(foreign)).read_bytes())
    edit_key(path, foreign, lambda body: body.update(created_at="1970-01-01T00:00:00+00:00"))
    assert opens_with(path, TEST_PASSWORD) == first
    (path / layout.key_file(first)).unlink()
    with pytest.raises(AuthenticationFailed, match=rf"key file keys/{foreign}\.json") as caught:
        opens_with(path, TEST_PASSWORD)
    assert not isinstance(caught.value, WrongPassword)


def test_a_config_without_its_repository_id_is_damaged(two_keys: tuple[Path, str, str],
                                                       tmp_path: Path) -> None:
    path, _, _ = copy_of(two_keys, tmp_path / "r")
    edit_config(path, lambda body: body.pop("repo_id"))
    with pytest.raises(RepositoryError, match=r"repository ID \(repo_id\) is missing"):
        opens_with(path, TEST_PASSWORD)


def test_key_files_made_before_the_repository_id_was_recorded_keep_opening(
        two_keys: tuple[Path, str, str], tmp_path: Path) -> None:
    path, first, second = copy_of(two_keys, tmp_path / "r")
    for key_id in (first, second):
        edit_key(path, key_id, lambda body: body.pop("repo_id"))
    assert opens_with(path, TEST_PASSWORD) == first
    assert opens_with(path, SECOND) == second
    with pytest.raises(WrongPassword):
        opens_with(path, "not-a-password")


# ------------------------------------------------------------------------------ damaged files

@pytest.mark.parametrize("damage", ["truncated", "time-cost-0"])
def test_a_damaged_key_file_is_named_when_no_key_opens(two_keys: tuple[Path, str, str],
                                                       tmp_path: Path, damage: str) -> None:
    path, first, second = copy_of(two_keys, tmp_path / "r")
    if damage == "truncated":
        file = path / layout.key_file(second)
        file.chmod(0o644)
        file.write_bytes(file.read_bytes()[:100])
    else:
        edit_key(path, second, lambda body: body["kdf"].update(time_cost=0))
    with pytest.raises(WrongPassword, match=rf"keys/{second}\.json is damaged .*if it was "
                                            "yours, the password may be right"):
        opens_with(path, SECOND)
    with Repository.open(path, password=TEST_PASSWORD) as repo:
        report = repo.check()
        assert [(p.kind, p.name) for p in report.problems] == [
            ("key", layout.key_file(second))]
        repo.remove_key(second)  # a damaged key file opens nothing: it can always go
        assert repo.check().ok
        assert [k.id for k in repo.key_files()] == [first]


# ------------------------------------------------------------------------------ concurrent commands

@pytest.mark.encrypted_s3
def test_two_key_removals_at_once_leave_a_key(target: RepoTarget,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A removes B's key while B removes A's: B's removal runs whole after A has found both
    key files and before A deletes. One of them is refused; the other key still opens."""
    if not target.encrypted:
        pytest.skip("an unencrypted repository has no keys")
    with target.init() as repo:
        first = str(repo.key_id)
        second = repo.add_key(SECOND, TEST_KDF).id
    a, b = target.open(), target.open(password=SECOND)
    outcomes: dict[str, str] = {}

    def remove(repo: Repository, key_id: str) -> None:
        try:
            repo.remove_key(key_id)
            outcomes[key_id] = "removed"
        except BlocktrailError as exc:  # RepositoryBusy, LastKeyRefused: refused
            outcomes[key_id] = type(exc).__name__

    real_delete = a.backend.delete
    armed = [True]

    def the_other_then_delete(name: str, etag: str | None = None) -> None:
        if name.startswith(layout.KEYS) and armed[0]:
            armed[0] = False
            remove(b, first)  # B runs whole between A's listing and A's delete
        real_delete(name, etag)

    monkeypatch.setattr(a.backend, "delete", the_other_then_delete)
    try:
        remove(a, second)
    finally:
        a.close()
        b.close()
    assert not armed[0]
    assert sorted(outcomes.values()).count("removed") == 1, outcomes
    assert len(target.names(layout.KEYS)) == 1
    survivor = TEST_PASSWORD if outcomes[second] == "removed" else SECOND
    with target.open(password=survivor) as repo:
        assert repo.check().ok


def test_a_password_is_one_key_files(two_keys: tuple[Path, str, str], tmp_path: Path) -> None:
    """`key add` and `passwd` refuse a password another key file already opens with (a
    `passwd` would re-wrap one of them and leave the old password working)."""
    path, first, second = copy_of(two_keys, tmp_path / "r")
    with Repository.open(path, password=TEST_PASSWORD) as repo:
        with pytest.raises(PasswordInUse, match=f"already opens key {second}"):
            repo.add_key(SECOND, TEST_KDF)
        with pytest.raises(PasswordInUse, match=f"already opens key {first}"):
            repo.add_key(TEST_PASSWORD, TEST_KDF)
        with pytest.raises(PasswordInUse, match=f"already opens key {second}.*cut short left, "
                           f"finish that: `blocktrail repo key remove {re.escape(str(path))} "
                           f"{first}`, with the new password"):
            repo.change_password(SECOND)
        renewed = repo.change_password(TEST_PASSWORD, KdfParams(2, 1024, 1))  # its own: fine
        assert renewed.kdf.time_cost == 2
    assert len(list((path / "keys").iterdir())) == 2


# ------------------------------------------------------------------------------ downgrades

def stored(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.parts[len(path.parts)] in ("packs", "index", "points")}


def test_a_downgraded_config_writes_nothing_in_the_clear(two_keys: tuple[Path, str, str],
                                                        tmp_path: Path) -> None:
    """The config rewritten as unencrypted and the key files deleted: a backup run with the
    password in its environment writes no plain pack, index file or manifest beside the
    encrypted ones, and check refuses too."""
    path, _, _ = copy_of(two_keys, tmp_path / "r")
    edit_config(path, lambda body: (body.pop("mac"), body.update(version=2, encryption="none")))
    shutil.rmtree(path / "keys")
    (path / "keys").mkdir()
    before = stored(path)
    with Repository.open(path, password=TEST_PASSWORD) as repo:
        with pytest.raises(DowngradeRefused, match="a downgrade"):
            writer = repo.begin("d", CS, None)
            writer.put_chunk(0, b"plain secret".ljust(CS, b"\0"))
            writer.commit(kind="full", change_id=None)
        with pytest.raises(DowngradeRefused):
            repo.check()
        with pytest.raises(DowngradeRefused):
            repo.points()
    assert stored(path) == before


def test_an_unencrypted_repository_with_a_password_set_opens(tmp_path: Path) -> None:
    with Repository.init(tmp_path / "r", encryption=Encryption.none()) as repo:
        writer = repo.begin("d", CS, None)
        writer.put_chunk(0, b"\x01" * CS)
        point = writer.commit(kind="full", change_id=None)
    with Repository.open(tmp_path / "r", password=TEST_PASSWORD) as repo:
        assert repo.point(point.id).id == point.id and repo.check().ok
