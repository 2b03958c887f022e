"""The object envelope: magic, version, kind, codec, lengths, blake3 of the plain bytes."""

from __future__ import annotations

import struct
import threading

import zstandard
from blake3 import blake3

from blocktrail.repo.errors import ChunkCorrupt

MAGIC = b"BTOB"
VERSION = 1
KIND_CHUNK, KIND_PAGE, KIND_TABLE = 1, 2, 3
CODEC_PLAIN, CODEC_ZSTD = 0, 1
HEADER = struct.Struct("<4sBBBBII32s")  # the reserved byte must be zero
ZERO_DIGEST = bytes(32)
_local = threading.local()


def digest(data: bytes) -> bytes:
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


def object_name(kind: int, plain: bytes) -> bytes:
    """A chunk is named by blake3 of its bytes; pages and tables by blake3 of their kind byte
    and bytes, so no page can ever be taken for a chunk of the same bytes, or the reverse."""
    return digest(plain) if kind == KIND_CHUNK else digest(bytes([kind]) + plain)


def seal(kind: int, plain: bytes) -> tuple[bytes, bytes]:
    """-> (name, envelope). Hashes the plain bytes, then compresses if that helps."""
    name = object_name(kind, plain)
    packed = _compressor().compress(plain)
    codec, payload = (CODEC_ZSTD, packed) if len(packed) < len(plain) else (CODEC_PLAIN, plain)
    return name, HEADER.pack(MAGIC, VERSION, kind, codec, 0, len(plain), len(payload),
                             name) + payload


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


def open_envelope(data: bytes, kind: int, expected: bytes, where: str) -> bytes:
    """The plain bytes of an envelope, checked against ``expected``; else `ChunkCorrupt`."""
    if len(data) < HEADER.size:
        raise ChunkCorrupt(f"{where} is truncated")
    magic, version, stored_kind, codec, zero, plain_len, stored_len, name = \
        HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION or stored_kind != kind or zero \
            or name != expected:
        raise ChunkCorrupt(f"{where} has a damaged header")
    payload = data[HEADER.size :]
    if len(payload) != stored_len:
        raise ChunkCorrupt(f"{where} has the wrong length")
    try:
        if codec == CODEC_ZSTD:
            plain = _decompressor().decompress(payload, max_output_size=plain_len)
        elif codec == CODEC_PLAIN:
            plain = payload
        else:
            raise ChunkCorrupt(f"{where} has unknown codec {codec}")
    except zstandard.ZstdError as exc:
        raise ChunkCorrupt(f"{where} does not decompress") from exc
    if len(plain) != plain_len or object_name(kind, plain) != expected:
        raise ChunkCorrupt(f"{where} does not match its digest")
    return plain
