"""Encrypted repositories: the envelope byte for byte (known answers, and golden files that must
keep decoding), round trips of every object type, tampering with every object type (check
reports an authentication failure, restore refuses and writes nothing), wrong passwords, key
files, the decoders fuzzed, and nonces unique across concurrent writer processes."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from blake3 import blake3
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import given
from hypothesis import strategies as st

from blocktrail.errors import BlocktrailError, ExitCode
from blocktrail.repo import Encryption, Repository, layout
from blocktrail.repo import index as index_file
from blocktrail.repo.crypto import AES_GCM, CHACHA20_POLY1305, KdfParams, MasterKeys, make_aead
from blocktrail.repo.errors import (
    AuthenticationFailed,
    ChunkCorrupt,
    ManifestAuthenticationFailed,
    ObjectAuthenticationFailed,
    PasswordRequired,
    RepositoryError,
    WrongPassword,
)
from blocktrail.repo.keys import TEST_KDF, KeyFile, open_key
from blocktrail.repo.manifest import RestorePoint
from blocktrail.repo.objects import (
    HEADER_ENCRYPTED,
    KIND_CHUNK,
    KIND_INDEX,
    KIND_MANIFEST,
    KIND_PAGE,
    KIND_TABLE,
    KIND_VERIFY,
    SEALED_HEADER,
    EncryptedCodec,
)
from blocktrail.repo.packs import PackBuilder, read_trailer
from s3server import TEST_ENCRYPTION, TEST_PASSWORD

CS = 64 * 1024
DATA = Path(__file__).parents[2] / "data" / "repo"
KEYS = MasterKeys(bytes(range(32)), bytes(range(32, 64)))
SALT = bytes(range(100, 116))
NONCE = (7).to_bytes(12, "big")
PLAIN = bytes(range(200))  # zstd does not shrink it: stored as it is


def unwrap(key: KeyFile, password: bytes, repo_id: str) -> MasterKeys | None:
    """The master keys, or None when the password is not this key file's (for ``repo_id``)."""
    opened = open_key(key, password, repo_id)
    return opened[0] if opened is not None and opened[1] == repo_id else None


def fixed_codec(cipher: int) -> EncryptedCodec:
    """A codec whose next message uses SALT and NONCE (a known-answer test only)."""
    codec = EncryptedCodec(KEYS, cipher)
    aead = make_aead(cipher, KEYS.session_key(SALT))
    codec.sessions.next = lambda: (SALT, NONCE, aead)  # type: ignore[method-assign]
    return codec


# ------------------------------------------------------------------------------ known answers

@pytest.mark.parametrize("cipher, aead_type, golden", [
    (AES_GCM, AESGCM, "envelope-v2-aes-256-gcm.hex"),
    (CHACHA20_POLY1305, ChaCha20Poly1305, "envelope-v2-chacha20-poly1305.hex")])
def test_envelope_known_answer(cipher: int, aead_type: type, golden: str) -> None:
    """The envelope as docs/repository.md specifies it, computed here from the primitives."""
    name, envelope = fixed_codec(cipher).seal(KIND_CHUNK, PLAIN)
    assert name == blake3(PLAIN, key=KEYS.id_key).digest()
    session_key = blake3(KEYS.data_key + SALT,
                         derive_key_context="blocktrail 2026-11-30 session key v1").digest()
    header = (b"BTOB" + bytes([2, KIND_CHUNK, 0, cipher]) + len(PLAIN).to_bytes(4, "little")
              + (len(PLAIN) + 16).to_bytes(4, "little") + name + SALT + NONCE)
    assert len(header) == HEADER_ENCRYPTED.size == 76
    assert envelope == header + aead_type(session_key).encrypt(NONCE, PLAIN, header)
    assert envelope.hex() == (DATA / golden).read_text().strip()  # the golden file
    assert EncryptedCodec(KEYS, cipher).open(envelope, KIND_CHUNK, name, "x") == PLAIN


