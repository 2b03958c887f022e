"""The object envelopes: magic, version, kind, codec, lengths, the object's name (blake3 of the
plain bytes, keyed in an encrypted repository); and the codecs that seal and open them, plain
or encrypted (docs/repository.md, "Envelope")."""

from __future__ import annotations

import struct
import threading

import zstandard
from blake3 import blake3

from blocktrail.repo import crypto
from blocktrail.repo.errors import (
    AUTH_FAILED,
    AuthenticationFailed,
    ChunkCorrupt,
    DowngradeRefused,
    ObjectAuthenticationFailed,
)

MAGIC = b"BTOB"
VERSION = 1
KIND_CHUNK, KIND_PAGE, KIND_TABLE = 1, 2, 3
CODEC_PLAIN, CODEC_ZSTD = 0, 1
HEADER = struct.Struct("<4sBBBBII32s")  # the reserved byte must be zero
ZERO_DIGEST = bytes(32)
Buffer = bytes | bytearray | memoryview  # what chunk bytes may come as (a view of a read)
_local = threading.local()


def digest(data: Buffer) -> bytes:
    return blake3(data).digest()


def _compressor() -> zstandard.ZstdCompressor:
    comp = getattr(_local, "compressor", None)
    if comp is None:  # one context per thread: zstd contexts are not shareable
        comp = _local.compressor = zstandard.ZstdCompressor(level=1)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec = getattr(_local, "decompressor", None)
    if dec is None:
        dec = _local.decompressor = zstandard.ZstdDecompressor()
    return dec


def object_name(kind: int, plain: Buffer) -> bytes:
    """A chunk is named by blake3 of its bytes; pages and tables by blake3 of their kind byte
    and bytes, so no page can ever be taken for a chunk of the same bytes, or the reverse."""
    return digest(plain) if kind == KIND_CHUNK else digest(bytes([kind]) + plain)


def seal(kind: int, plain: Buffer) -> tuple[bytes, bytes]:
    """-> (name, envelope). Hashes the plain bytes, then compresses if that helps."""
    name = object_name(kind, plain)
    return name, seal_named(kind, name, plain)


def seal_named(kind: int, name: bytes, plain: Buffer) -> bytes:
    """The envelope of ``plain``, whose name the caller computed already."""
    codec, payload = _compress(plain)
    return HEADER.pack(MAGIC, VERSION, kind, codec, 0, len(plain), len(payload), name) + payload


def envelope_at(data: bytes | memoryview, offset: int) -> tuple[int, int, bytes] | None:
    """(kind, whole envelope length, name) of an envelope that seems to start at ``offset``
    (its header is plausible); None otherwise. For walking a pack whose trailer is damaged."""
    if offset + HEADER.size > len(data):
        return None
    magic, version, kind, codec, zero, _, stored_len, name = HEADER.unpack_from(data, offset)
    if magic != MAGIC or version != VERSION or kind not in (KIND_CHUNK, KIND_PAGE, KIND_TABLE) \
            or codec not in (CODEC_PLAIN, CODEC_ZSTD) or zero \
            or offset + HEADER.size + stored_len > len(data):
        return None
    return kind, HEADER.size + stored_len, name


def open_envelope(data: Buffer, kind: int, expected: bytes, where: str) -> bytes:
    """The plain bytes of an envelope (bytes, or a view of a larger read: then the plain bytes
    are copied once, not the envelope first), checked against ``expected``; else
    `ChunkCorrupt`."""
    if len(data) < HEADER.size:
        raise ChunkCorrupt(f"{where} is truncated")
    magic, version, stored_kind, codec, zero, plain_len, stored_len, name = \
        HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION or stored_kind != kind or zero \
            or name != expected:
        raise ChunkCorrupt(f"{where} has a damaged header")
    payload = memoryview(data)[HEADER.size :]
    if len(payload) != stored_len:
        raise ChunkCorrupt(f"{where} has the wrong length")
    plain = _decompress(codec, payload, plain_len, where, ChunkCorrupt)
    if len(plain) != plain_len or object_name(kind, plain) != expected:
        raise ChunkCorrupt(f"{where} does not match its digest")
    return plain


# ------------------------------------------------------------------------------ codecs

SEALED_MAGIC = b"BTSF"
SEALED_VERSION = 1
KIND_INDEX, KIND_MANIFEST, KIND_VERIFY = 4, 5, 6  # whole files (docs/repository.md)
VERSION_ENCRYPTED = 2
HEADER_ENCRYPTED = struct.Struct("<4sBBBBII32s16s12s")  # + salt, nonce; AAD = the header
SEALED_HEADER = struct.Struct("<4sBBBB16s12s")  # magic, version, kind, codec, cipher, salt, nonce
_PLAIN_KINDS = (KIND_CHUNK, KIND_PAGE, KIND_TABLE)


SAMPLE_BYTES = 4096  # each of the two samples that decide whether compressing may pay


