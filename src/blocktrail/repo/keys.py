"""Key files, and unlocking an encrypted repository (docs/repository.md, "Key files").

A repository's master keys (repo/crypto.py) are random and never change. Each key file
``keys/<key-id>.json`` wraps them with a key derived from its own password (argon2id, its own
salt and parameters). Adding a password creates a key file; changing one creates the new key
file, then deletes the old; removing one deletes its file, never the last nor the one in use.
Key files are create-only, so a process killed at any point leaves the old key file, the new
one, or both: the repository always opens with the old or the new password. Those commands run
one at a time, under the keys lease (`layout.KEYS_LEASE`).

Opening tries the key files cheapest first; one that is damaged or crafted (parameters argon2id
refuses) opens nothing and stops nothing, and is named when no key file opens.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import re
import secrets
import shlex
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from blocktrail.repo import crypto, layout
from blocktrail.repo.backend import Backend, ObjectExists, ObjectNotFound
from blocktrail.repo.crypto import KdfParams, MasterKeys
from blocktrail.repo.errors import (
    AuthenticationFailed,
    DowngradeRefused,
    KeyNotFound,
    LastKeyRefused,
    PasswordInUse,
    PasswordRequired,
    RepositoryError,
    WrongPassword,
)
from blocktrail.repo.objects import Codec, EncryptedCodec, PlainCodec

KEY_FORMAT = "blocktrail-key"
DEFAULT_KDF = KdfParams()
TEST_KDF = KdfParams(time_cost=1, memory_kib=1024, parallelism=1)  # tests only: no cost
KDF_SALT_BYTES = 32
_REPO_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")  # it goes into messages as it is
WRAPPED_BYTES = 2 * crypto.KEY_BYTES + crypto.TAG_BYTES  # the master keys and the AEAD tag
PasswordSource = bytes | str | Callable[[], bytes | str | None]  # a callable: None if none


def password_bytes(password: PasswordSource) -> bytes | None:
    value = password() if callable(password) else password
    if value is None:
        return None
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


@dataclass(frozen=True, slots=True)
class Encryption:
    """How a new repository is protected: ``Encryption(password)`` (the cipher chosen for this
    CPU, argon2id with the default parameters), or `Encryption.none` (an explicit choice,
    recorded in the config)."""

    password: PasswordSource | None
    cipher: str = "auto"  # "auto" | "aes-256-gcm" | "chacha20-poly1305" | "none"
    kdf: KdfParams = DEFAULT_KDF

    @classmethod
    def none(cls) -> Encryption:
        return cls(None, "none")

    @property
    def enabled(self) -> bool:
        return self.cipher != "none"


@dataclass(frozen=True, slots=True)
class KeyFile:
    """One key file: the master keys wrapped by a password."""

    id: str
    created_at: str
    host: str
    kdf: KdfParams
    salt: bytes
    nonce: bytes
    wrapped: bytes
    repo_id: str | None = None  # recorded in the clear; None: written before it was

    @property
    def name(self) -> str:
        return layout.key_file(self.id)

    def to_bytes(self) -> bytes:
        body = {"format": KEY_FORMAT, "version": 1, "id": self.id,
                **({} if self.repo_id is None else {"repo_id": self.repo_id}),
                "created_at": self.created_at, "host": self.host,
                "kdf": {**self.kdf.to_json(), "salt": self.salt.hex()},
                "wrap": {"cipher": "aes-256-gcm", "nonce": self.nonce.hex(),
                         "ciphertext": self.wrapped.hex()}}
        return (json.dumps(body, indent=1) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> KeyFile:
        try:
            obj = json.loads(data)
            if not isinstance(obj, dict) or obj.get("format") != KEY_FORMAT \
                    or obj.get("version") != 1 or obj["wrap"]["cipher"] != "aes-256-gcm":
                raise ValueError("not a version 1 key file")
            repo_id = obj.get("repo_id")
            if repo_id is not None and (not isinstance(repo_id, str)
                                        or not _REPO_ID.fullmatch(repo_id)):
                raise ValueError(f"repository ID {repo_id!r} is not one (a few letters, "
                                 "digits, - or _)")
            key = cls(id=str(obj["id"]), created_at=str(obj["created_at"]),
                      host=str(obj["host"]), kdf=KdfParams.from_json(obj["kdf"]),
                      salt=bytes.fromhex(obj["kdf"]["salt"]),
                      nonce=bytes.fromhex(obj["wrap"]["nonce"]),
                      wrapped=bytes.fromhex(obj["wrap"]["ciphertext"]), repo_id=repo_id)
            if len(key.salt) != KDF_SALT_BYTES or len(key.nonce) != crypto.NONCE_BYTES \
                    or len(key.wrapped) != WRAPPED_BYTES:
                raise ValueError(f"a salt of {len(key.salt)} bytes, a nonce of "
                                 f"{len(key.nonce)}, wrapped keys of {len(key.wrapped)} "
                                 f"(expected {KDF_SALT_BYTES}, {crypto.NONCE_BYTES} and "
                                 f"{WRAPPED_BYTES})")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RepositoryError(f"{where}: key file is damaged ({exc})") from exc
        if not where.endswith(layout.key_file(key.id)):
            raise RepositoryError(f"{where}: key file names key {key.id}, not its file name")
        return key

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "created_at": self.created_at, "host": self.host,
                "kdf": self.kdf.to_json()}


def _aad(repo_id: str, key_id: str) -> bytes:
    return f"{KEY_FORMAT}\0{repo_id}\0{key_id}".encode()


def wrap(keys: MasterKeys, password: bytes, repo_id: str, kdf: KdfParams) -> KeyFile:
    key_id = secrets.token_hex(8)
    salt, nonce = secrets.token_bytes(KDF_SALT_BYTES), secrets.token_bytes(crypto.NONCE_BYTES)
    aead = crypto.make_aead(crypto.AES_GCM, kdf.derive(password, salt))
    return KeyFile(id=key_id, created_at=datetime.now(UTC).isoformat(), host=socket.gethostname(),
                   kdf=kdf, salt=salt, nonce=nonce,
                   wrapped=aead.encrypt(nonce, keys.to_bytes(), _aad(repo_id, key_id)),
                   repo_id=repo_id)


def open_key(key: KeyFile, password: bytes, repo_id: str) -> tuple[MasterKeys, str] | None:
    """The master keys and the repository ID they are bound to: ``repo_id``, or the one the
    key file records when the password opens it for that one only (the key file, or the
    config, comes from another repository). None: the password is not this key file's.
    `RepositoryError` when argon2id refuses the key file's parameters."""
    try:
        kek = key.kdf.derive(password, key.salt)
    except crypto.KdfFailure as exc:
        raise RepositoryError(f"{key.name}: key file is damaged ({exc})") from exc
    aead = crypto.make_aead(crypto.AES_GCM, kek)
    for bound in dict.fromkeys(r for r in (repo_id, key.repo_id) if r is not None):
        try:
            return MasterKeys.from_bytes(crypto.decrypt(aead, key.nonce, key.wrapped,
                                                        _aad(bound, key.id))), bound
        except (crypto.AeadFailure, ValueError):
            continue
    return None


