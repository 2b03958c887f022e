"""The cryptography of an encrypted repository (docs/security.md, docs/repository.md
"Encryption"): the master keys, the keys derived from them, the per-process sessions that make
nonces unique, the AEAD, and the password KDF.

No I/O here but reading /proc/cpuinfo to choose a cipher; key files are repo/keys.py, the
object envelopes repo/objects.py.
"""

from __future__ import annotations

import os
import secrets
import struct
import threading
from dataclasses import dataclass
from typing import Any

from blake3 import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from blocktrail.errors import InvalidArgument

AES_GCM, CHACHA20_POLY1305 = 1, 2
CIPHERS = {"aes-256-gcm": AES_GCM, "chacha20-poly1305": CHACHA20_POLY1305}
CIPHER_NAMES = {v: k for k, v in CIPHERS.items()}
KEY_BYTES = 32
SALT_BYTES = 16  # a session's salt
NONCE_BYTES = 12
TAG_BYTES = 16
SESSION_MESSAGES = 1 << 48  # a session's counter never reaches this: then a new session starts
_SESSION_CONTEXT = "blocktrail 2026-11-30 session key v1"
_MAC_CONTEXT = "blocktrail 2026-11-30 authentication key v1"
_LEASE_CONTEXT = "blocktrail 2026-11-30 lease name key v1"

Aead = AESGCM | ChaCha20Poly1305


class AeadFailure(Exception):
    """The AEAD refused a ciphertext (altered, or another key): callers raise their typed
    repository error from it."""


class KdfFailure(Exception):
    """argon2id refused its parameters or could not get its memory: callers raise their typed
    repository error from it."""


def make_aead(cipher: int, key: bytes) -> Aead:
    if cipher == AES_GCM:
        return AESGCM(key)
    if cipher == CHACHA20_POLY1305:
        return ChaCha20Poly1305(key)
    raise AeadFailure(f"unknown cipher {cipher}")


def decrypt(aead: Aead, nonce: bytes, ciphertext: bytes | memoryview,
            aad: bytes | memoryview) -> bytes:
    try:
        return aead.decrypt(nonce, ciphertext, aad)
    except (InvalidTag, ValueError, OverflowError) as exc:
        raise AeadFailure(str(exc) or type(exc).__name__) from exc