def test_sealed_file_known_answer() -> None:
    codec = fixed_codec(AES_GCM)
    name = "points/20261124T211502118Z-3f9a0c1e.json"
    sealed = codec.seal_file(KIND_MANIFEST, name, PLAIN)
    session_key = blake3(KEYS.data_key + SALT,
                         derive_key_context="blocktrail 2026-11-30 session key v1").digest()
    header = b"BTSF" + bytes([1, KIND_MANIFEST, 0, AES_GCM]) + SALT + NONCE
    assert len(header) == SEALED_HEADER.size == 36
    assert sealed == header + AESGCM(session_key).encrypt(NONCE, PLAIN, header + name.encode())
    assert sealed.hex() == (DATA / "sealed-manifest-v1.hex").read_text().strip()
    assert EncryptedCodec(KEYS, AES_GCM).open_file(KIND_MANIFEST, name, sealed, name) == PLAIN


def test_golden_key_file_opens_with_its_password() -> None:
    """tests/data/repo/key-v1.json wraps KEYS with password "golden" (repo id "golden-repo")."""
    path = DATA / "key-v1.json"
    key = KeyFile.from_bytes(path.read_bytes(), layout.key_file(json.loads(
        path.read_text())["id"]))
    assert unwrap(key, b"golden", "golden-repo") == KEYS
    assert unwrap(key, b"Golden", "golden-repo") is None
    assert unwrap(key, b"golden", "another-repo") is None  # bound to its repository


def test_object_kinds_and_names_are_bound() -> None:
    codec = EncryptedCodec(KEYS, AES_GCM)
    name, envelope = codec.seal(KIND_PAGE, PLAIN)
    assert name != codec.name(KIND_CHUNK, PLAIN) != blake3(PLAIN).digest()
    with pytest.raises(ObjectAuthenticationFailed, match="authentication failed"):
        codec.open(envelope, KIND_TABLE, name, "x")  # another role
    with pytest.raises(ObjectAuthenticationFailed):
        codec.open(envelope, KIND_PAGE, codec.name(KIND_PAGE, b"other"), "x")  # another name
    sealed = codec.seal_file(KIND_INDEX, "index/a.idx", PLAIN)
    with pytest.raises(AuthenticationFailed):
        codec.open_file(KIND_INDEX, "index/b.idx", sealed, "x")  # renamed
    with pytest.raises(AuthenticationFailed):
        codec.open_file(KIND_VERIFY, "index/a.idx", sealed, "x")  # another kind
    other = EncryptedCodec(MasterKeys.generate(), AES_GCM)
    with pytest.raises(ObjectAuthenticationFailed):
        other.open(envelope, KIND_PAGE, name, "x")  # another repository's key


# ------------------------------------------------------------------------------ fuzzing

@given(st.binary(max_size=300))
def test_fuzz_envelope_decoder_raises_only_typed_errors(data: bytes) -> None:
    codec = EncryptedCodec(KEYS, AES_GCM)
    with pytest.raises(ObjectAuthenticationFailed):
        codec.open(data, KIND_CHUNK, bytes(32), "fuzz")
    codec.envelope_at(data, 0)  # a plausibility test: never raises
    with pytest.raises(AuthenticationFailed):
        codec.open_file(KIND_MANIFEST, "points/x.json", data, "fuzz")


@given(st.data())
def test_fuzz_every_change_to_an_envelope_fails_authentication(data: st.DataObject) -> None:
    codec = EncryptedCodec(KEYS, data.draw(st.sampled_from([AES_GCM, CHACHA20_POLY1305])))
    kind = data.draw(st.sampled_from([KIND_CHUNK, KIND_PAGE, KIND_TABLE]))
    plain = data.draw(st.binary(min_size=1, max_size=200))
    name, envelope = codec.seal(kind, plain)
    changed = bytearray(envelope)
    how = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
    if how == "flip":
        at = data.draw(st.integers(0, len(changed) - 1))
        changed[at] ^= data.draw(st.integers(1, 255))
    elif how == "truncate":
        del changed[data.draw(st.integers(0, len(changed) - 1)):]
    else:
        changed += data.draw(st.binary(min_size=1, max_size=20))
    with pytest.raises(ObjectAuthenticationFailed):
        codec.open(bytes(changed), kind, name, "fuzz")


@given(st.binary(max_size=400))
def test_fuzz_key_file_and_trailer_decoders(data: bytes) -> None:
    try:
        key = KeyFile.from_bytes(data, "keys/0123456789abcdef.json")
        unwrap(key, b"x", "r")
    except RepositoryError:
        pass
    with pytest.raises(ChunkCorrupt):
        read_trailer(data, "fuzz", pack_id="00" * 16, trailer_key=bytes(32))


