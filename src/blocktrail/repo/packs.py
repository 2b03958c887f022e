"""Packs: many chunk envelopes in one file, with a trailer listing them."""

from __future__ import annotations

import hmac
import mmap
import secrets
import struct
from typing import NamedTuple

from blocktrail.repo import crypto
from blocktrail.repo.errors import AUTH_FAILED, ChunkCorrupt, ObjectAuthenticationFailed
from blocktrail.repo.objects import MAGIC, Codec, PlainCodec

TRAILER_ENTRY = struct.Struct("<32sQII")  # digest, offset, length, zero
TRAILER_END = struct.Struct("<I4s")
TRAILER_MAGIC = b"BTPK"
TRAILER_MAGIC_MAC = b"BTPA"  # an encrypted repository's: a MAC precedes the count
MAC_BYTES = 32
PACK_TARGET_BYTES = 16 << 20
BUFFER_BYTES = PACK_TARGET_BYTES + (1 << 20)  # a pack's objects, its last one and its trailer


class Location(NamedTuple):
    """Where an object is: a named tuple, as an index holds one per chunk."""

    pack_id: str
    offset: int
    length: int  # of the whole envelope
    plain_length: int


class PackBuilder:
    """Collects envelopes until the pack is big enough to write.

    The envelopes are copied into one page-aligned mapped buffer: ``buffer`` when given, one
    that held an earlier pack and was written, so its memory is reused (fresh memory costs a
    page fault per page, more than the copy itself), and the pack can be written from it as
    it is, past the page cache (fileio, O_DIRECT)."""

    def __init__(self, trailer_key: bytes | None = None,
                 buffer: mmap.mmap | None = None) -> None:
        self.pack_id = secrets.token_hex(16)
        self._trailer_key = trailer_key
        self.buffer = buffer if buffer is not None else mmap.mmap(-1, BUFFER_BYTES)
        self._size = 0  # bytes of the buffer in use; beyond that is an earlier pack's
        self.entries: list[tuple[bytes, int, int, int]] = []  # digest, offset, length, plain

    def add(self, name: bytes, envelope: bytes | bytearray, plain_length: int) -> None:
        self.entries.append((name, self._size, len(envelope), plain_length))
        self._put(envelope)

    def _put(self, data: bytes | bytearray) -> None:
        end = self._size + len(data)
        if end > len(self.buffer):  # many small objects: a big trailer
            bigger = mmap.mmap(-1, max(end, 2 * len(self.buffer)))
            bigger[: self._size] = self.buffer[: self._size]
            self.buffer = bigger
        self.buffer[self._size : end] = data
        self._size = end

    @property
    def size(self) -> int:
        return self._size

    def finish(self) -> memoryview:
        """The whole pack file: a view of the builder's buffer (no copy)."""
        entries = b"".join(TRAILER_ENTRY.pack(n, o, ln, 0) for n, o, ln, _ in self.entries)
        self._put(entries)
        if self._trailer_key is None:
            self._put(TRAILER_END.pack(len(self.entries), TRAILER_MAGIC))
        else:
            self._put(_trailer_mac(self._trailer_key, self.pack_id, entries, len(self.entries)))
            self._put(TRAILER_END.pack(len(self.entries), TRAILER_MAGIC_MAC))
        return memoryview(self.buffer)[: self._size]

    def locations(self) -> dict[bytes, Location]:
        return {n: Location(self.pack_id, o, ln, p) for n, o, ln, p in self.entries}


def _trailer_mac(key: bytes, pack_id: str, entries: bytes, count: int) -> bytes:
    return crypto.mac(key, pack_id.encode() + entries + count.to_bytes(4, "little"))


def read_trailer(data: bytes, where: str, pack_size: int | None = None, *,
                 pack_id: str = "", trailer_key: bytes | None = None
                 ) -> list[tuple[bytes, int, int]]:
    """The (digest, offset, length) entries of a pack; `ChunkCorrupt` if damaged. ``data`` is
    the whole pack, or (with ``pack_size``) its last bytes: at least the trailer. With
    ``trailer_key`` (an encrypted repository) the trailer's MAC, over ``pack_id`` and the
    entries, must hold (else `ObjectAuthenticationFailed`).

    Envelopes lie back to back from offset 0 up to the trailer, in the trailer's order, so any
    change to an offset, a length or a reserved byte shows."""
    size = len(data) if pack_size is None else pack_size
    base = size - len(data)  # where ``data`` starts in the pack
    if len(data) < TRAILER_END.size:
        raise _damaged(trailer_key, f"{where}: pack is truncated")
    count, magic = TRAILER_END.unpack_from(data, len(data) - TRAILER_END.size)
    mac_bytes = MAC_BYTES if trailer_key is not None else 0
    start = size - TRAILER_END.size - mac_bytes - count * TRAILER_ENTRY.size
    wanted = TRAILER_MAGIC if trailer_key is None else TRAILER_MAGIC_MAC
    if magic != wanted or start < base:
        raise _damaged(trailer_key, f"{where}: pack trailer is damaged")
    if trailer_key is not None:
        entries_end = start - base + count * TRAILER_ENTRY.size
        if not hmac.compare_digest(
                _trailer_mac(trailer_key, pack_id, bytes(data[start - base : entries_end]),
                             count), bytes(data[entries_end : entries_end + MAC_BYTES])):
            raise ObjectAuthenticationFailed(f"{where}: pack trailer: {AUTH_FAILED}")
    entries = [TRAILER_ENTRY.unpack_from(data, start - base + i * TRAILER_ENTRY.size)
               for i in range(count)]
    expected_offset = 0
    for _, offset, length, zero in entries:
        if zero or offset != expected_offset or length <= 0:
            raise _damaged(trailer_key,
                           f"{where}: pack trailer is damaged (entry at offset {offset})")
        expected_offset = offset + length
    if expected_offset != start:
        raise _damaged(trailer_key,
                       f"{where}: pack trailer does not account for the pack's data")
    return [(name, offset, length) for name, offset, length, _ in entries]


def _damaged(trailer_key: bytes | None, message: str) -> ChunkCorrupt:
    return ChunkCorrupt(message) if trailer_key is None else ObjectAuthenticationFailed(
        f"{message}: {AUTH_FAILED}")


def trailer_length(end: bytes) -> int:
    """How many bytes at the end of a pack its trailer takes, from its last 8 bytes."""
    count: int
    magic: bytes
    count, magic = TRAILER_END.unpack(end)
    return TRAILER_END.size + count * TRAILER_ENTRY.size \
        + (MAC_BYTES if magic == TRAILER_MAGIC_MAC else 0)


def walk_envelopes(data: bytes, codec: Codec | None = None) -> list[tuple[bytes, int, int]]:
    """(name, offset, length) of every plausible envelope, found without the trailer: for a
    pack whose trailer is damaged. Past a damaged header it looks for the next magic. The
    caller checks each object against its name."""
    codec = codec if codec is not None else PlainCodec()
    found: list[tuple[bytes, int, int]] = []
    offset = 0
    while 0 <= offset < len(data):
        header = codec.envelope_at(data, offset)
        if header is None:
            offset = data.find(MAGIC, offset + 1)
            continue
        _, length, name = header
        found.append((name, offset, length))
        offset += length
    return found
