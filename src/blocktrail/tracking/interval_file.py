"""Byte layout of a tracker interval file (see docs/disk-format.md, "Tracker intervals")."""

from __future__ import annotations

import struct
import uuid

from blake3 import blake3
from pyroaring import BitMap

from blocktrail.errors import CorruptMetadata, UnsupportedFormat

MAGIC = b"BTIVAL\x00"
VERSION = 1
_HEADER = struct.Struct("<7sB16sQQ32s")


def encode(epoch: str, seq: int, granules: BitMap) -> bytes:
    payload = granules.serialize()
    digest = blake3(payload).digest()
    return _HEADER.pack(MAGIC, VERSION, uuid.UUID(epoch).bytes, seq, len(payload), digest) + payload


def decode(data: bytes, what: str) -> tuple[str, int, BitMap]:
    """-> (epoch, seq, granules); `CorruptMetadata` or `UnsupportedFormat` naming ``what``."""
    if len(data) < _HEADER.size:
        raise CorruptMetadata(f"{what}: truncated tracker interval ({len(data)} bytes)")
    magic, version, epoch, seq, length, digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CorruptMetadata(f"{what}: not a blocktrail tracker interval")
    if version != VERSION:
        raise UnsupportedFormat(f"{what}: tracker interval version {version} is not supported")
    payload = data[_HEADER.size :]
    if len(payload) != length or blake3(payload).digest() != digest:
        raise CorruptMetadata(f"{what}: tracker interval is damaged (length or digest mismatch)")
    return str(uuid.UUID(bytes=epoch)), seq, BitMap.deserialize(payload)