def cpu_has_aes() -> bool:
    """AES instructions (x86 ``aes``, arm64 ``aes`` feature): AES-GCM is then the fastest
    AEAD; without them ChaCha20-Poly1305 is faster and constant-time."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return "aes" in line.split(":", 1)[1].split()
    except OSError:
        pass
    return False


def choose_cipher(name: str) -> int:
    """``auto`` (AES-256-GCM where the CPU has AES instructions), ``aes-256-gcm`` or
    ``chacha20-poly1305``."""
    if name == "auto":
        return AES_GCM if cpu_has_aes() else CHACHA20_POLY1305
    if name not in CIPHERS:
        raise InvalidArgument(f"unknown cipher {name!r}: auto, " + ", ".join(CIPHERS))
    return CIPHERS[name]


# ------------------------------------------------------------------------------ the KDF

KDF_MEMORY_KIB_MAX = 16 << 20  # 16 GiB

@dataclass(frozen=True, slots=True)
class KdfParams:
    """argon2id parameters of a key file. The default costs about 0.15 s and 64 MiB per
    open; tests use tiny ones (recorded in their key files like any other). Memory is bounded
    by 16 GiB, for a new key file and for one that is opened: a key file that asks for more
    (written by someone who can write the storage) is refused, not given the memory."""

    time_cost: int = 3
    memory_kib: int = 64 * 1024
    parallelism: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.time_cost <= 100 or not 1 <= self.parallelism <= 64 \
                or not 8 * self.parallelism <= self.memory_kib <= KDF_MEMORY_KIB_MAX:
            raise InvalidArgument(f"argon2id parameters t={self.time_cost}, "
                                  f"m={self.memory_kib} KiB, p={self.parallelism} are out of "
                                  "range (t 1-100, p 1-64, m 8*p KiB-16 GiB)")

    @property
    def cost(self) -> int:
        """What opening costs, roughly (memory times passes): cheaper key files are tried
        first."""
        return self.memory_kib * self.time_cost

    def derive(self, password: bytes, salt: bytes) -> bytes:
        """The 32-byte key-encryption key of a password; `KdfFailure` if argon2id refuses
        (a salt it will not take) or cannot get the memory."""
        from argon2.exceptions import HashingError  # imported when a key is opened
        from argon2.low_level import Type, hash_secret_raw
        try:
            return hash_secret_raw(password, salt, time_cost=self.time_cost,
                                   memory_cost=self.memory_kib, parallelism=self.parallelism,
                                   hash_len=KEY_BYTES, type=Type.ID)
        except (HashingError, MemoryError) as exc:
            raise KdfFailure(f"argon2id ({self.describe()}): {exc}") from exc

    def to_json(self) -> dict[str, Any]:
        return {"algorithm": "argon2id", "time_cost": self.time_cost,
                "memory_kib": self.memory_kib, "parallelism": self.parallelism}

    @classmethod
    def from_json(cls, obj: Any) -> KdfParams:
        if not isinstance(obj, dict) or obj.get("algorithm") != "argon2id":
            raise ValueError(f"unknown KDF {obj!r}")
        values = [obj.get(k) for k in ("time_cost", "memory_kib", "parallelism")]
        ints = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
        if len(ints) != 3:
            raise ValueError(f"KDF parameters {obj!r} are not integers")
        try:
            return cls(*ints)
        except InvalidArgument as exc:
            raise ValueError(exc.message) from exc

    def describe(self) -> str:
        return (f"argon2id t={self.time_cost} m={self.memory_kib // 1024} MiB "
                f"p={self.parallelism}")

    @classmethod
    def parse(cls, text: str) -> KdfParams:
        """``t=3,m=65536,p=4`` (m in KiB): what BLOCKTRAIL_KDF and --kdf take."""
        fields = {"t": "time_cost", "m": "memory_kib", "p": "parallelism"}
        values: dict[str, int] = {}
        for part in filter(None, text.replace(" ", "").split(",")):
            key, _, value = part.partition("=")
            if key not in fields or not value.isdigit():
                raise InvalidArgument(f"KDF parameters {text!r}: expected t=N,m=KIB,p=N")
            values[fields[key]] = int(value)
        return cls(**values)


# ------------------------------------------------------------------------------ master keys

@dataclass(frozen=True, slots=True)
class MasterKeys:
    """A repository's two random keys: one for data (every AEAD key derives from it), one
    for chunk IDs (keyed blake3). Key files wrap them; they never change."""

    data_key: bytes
    id_key: bytes

    @classmethod
    def generate(cls) -> MasterKeys:
        return cls(secrets.token_bytes(KEY_BYTES), secrets.token_bytes(KEY_BYTES))

    def to_bytes(self) -> bytes:
        return self.data_key + self.id_key

    @classmethod
    def from_bytes(cls, data: bytes) -> MasterKeys:
        if len(data) != 2 * KEY_BYTES:
            raise ValueError("master keys have the wrong length")
        return cls(data[:KEY_BYTES], data[KEY_BYTES:])

    def mac_key(self) -> bytes:
        """Authenticates what is not encrypted: the config, pack trailers."""
        return blake3(self.data_key, derive_key_context=_MAC_CONTEXT).digest()

    def lease_key(self) -> bytes:
        """Names disk leases, so that a lease's name does not tell which disk it is."""
        return blake3(self.data_key, derive_key_context=_LEASE_CONTEXT).digest()

    def session_key(self, salt: bytes) -> bytes:
        return blake3(self.data_key + salt, derive_key_context=_SESSION_CONTEXT).digest()


def mac(key: bytes, data: bytes) -> bytes:
    return blake3(data, key=key).digest()


# ------------------------------------------------------------------------------ sessions

class Sessions:
    """Where nonces come from. A session is a random 128-bit salt; its key is derived from the
    data key and the salt, and its nonces count up from 0. Every process (every fork too) and
    every opening of a repository starts a new session, so no two writers, and no writer
    before and after a crash, ever share a key: (key, nonce) never repeats, with no
    coordination between writers (docs/repository.md, "Nonces")."""

    def __init__(self, keys: MasterKeys, cipher: int) -> None:
        self._keys = keys
        self.cipher = cipher
        self._lock = threading.Lock()
        self._pid = -1
        self._salt = b""
        self._aead: Aead | None = None
        self._counter = 0
        self._openers: dict[bytes, Aead] = {}

    def next(self) -> tuple[bytes, bytes, Aead]:
        """-> (salt, nonce, AEAD of the session's key) for one message."""
        with self._lock:
            if self._pid != os.getpid() or self._aead is None \
                    or self._counter >= SESSION_MESSAGES:
                self._pid = os.getpid()
                self._salt = secrets.token_bytes(SALT_BYTES)
                self._aead = make_aead(self.cipher, self._keys.session_key(self._salt))
                self._counter = 0
            nonce = self._counter.to_bytes(NONCE_BYTES, "big")
            self._counter += 1
            return self._salt, nonce, self._aead

    def opener(self, cipher: int, salt: bytes) -> Aead:
        """The AEAD of the session ``salt`` (kept: a pack's objects share a few sessions)."""
        aead = self._openers.get(salt)
        if aead is None or cipher != self.cipher:
            aead = make_aead(cipher, self._keys.session_key(salt))
            if cipher == self.cipher:
                with self._lock:
                    if len(self._openers) > 4096:
                        self._openers.clear()
                    self._openers[salt] = aead
        return aead


U32 = struct.Struct("<I")