@dataclass(frozen=True, slots=True)
class DamagedKeyFile:
    """A key file that cannot open anything, and why."""

    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class KeyScan:
    """The key files found: those that decode (in order of creation), those that do not,
    and the version of each (object name -> etag)."""

    usable: tuple[KeyFile, ...]
    damaged: tuple[DamagedKeyFile, ...]
    etags: Mapping[str, str]


def scan_key_files(backend: Backend) -> KeyScan:
    usable: list[KeyFile] = []
    damaged: list[DamagedKeyFile] = []
    etags: dict[str, str] = {}
    for info in backend.list(layout.KEYS):
        if layout.key_id_of(info.name) is None:
            continue
        try:
            key = KeyFile.from_bytes(backend.load(info.name), info.name)
        except ObjectNotFound:
            continue
        except RepositoryError as exc:
            damaged.append(DamagedKeyFile(info.name, exc.message))
        else:
            usable.append(key)
        etags[info.name] = info.etag
    return KeyScan(tuple(sorted(usable, key=lambda k: (k.created_at, k.id))), tuple(damaged),
                   etags)


def key_files(backend: Backend) -> list[KeyFile]:
    """Every key file that decodes (a damaged one cannot open anything)."""
    return list(scan_key_files(backend).usable)


def describe_damaged(damaged: Iterable[DamagedKeyFile]) -> str:
    return "".join(f"; key file {d.name} is damaged ({d.reason.removeprefix(d.name + ': ')}): "
                   "if it was yours, the password may be right" for d in damaged)