@given(st.binary(min_size=1, max_size=120))
def test_fuzz_key_file_json_fields(junk: bytes) -> None:
    good = json.loads((DATA / "key-v1.json").read_text())
    where = layout.key_file(good["id"])
    for field in ("kdf", "wrap", "id"):  # created_at and host are free text
        broken = dict(good, **{field: junk.decode("latin-1")})
        with pytest.raises(RepositoryError):
            KeyFile.from_bytes(json.dumps(broken).encode(), where)


def test_pack_trailer_is_authenticated_with_its_pack_id() -> None:
    codec = EncryptedCodec(KEYS, AES_GCM)
    builder = PackBuilder(codec.trailer_key)
    name, envelope = codec.seal(KIND_CHUNK, PLAIN)
    builder.add(name, envelope, len(PLAIN))
    data = bytes(builder.finish())
    assert read_trailer(data, "p", pack_id=builder.pack_id,
                        trailer_key=codec.trailer_key) == [(name, 0, len(envelope))]
    with pytest.raises(ObjectAuthenticationFailed):
        read_trailer(data, "p", pack_id="ff" * 16, trailer_key=codec.trailer_key)  # renamed
    flipped = bytearray(data)
    flipped[len(envelope) + 40] ^= 1  # the entry's offset
    with pytest.raises(ObjectAuthenticationFailed):
        read_trailer(bytes(flipped), "p", pack_id=builder.pack_id,
                     trailer_key=codec.trailer_key)


# ------------------------------------------------------------------------------ a repository

def image(seed: int, chunks: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(CS) for _ in range(chunks)]


def store(repo: Repository, disk_id: str, chunks: dict[int, bytes], size_chunks: int,
          parent: str | None = None) -> RestorePoint:
    writer = repo.begin(disk_id, size_chunks * CS, parent)
    for i, data in chunks.items():
        writer.put_chunk(i, data)
    return writer.commit(kind="incremental" if parent else "full", change_id=None)


class Golden:
    """An encrypted repository: A (full of disk d), B (an incremental of A: chunks 2 and 3
    changed, and chunk 5 added), C (disk e). B's new chunks, page and table are B's alone."""

    def __init__(self, root: Path) -> None:
        self.path = root / "golden"
        self.a_chunks = image(1, 6)
        self.changed = dict(enumerate(image(2, 6)))
        with Repository.init(self.path, encryption=TEST_ENCRYPTION) as repo:
            self.a = store(repo, "d", dict(enumerate(self.a_chunks)), 6)
            self.b = store(repo, "d", {2: self.changed[2], 3: self.changed[3]}, 6, self.a.id)
            self.c = store(repo, "e", dict(enumerate(image(3, 2))), 2)
            repo.record_verify(self.a.id, "ok")
            self.b_only = repo.chunk_digests(self.b.id, [2, 3])
            self.b_page = repo.pages_of(self.b)[0]
            self.b_index = next(n for n in repo.index_files()
                                if self.b_only[2] in _index_of(repo, n))

    def copy(self, dest: Path) -> Path:
        shutil.copytree(self.path, dest)
        return dest

    @property
    def b_image(self) -> bytes:
        return b"".join(self.changed[i] if i in (2, 3) else self.a_chunks[i] for i in range(6))


def _index_of(repo: Repository, filename: str) -> dict[bytes, object]:
    name = layout.index_file(filename)
    return dict(index_file.decode(repo.codec.open_file(
        KIND_INDEX, name, repo.backend.load(name), name), name))


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Golden:
    return Golden(tmp_path_factory.mktemp("encrypted"))


def open_repo(path: Path) -> Repository:
    return Repository.open(path, password=TEST_PASSWORD)


def files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and not str(p.relative_to(path)).startswith("locks/")}