def _incompressible(plain: Buffer) -> bool:
    """Whether ``plain`` looks like random data (already compressed or encrypted): two
    samples, from its start and its middle, do not shrink by a sixteenth. Compressing such a
    chunk whole costs as much as hashing it, for nothing. The samples are compressed at the
    level the chunk would be: zstd's faster, negative levels do not entropy-code literals, so
    data of few distinct byte values and no repeats (hex, base64) would look random to them,
    where level 1 halves it."""
    if len(plain) < 4 * SAMPLE_BYTES:
        return False
    middle = len(plain) // 2
    sample = b"".join((plain[:SAMPLE_BYTES], plain[middle : middle + SAMPLE_BYTES]))
    return len(_compressor().compress(sample)) >= len(sample) - len(sample) // 16


def _compress(plain: Buffer) -> tuple[int, Buffer]:
    """-> (codec, payload): zstd when it makes the object smaller, else the plain bytes (also,
    without trying, when samples say it would not)."""
    if _incompressible(plain):
        return CODEC_PLAIN, plain
    packed = _compressor().compress(plain)
    return (CODEC_ZSTD, packed) if len(packed) < len(plain) else (CODEC_PLAIN, plain)


def _decompress(codec: int, payload: Buffer, plain_len: int | None, where: str,
                error: type[ChunkCorrupt]) -> bytes:
    try:
        if codec == CODEC_ZSTD:
            if plain_len is None:
                return _decompressor().decompress(payload)
            return _decompressor().decompress(payload, max_output_size=plain_len)
        if codec == CODEC_PLAIN:
            return payload if isinstance(payload, bytes) else bytes(payload)
    except zstandard.ZstdError as exc:
        raise error(f"{where} does not decompress") from exc
    raise error(f"{where} has unknown codec {codec}")


class PlainCodec:
    """An unencrypted repository: unkeyed blake3 names, version 1 envelopes, files as they
    are (each checks itself with its own checksum)."""

    encrypted = False
    cipher_name = "none"
    trailer_key: bytes | None = None

    def name(self, kind: int, plain: Buffer) -> bytes:
        return object_name(kind, plain)

    def seal(self, kind: int, plain: Buffer) -> tuple[bytes, bytes]:
        return seal(kind, plain)

    def seal_named(self, kind: int, name: bytes, plain: Buffer) -> bytes:
        return seal_named(kind, name, plain)

    def seal_chunk(self, plain: Buffer) -> tuple[bytes, bytes, int]:
        name, envelope = seal(KIND_CHUNK, plain)
        return name, envelope, len(plain)

    def open(self, data: Buffer, kind: int, expected: bytes, where: str) -> bytes:
        return open_envelope(data, kind, expected, where)

    def envelope_at(self, data: bytes | memoryview, offset: int) -> tuple[int, int, bytes] | None:
        return envelope_at(data, offset)

    def seal_file(self, kind: int, name: str, plain: bytes) -> bytes:
        return plain

    def open_file(self, kind: int, name: str, data: bytes, where: str,
                  error: type[AuthenticationFailed] = AuthenticationFailed) -> bytes:
        """The file as it is; `DowngradeRefused` if it is sealed: only an encrypted
        repository writes such a file (no unencrypted one starts with the sealed magic), so
        the config that says "not encrypted" was altered."""
        if data[:len(SEALED_MAGIC)] == SEALED_MAGIC:
            raise DowngradeRefused(
                f"{where} is sealed by an encrypted repository, but config.json says the "
                "repository is not encrypted: the config was altered (a downgrade); refused "
                "before anything was written (put back the config from a copy of the "
                "repository)")
        return data

    def lease_name(self, disk_id: str) -> str:
        return disk_id


