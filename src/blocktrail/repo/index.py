"""Index files: where each chunk is (digest -> pack, offset, length)."""

from __future__ import annotations

import struct

from blake3 import blake3

from blocktrail.repo.errors import RepositoryError
from blocktrail.repo.packs import Location

MAGIC = b"BTIX"
VERSION = 1
HEADER = struct.Struct("<4sII4x")
ENTRY = struct.Struct("<32s16sQII")


def encode(locations: dict[bytes, Location]) -> bytes:
    entries = [ENTRY.pack(name, bytes.fromhex(loc.pack_id), loc.offset, loc.length,
                          loc.plain_length) for name, loc in sorted(locations.items())]
    body = HEADER.pack(MAGIC, VERSION, len(locations)) + b"".join(entries)
    return body + blake3(body).digest()


def decode(data: bytes, where: str) -> dict[bytes, Location]:
    if len(data) < HEADER.size + 32 or blake3(data[:-32]).digest() != data[-32:]:
        raise RepositoryError(f"{where}: index file is damaged (checksum mismatch)")
    magic, version, count = HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION or len(data) != HEADER.size + count * ENTRY.size + 32:
        raise RepositoryError(f"{where}: not a version {VERSION} index file")
    entries = ENTRY.iter_unpack(memoryview(data)[HEADER.size : -32])
    return {name: Location(pack.hex(), offset, length, plain)
            for name, pack, offset, length, plain in entries}