def test_round_trip_of_every_object_type(golden: Golden, tmp_path: Path) -> None:
    path = golden.copy(tmp_path / "r")
    with open_repo(path) as repo:
        assert repo.encrypted and repo.codec.cipher_name in ("aes-256-gcm", "chacha20-poly1305")
        report = repo.check(read_data=True)  # chunks, pages, tables, index files, trailers
        assert report.ok and report.points == 3, report.problems
        assert [p.id for p in repo.points()] == [golden.a.id, golden.b.id, golden.c.id]
        assert repo.point(golden.a.id).verify_state == "ok"  # a sealed verify record
        repo.restore(golden.b.id, str(tmp_path / "b.raw"))
        assert (tmp_path / "b.raw").read_bytes() == golden.b_image
        info = repo.encryption_info()
        assert info["kdf"] == "argon2id" and len(info["key_files"]) == 1
    config = json.loads((path / "config.json").read_text())
    assert config["version"] == 3 and config["encryption"]["chunk_ids"] == "blake3-keyed"
    for name, data in files(path).items():  # nothing of the disks is in the clear
        assert golden.a_chunks[0][:64] not in data, name
        assert b'"disk_id"' not in data or name.startswith(("leases/", "keys/")), name
        if name.startswith(("points/", "index/", "verify/")):
            assert data[:4] == b"BTSF", name


def test_chunk_ids_are_keyed_per_repository(tmp_path: Path) -> None:
    chunk = image(9, 1)[0]
    names = []
    for n in range(2):
        with Repository.init(tmp_path / str(n), encryption=TEST_ENCRYPTION) as repo:
            point = store(repo, "d", {0: chunk}, 1)
            names.append(repo.chunk_digests(point.id, [0])[0])
    assert names[0] != names[1] and blake3(chunk).digest() not in names


# ------------------------------------------------------------------------------ tampering

ENVELOPE_SPOTS = {"magic": 0, "version": 4, "kind": 5, "codec": 6, "cipher": 7,
                  "plain length": 9, "stored length": 13, "name (associated data)": 20,
                  "salt": 50, "nonce": 70, "ciphertext": 80, "tag": -3}


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _twin(path: Path) -> Path:
    """A copy of a tampered repository: restore and check each see the tampering first (the
    first to find a damaged copy puts it in quarantine)."""
    twin = path.with_name(path.name + "-twin")
    shutil.copytree(path, twin)
    return twin


def _refused(path: Path, point_id: str, target: Path,
             error: type[Exception] = AuthenticationFailed) -> None:
    """restore refuses with the authentication error and leaves nothing at the target."""
    with open_repo(path) as repo, pytest.raises(error) as caught:
        repo.restore(point_id, str(target))
    assert caught.value.exit_code == ExitCode.AUTHENTICATION_FAILED  # type: ignore[attr-defined]
    assert "authentication failed" in str(caught.value)
    assert not target.exists()


def _check_reports(path: Path, kind: str, point_id: str | None) -> None:
    with open_repo(path) as repo:
        report = repo.check(read_data=True)
    wanted = [p for p in report.problems if p.kind == kind and p.authentication]
    assert wanted, report.problems
    assert all(p.cause == "authentication" and p.to_json()["cause"] == "authentication"
               for p in wanted)
    if point_id is not None:
        assert point_id in report.affected_points


@pytest.mark.parametrize("what", ["chunk", "page", "table"])
@pytest.mark.parametrize("spot", list(ENVELOPE_SPOTS))
def test_a_changed_envelope_fails_authentication(golden: Golden, tmp_path: Path, what: str,
                                                 spot: str) -> None:
    path = golden.copy(tmp_path / "r")
    with open_repo(path) as repo:
        name = {"chunk": golden.b_only[2], "page": bytes.fromhex(golden.b_page),
                "table": bytes.fromhex(golden.b.tables[0])}[what]
        assert name is not None
        loc = repo.index[name]
    offset = ENVELOPE_SPOTS[spot]
    _flip(path / layout.pack(loc.pack_id), loc.offset + (offset if offset >= 0
                                                         else loc.length + offset))
    _refused(_twin(path), golden.b.id, tmp_path / "b.raw")
    _check_reports(path, what, golden.b.id)
    with open_repo(path) as repo:  # A shares none of it: still restores
        repo.restore(golden.a.id, str(tmp_path / "a.raw"))
    assert (tmp_path / "a.raw").read_bytes() == b"".join(golden.a_chunks)


def test_chunks_swapped_fail_authentication(golden: Golden, tmp_path: Path) -> None:
    path = golden.copy(tmp_path / "r")
    with open_repo(path) as repo:
        x, y = (repo.index[golden.b_only[i]] for i in (2, 3))  # type: ignore[index]
    assert x.pack_id == y.pack_id and x.length == y.length
    pack = path / layout.pack(x.pack_id)
    data = bytearray(pack.read_bytes())
    ex, ey = data[x.offset : x.offset + x.length], data[y.offset : y.offset + y.length]
    data[x.offset : x.offset + x.length], data[y.offset : y.offset + y.length] = ey, ex
    pack.write_bytes(bytes(data))
    _refused(_twin(path), golden.b.id, tmp_path / "b.raw")
    _check_reports(path, "chunk", golden.b.id)