def has_key_files(backend: Backend) -> bool:
    return any(layout.key_id_of(info.name) is not None for info in backend.list(layout.KEYS))


# ------------------------------------------------------------------------------ the config

def config_mac(keys: MasterKeys, config: dict[str, Any]) -> str:
    body = {k: v for k, v in config.items() if k != "mac"}
    return crypto.mac(keys.mac_key(), json.dumps(body, sort_keys=True, separators=(",", ":"),
                                                 ensure_ascii=True).encode()).hex()


def encryption_of(config: dict[str, Any], where: str) -> str | None:
    """The cipher name of an encrypted repository's config; None: unencrypted."""
    enc = config.get("encryption", "none")
    if enc == "none":
        return None
    if not isinstance(enc, dict) or enc.get("cipher") not in crypto.CIPHERS \
            or enc.get("chunk_ids") != "blake3-keyed":
        raise RepositoryError(f"{where}/config.json: unknown encryption {enc!r}")
    return str(enc["cipher"])


@dataclass(frozen=True, slots=True)
class Unlocked:
    """How a repository was opened: its codec, and the key file that opened it."""

    codec: Codec
    key_id: str | None = None
    keys: MasterKeys | None = None


def unlock(backend: Backend, config: dict[str, Any],
           password: PasswordSource | None) -> Unlocked:
    """The codec of an opened repository: for an encrypted one, the master keys from the
    first key file the password opens (the cheapest to try first), and the config's MAC
    checked with them."""
    cipher = encryption_of(config, backend.url)
    if cipher is None:
        if has_key_files(backend):
            raise DowngradeRefused(
                f"{backend.url}/config.json says the repository is not encrypted, but it has "
                "key files: the config was altered (a downgrade); nothing was read or written")
        return Unlocked(PlainCodec())
    secret = None if password is None else password_bytes(password)
    if secret is None:
        raise PasswordRequired(
            f"repository {backend.url} is encrypted: give its password (BLOCKTRAIL_PASSWORD, "
            "--password-file FILE or --password-command CMD)")
    scan = scan_key_files(backend)
    if not scan.usable:
        raise RepositoryError(f"{backend.url}: the repository is encrypted but has no readable "
                              "key file (keys/): it cannot be opened"
                              + describe_damaged(scan.damaged))
    repo_id = str(config["repo_id"])
    damaged = list(scan.damaged)
    foreign: list[str] = []  # "<key file> repository <ID>": opened, but for another repository
    for key in sorted(scan.usable, key=lambda k: (k.kdf.cost, k.created_at, k.id)):
        try:
            opened = open_key(key, secret, repo_id)
        except RepositoryError as exc:
            damaged.append(DamagedKeyFile(key.name, exc.message))
            continue
        if opened is None:
            continue
        keys, bound = opened
        if bound != repo_id:  # a key file copied in from another repository: try the others
            foreign.append(f"key file {key.name} repository {bound}")
            continue
        if not hmac.compare_digest(str(config.get("mac")).encode(),
                                   config_mac(keys, config).encode()):
            raise AuthenticationFailed(f"{backend.url}/config.json: {AUTH_CONFIG}")
        return Unlocked(EncryptedCodec(keys, crypto.CIPHERS[cipher]), key.id, keys)
    if foreign:
        raise AuthenticationFailed(
            f"{backend.url}: {AUTH_REPO_ID} (config.json names repository {repo_id}, "
            f"{', '.join(foreign)}); nothing was read or written")
    recorded = {k.repo_id for k in scan.usable if k.repo_id is not None}
    if recorded and repo_id not in recorded:
        raise AuthenticationFailed(
            f"{backend.url}: {AUTH_REPO_ID} (config.json names repository {repo_id}, the key "
            f"files {', '.join(sorted(recorded))}); nothing was read or written")
    raise WrongPassword(f"wrong password: none of the {len(scan.usable)} key files of "
                        f"repository {backend.url} opens with it; nothing was written"
                        + describe_damaged(damaged))


