"""Packs: many chunk envelopes in one file, with a trailer listing them."""

from __future__ import annotations

import secrets
import struct
from typing import NamedTuple

from blocktrail.repo.errors import ChunkCorrupt

TRAILER_ENTRY = struct.Struct("<32sQI4x")
TRAILER_END = struct.Struct("<I4s")
TRAILER_MAGIC = b"BTPK"
PACK_TARGET_BYTES = 16 << 20


class Location(NamedTuple):
    """Where an object is: a named tuple, as an index holds one per chunk."""

    pack_id: str
    offset: int
    length: int  # of the whole envelope
    plain_length: int


class PackBuilder:
    """Collects envelopes until the pack is big enough to write."""

    def __init__(self) -> None:
        self.pack_id = secrets.token_hex(16)
        self._data = bytearray()
        self.entries: list[tuple[bytes, int, int, int]] = []  # digest, offset, length, plain

    def add(self, name: bytes, envelope: bytes, plain_length: int) -> None:
        self.entries.append((name, len(self._data), len(envelope), plain_length))
        self._data += envelope

    @property
    def size(self) -> int:
        return len(self._data)

    def finish(self) -> bytearray:
        """The whole pack file (the builder's buffer, extended in place: no 16 MiB copies)."""
        self._data += b"".join(TRAILER_ENTRY.pack(n, o, ln) for n, o, ln, _ in self.entries)
        self._data += TRAILER_END.pack(len(self.entries), TRAILER_MAGIC)
        return self._data

    def locations(self) -> dict[bytes, Location]:
        return {n: Location(self.pack_id, o, ln, p) for n, o, ln, p in self.entries}


def read_trailer(data: bytes, where: str) -> list[tuple[bytes, int, int]]:
    """The (digest, offset, length) entries of a whole pack; `ChunkCorrupt` if damaged."""
    if len(data) < TRAILER_END.size:
        raise ChunkCorrupt(f"{where}: pack is truncated")
    count, magic = TRAILER_END.unpack_from(data, len(data) - TRAILER_END.size)
    start = len(data) - TRAILER_END.size - count * TRAILER_ENTRY.size
    if magic != TRAILER_MAGIC or start < 0:
        raise ChunkCorrupt(f"{where}: pack trailer is damaged")
    entries = [TRAILER_ENTRY.unpack_from(data, start + i * TRAILER_ENTRY.size)
               for i in range(count)]
    if any(o + ln > start for _, o, ln in entries):
        raise ChunkCorrupt(f"{where}: pack trailer points past the data")
    return entries