class EncryptedCodec:
    """An encrypted repository: keyed blake3 names, version 2 envelopes (AEAD, the header
    as associated data), whole files sealed with their kind and object name as associated
    data. Any failure to open is `ObjectAuthenticationFailed` (or the ``error`` given)."""

    encrypted = True

    def __init__(self, keys: crypto.MasterKeys, cipher: int) -> None:
        self.keys = keys
        self.cipher = cipher
        self.cipher_name = crypto.CIPHER_NAMES[cipher]
        self.sessions = crypto.Sessions(keys, cipher)
        self.trailer_key: bytes | None = keys.mac_key()
        self._lease_key = keys.lease_key()

    def name(self, kind: int, plain: Buffer) -> bytes:
        data = plain if kind == KIND_CHUNK else bytes([kind]) + plain
        return blake3(data, key=self.keys.id_key).digest()

    def seal(self, kind: int, plain: Buffer) -> tuple[bytes, bytearray]:
        name = self.name(kind, plain)
        return name, self.seal_named(kind, name, plain)

    def seal_named(self, kind: int, name: bytes, plain: Buffer) -> bytearray:
        """The envelope of ``plain``, whose name the caller computed already: one buffer,
        the header, then the ciphertext encrypted into it (no copy of the ciphertext)."""
        codec, payload = _compress(plain)
        salt, nonce, aead = self.sessions.next()
        header = HEADER_ENCRYPTED.pack(MAGIC, VERSION_ENCRYPTED, kind, codec, self.cipher,
                                       len(plain), len(payload) + crypto.TAG_BYTES, name, salt,
                                       nonce)
        envelope = bytearray(len(header) + len(payload) + crypto.TAG_BYTES)
        envelope[: len(header)] = header
        aead.encrypt_into(nonce, payload, header, memoryview(envelope)[len(header) :])
        return envelope

    def seal_chunk(self, plain: Buffer) -> tuple[bytes, bytearray, int]:
        name, envelope = self.seal(KIND_CHUNK, plain)
        return name, envelope, len(plain)

    def open(self, data: Buffer, kind: int, expected: bytes, where: str) -> bytes:
        error = ObjectAuthenticationFailed
        if len(data) < HEADER_ENCRYPTED.size + crypto.TAG_BYTES:
            raise error(f"{where}: {AUTH_FAILED} (the object is truncated)")
        magic, version, stored_kind, codec, cipher, plain_len, stored_len, name, salt, nonce = \
            HEADER_ENCRYPTED.unpack_from(data)
        if magic != MAGIC or version != VERSION_ENCRYPTED or cipher != self.cipher:
            raise error(f"{where}: {AUTH_FAILED} (not an envelope of this repository)")
        if stored_kind != kind or name != expected:
            raise error(f"{where}: {AUTH_FAILED} (another object is in its place)")
        if len(data) - HEADER_ENCRYPTED.size != stored_len:
            raise error(f"{where}: {AUTH_FAILED} (the object has the wrong length)")
        try:
            view = memoryview(data)
            payload = crypto.decrypt(self.sessions.opener(cipher, salt), nonce,
                                     view[HEADER_ENCRYPTED.size :],
                                     view[: HEADER_ENCRYPTED.size])
        except crypto.AeadFailure as exc:
            raise error(f"{where}: {AUTH_FAILED}") from exc
        plain = _decompress(codec, payload, plain_len, where, error)
        # Authenticated, so this only finds a writer's bug; cheap beside the AEAD.
        if len(plain) != plain_len or self.name(kind, plain) != expected:
            raise error(f"{where}: {AUTH_FAILED} (it does not match its name)")
        return plain

    def envelope_at(self, data: bytes | memoryview, offset: int) -> tuple[int, int, bytes] | None:
        if offset + HEADER_ENCRYPTED.size > len(data):
            return None
        magic, version, kind, codec, cipher, _, stored_len, name, _, _ = \
            HEADER_ENCRYPTED.unpack_from(data, offset)
        if magic != MAGIC or version != VERSION_ENCRYPTED or kind not in _PLAIN_KINDS \
                or codec not in (CODEC_PLAIN, CODEC_ZSTD) or cipher != self.cipher \
                or stored_len < crypto.TAG_BYTES \
                or offset + HEADER_ENCRYPTED.size + stored_len > len(data):
            return None
        return kind, HEADER_ENCRYPTED.size + stored_len, name

    def seal_file(self, kind: int, name: str, plain: bytes) -> bytes:
        """A whole file (index file, manifest, verify record), bound to its kind and name."""
        codec, payload = _compress(plain)
        salt, nonce, aead = self.sessions.next()
        header = SEALED_HEADER.pack(SEALED_MAGIC, SEALED_VERSION, kind, codec, self.cipher,
                                    salt, nonce)
        return header + aead.encrypt(nonce, payload, header + name.encode())

    def open_file(self, kind: int, name: str, data: bytes, where: str,
                  error: type[AuthenticationFailed] = AuthenticationFailed) -> bytes:
        if len(data) < SEALED_HEADER.size + crypto.TAG_BYTES:
            raise error(f"{where}: {AUTH_FAILED} (the file is truncated)")
        magic, version, stored_kind, codec, cipher, salt, nonce = SEALED_HEADER.unpack_from(data)
        if magic != SEALED_MAGIC or version != SEALED_VERSION or cipher != self.cipher:
            raise error(f"{where}: {AUTH_FAILED} (not a sealed file of this repository)")
        if stored_kind != kind:
            raise error(f"{where}: {AUTH_FAILED} (a file of another kind is in its place)")
        header = bytes(data[: SEALED_HEADER.size])
        try:
            payload = crypto.decrypt(self.sessions.opener(cipher, salt), nonce,
                                     memoryview(data)[SEALED_HEADER.size :],
                                     header + name.encode())
        except crypto.AeadFailure as exc:
            raise error(f"{where}: {AUTH_FAILED} (or it was moved from another name)") \
                from exc
        try:
            return _decompress(codec, payload, None, where, ChunkCorrupt)
        except ChunkCorrupt as exc:  # authenticated but undecodable: a writer's bug
            raise error(f"{where}: {AUTH_FAILED} ({exc.message})") from exc

    def lease_name(self, disk_id: str) -> str:
        """What names a disk's lease: a keyed hash, so the name does not tell the disk."""
        return blake3(disk_id.encode(), key=self._lease_key).hexdigest()


Codec = PlainCodec | EncryptedCodec