def test_a_changed_pack_trailer_fails_authentication(golden: Golden, tmp_path: Path) -> None:
    path = golden.copy(tmp_path / "r")
    with open_repo(path) as repo:
        loc = repo.index[golden.b_only[2]]  # type: ignore[index]
    pack = path / layout.pack(loc.pack_id)
    _flip(pack, pack.stat().st_size - 8 - 32 - 48 + 40)  # the last entry's zero field
    with open_repo(path) as repo:
        report = repo.check()
    assert any(p.kind == "pack" and p.authentication for p in report.problems)


@pytest.mark.parametrize("how", ["flipped", "renamed"])
def test_a_changed_or_renamed_index_file_fails_authentication(golden: Golden, tmp_path: Path,
                                                              how: str) -> None:
    path = golden.copy(tmp_path / "r")
    index = path / layout.index_file(golden.b_index)
    if how == "flipped":
        _flip(index, 40)
    else:
        index.rename(path / layout.index_file("0" * 32 + ".idx"))
    _refused(_twin(path), golden.b.id, tmp_path / "b.raw")
    _check_reports(path, "index", None)


@pytest.mark.parametrize("how", ["flipped", "another point's", "an older point's",
                                 "renamed"])
def test_a_changed_or_substituted_manifest_fails_authentication(golden: Golden,
                                                                tmp_path: Path,
                                                                how: str) -> None:
    """B's manifest flipped; replaced by C's (another disk), or by A's (the same disk, older:
    a rollback); or moved to another name."""
    path = golden.copy(tmp_path / "r")
    manifest = path / layout.manifest(golden.b.id)
    victim = golden.b.id
    if how == "flipped":
        _flip(manifest, 100)
    elif how == "another point's":
        manifest.write_bytes((path / layout.manifest(golden.c.id)).read_bytes())
    elif how == "an older point's":
        manifest.write_bytes((path / layout.manifest(golden.a.id)).read_bytes())
    else:
        victim = "20991231T235959999Z-00000000"
        manifest.rename(path / layout.manifest(victim))
    _refused(_twin(path), victim, tmp_path / "x.raw", ManifestAuthenticationFailed)
    _check_reports(path, "manifest", victim)
    with open_repo(path) as repo:
        assert victim not in {p.id for p in repo.points()}  # never listed, never a base


def test_a_verify_record_rolled_back_fails_authentication(golden: Golden,
                                                          tmp_path: Path) -> None:
    """A's newest verify record says failed; the older one (ok) copied over it: refused, the
    point counts as failed (never a base)."""
    path = golden.copy(tmp_path / "r")
    with open_repo(path) as repo:
        repo.record_verify(golden.a.id, "failed")
        old, new = repo.verify_records()[golden.a.id]
    (path / new).write_bytes((path / old).read_bytes())
    with open_repo(path) as repo:
        assert repo.point(golden.a.id).verify_state == "failed"
    _check_reports(path, "verify", None)


def test_a_changed_config_is_refused(golden: Golden, tmp_path: Path) -> None:
    path = golden.copy(tmp_path / "r")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(config, chunk_size=4096)))
    with pytest.raises(AuthenticationFailed, match="config"):
        open_repo(path)
    downgraded = {k: v for k, v in config.items() if k != "mac"} | {"encryption": "none"}
    (path / "config.json").write_text(json.dumps(downgraded))
    with pytest.raises(AuthenticationFailed, match="downgrade"):
        Repository.open(path)


# ------------------------------------------------------------------------------ passwords, keys

def test_wrong_or_missing_password_writes_nothing(golden: Golden, tmp_path: Path) -> None:
    path = golden.copy(tmp_path / "r")
    before = files(path)
    with pytest.raises(WrongPassword, match="wrong password") as caught:
        Repository.open(path, password="not-it")
    assert caught.value.exit_code == ExitCode.UNAUTHORIZED
    with pytest.raises(PasswordRequired):
        Repository.open(path)
    with pytest.raises(PasswordRequired):
        Repository.open(path, password=lambda: None)
    assert files(path) == before