AUTH_REPO_ID = ("authentication failed: the config or a key file comes from another "
                "repository (or was altered)")
AUTH_CONFIG = ("authentication failed: the repository config was altered (its chunk size, "
               "cipher or identity changed since it was written)")


def encrypted_config(config: dict[str, Any], keys: MasterKeys, cipher: int) -> dict[str, Any]:
    out = {**config, "encryption": {"cipher": crypto.CIPHER_NAMES[cipher],
                                    "chunk_ids": "blake3-keyed"}}
    out["mac"] = config_mac(keys, out)
    return out


# ------------------------------------------------------------------------------ managing keys

def add_key(backend: Backend, repo_id: str, keys: MasterKeys, password: bytes,
            kdf: KdfParams, existing: Iterable[KeyFile] = (), replacing: str | None = None
            ) -> KeyFile:
    """A new key file for ``password`` (create-only: whole or not at all); refused when the
    password already opens one of ``existing`` (each password is one key file's).
    ``replacing``: the key a `passwd` replaces with it."""
    refuse_password_in_use(existing, password, repo_id,
                           None if replacing is None else (replacing, backend.url))
    key = wrap(keys, password, repo_id, kdf)
    try:
        backend.create(key.name, key.to_bytes())
    except ObjectExists:  # 64 random bits collided: try once more
        key = wrap(keys, password, repo_id, kdf)
        backend.create(key.name, key.to_bytes())
    return key


def refuse_password_in_use(existing: Iterable[KeyFile], password: bytes, repo_id: str,
                           replacing: tuple[str, str] | None = None) -> None:
    """``replacing``: (the key a `passwd` replaces, the repository's location): a `passwd`
    cut short left the new key file beside it, and the error says how to finish."""
    for key in existing:
        with contextlib.suppress(RepositoryError):  # a damaged key file opens nothing
            if open_key(key, password, repo_id) is not None:
                cut_short = "" if replacing is None else (
                    f"; if it is what a `passwd` to this password cut short left, finish that: "
                    f"`blocktrail repo key remove {shlex.quote(replacing[1])} {replacing[0]}`, "
                    "with the new password")
                raise PasswordInUse(f"the new password already opens key {key.id}: choose "
                                    "another (to change that key's password, open the "
                                    "repository with it and use `blocktrail repo key passwd`"
                                    f"{cut_short})")


def remove_key(backend: Backend, key_id: str, in_use: str | None) -> None:
    """Delete a key file: never the one in use (change its password instead) nor the last
    (a damaged one, which opens nothing, always). The caller holds the keys lease
    (`layout.KEYS_LEASE`): the key files are listed under it, and the one removed is deleted
    only in the version listed."""
    scan = scan_key_files(backend)
    ids = [k.id for k in scan.usable]
    name = layout.key_file(key_id)
    if any(d.name == name for d in scan.damaged):
        backend.delete(name, scan.etags[name])
        return
    if key_id not in ids:
        raise KeyNotFound(f"no key file {key_id!r} in {backend.url} (`blocktrail repo key "
                          "list` shows them)")
    if key_id == in_use:
        raise LastKeyRefused(f"key {key_id} is the one this command opened the repository "
                             "with: open it with another password to remove it, or change its "
                             "password (`blocktrail repo key passwd`)")
    if len(ids) <= 1:
        raise LastKeyRefused(f"key {key_id} is the repository's last key file: without it "
                             "nothing in the repository can ever be read again")
    backend.delete(name, scan.etags[name])


def change_password(backend: Backend, repo_id: str, keys: MasterKeys, key_id: str,
                    new_password: bytes, kdf: KdfParams) -> KeyFile:
    """Re-wrap: the new key file first (durable), then delete the old one. The data is never
    re-encrypted. The caller holds the keys lease, as for `remove_key`."""
    scan = scan_key_files(backend)
    name = layout.key_file(key_id)
    if all(k.id != key_id for k in scan.usable):
        raise KeyNotFound(f"key {key_id}, the one this command opened {backend.url} with, is "
                          "gone (another command removed it or changed its password): open "
                          "the repository again")
    new = add_key(backend, repo_id, keys, new_password, kdf,
                  [k for k in scan.usable if k.id != key_id], replacing=key_id)
    backend.delete(name, scan.etags[name])
    return new