def test_keys_add_list_remove_passwd(golden: Golden, tmp_path: Path) -> None:
    path = golden.copy(tmp_path / "r")
    with open_repo(path) as repo:
        first = repo.key_id
        second = repo.add_key("second", TEST_KDF)
        assert {k.id for k in repo.key_files()} == {first, second.id}
        with pytest.raises(BlocktrailError, match="opened the repository with"):
            repo.remove_key(str(first))
    with Repository.open(path, password="second") as repo:
        assert repo.key_id == second.id
        repo.remove_key(str(first))
        with pytest.raises(BlocktrailError, match="opened the repository with"):
            repo.remove_key(second.id)
        new = repo.change_password("third")
        assert [k.id for k in repo.key_files()] == [new.id]
        assert new.kdf == TEST_KDF  # the parameters of the key it replaces
    for wrong in (TEST_PASSWORD, "second"):
        with pytest.raises(WrongPassword):
            Repository.open(path, password=wrong)
    with Repository.open(path, password="third") as repo:
        assert repo.check().ok
        with pytest.raises(BlocktrailError, match=r"last key|opened the repository"):
            repo.remove_key(new.id)


def test_kdf_parameters_are_recorded_and_checked() -> None:
    assert KdfParams.parse("t=2,m=2048,p=2") == KdfParams(2, 2048, 2)
    for bad in ("t=0", "m=4,p=1", "x=1", "t=1,m=abc"):
        with pytest.raises(BlocktrailError):
            KdfParams.parse(bad)


def test_an_unencrypted_repository_keeps_working(tmp_path: Path) -> None:
    with Repository.init(tmp_path / "r", encryption=Encryption.none()) as repo:
        point = store(repo, "d", {0: image(4, 1)[0]}, 1)
    with Repository.open(tmp_path / "r", password="ignored") as repo:
        assert not repo.encrypted and repo.encryption_info() == {"encryption": "none"}
        assert repo.check(read_data=True).ok
        repo.restore(point.id, str(tmp_path / "x.raw"))
    assert json.loads((tmp_path / "r" / "config.json").read_text())["encryption"] == "none"


# ------------------------------------------------------------------------------ nonces

NONCE_WRITER = r"""
import random, sys
from blocktrail.repo import Repository
path, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
for round_ in range(3):
    with Repository.open(path, password="test-password") as repo:
        writer = repo.begin(f"disk-{seed}", 40 * 65536, None)
        for i in range(40):
            writer.put_chunk(i, rng.randbytes(65536))
        writer.commit(kind="full", change_id=None)
"""


def collect_nonces(path: Path, repo: Repository) -> list[bytes]:
    """(salt, nonce) of every envelope in every pack and of every sealed file."""
    out = []
    for pack in (path / "packs").rglob("*.pack"):
        data = pack.read_bytes()
        for _, offset, _ in read_trailer(data, str(pack), pack_id=pack.stem,
                                         trailer_key=repo.codec.trailer_key):
            out.append(data[offset + 48 : offset + 76])
    for sub in ("index", "points", "verify"):
        for f in (path / sub).rglob("*"):
            if f.is_file():
                out.append(f.read_bytes()[8:36])
    return out


def test_nonces_never_repeat_across_concurrent_writers(tmp_path: Path) -> None:
    path = tmp_path / "r"
    Repository.init(path, encryption=TEST_ENCRYPTION).close()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    procs = [subprocess.Popen([sys.executable, "-c", NONCE_WRITER, str(path), str(n)], env=env,
                              stderr=subprocess.PIPE) for n in range(4)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read() if proc.stderr else ""
    with open_repo(path) as repo:
        nonces = collect_nonces(path, repo)
        assert len(repo.points()) == 12 and repo.check(read_data=True).ok
    assert len(nonces) >= 12 * 40 and len(set(nonces)) == len(nonces)


def test_a_forked_writer_starts_its_own_session(tmp_path: Path) -> None:
    codec = EncryptedCodec(KEYS, AES_GCM)
    codec.seal(KIND_CHUNK, b"before the fork")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write_fd, codec.sessions.next()[0])
        os._exit(0)
    os.waitpid(pid, 0)
    child_salt = os.read(read_fd, 16)
    assert child_salt != codec.sessions.next()[0]
