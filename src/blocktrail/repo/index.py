"""Index files: where each object is (digest -> pack, offset, length), and the chunk index
they make together."""

from __future__ import annotations

import struct
import sys
import threading
from collections.abc import Iterator, KeysView

from blake3 import blake3

from blocktrail.repo import layout
from blocktrail.repo.errors import RepositoryError
from blocktrail.repo.objects import HEADER as OBJECT_HEADER
from blocktrail.repo.packs import Location
from blocktrail.repo.quarantine import CopyKey

MAGIC = b"BTIX"
VERSION = 1
HEADER = struct.Struct("<4sII4x")
ENTRY = struct.Struct("<32s16sQII")
# An entry after its name (pack, offset, length, plain length): how the chunk index holds each
# location in memory, as the index file has it (one bytes object, not a tuple of four).
PACKED = struct.Struct("<16sQII")
_NAME_AND_PACKED = struct.Struct(f"32s{PACKED.size}s")  # an ENTRY, split after its name
MIN_ENVELOPE = OBJECT_HEADER.size  # the smallest envelope: a header, no payload
MAX_END = 1 << 62  # no pack is this big: an entry ending past it is damaged


def encode(locations: dict[bytes, Location]) -> bytes:
    entries = [ENTRY.pack(name, bytes.fromhex(loc.pack_id), loc.offset, loc.length,
                          loc.plain_length) for name, loc in sorted(locations.items())]
    body = HEADER.pack(MAGIC, VERSION, len(locations)) + b"".join(entries)
    return body + blake3(body).digest()


def decode(data: bytes, where: str) -> dict[bytes, bytes]:
    """An index file's entries: name -> location, packed (`unpack_location` makes it a
    `Location`)."""
    if len(data) < HEADER.size + 32 or blake3(data[:-32]).digest() != data[-32:]:
        raise RepositoryError(f"{where}: index file is damaged (checksum mismatch)")
    magic, version, count = HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION or len(data) != HEADER.size + count * ENTRY.size + 32:
        raise RepositoryError(f"{where}: not a version {VERSION} index file")
    body = data[HEADER.size:-32]
    if count:
        _check_ranges(body, where)
    return dict(_NAME_AND_PACKED.iter_unpack(body))  # split in C: 1.5x a comprehension's speed


def _check_ranges(body: bytes, where: str) -> None:
    """Every entry's envelope is at least `MIN_ENVELOPE` long and ends before `MAX_END`:
    checked on whole columns where the machine is little-endian, as the file is (views of the
    entries' offsets at byte 48 and lengths at byte 56, no copy), and entry by entry to name
    one that fails (or on a big-endian machine)."""
    if sys.byteorder == "little":
        view = memoryview(body)
        lengths = view.cast("I")[14 :: ENTRY.size // 4]
        offsets = view.cast("Q")[6 :: ENTRY.size // 8]
        if min(lengths) >= MIN_ENVELOPE and max(offsets) + max(lengths) <= MAX_END:
            return
    for name, _, offset, length, _ in ENTRY.iter_unpack(body):
        if length < MIN_ENVELOPE or offset + length > MAX_END:
            raise RepositoryError(f"{where}: index file is damaged (it names object "
                                  f"{name.hex()} at offset {offset} with {length} bytes, "
                                  "which no pack can hold)")


def pack_location(loc: Location) -> bytes:
    raw = bytes.fromhex(loc.pack_id)
    if len(raw) != 16 or raw.hex() != loc.pack_id:  # a pack ID is 32 lowercase hex digits
        raise ValueError(f"not a pack ID: {loc.pack_id!r}")
    return PACKED.pack(raw, loc.offset, loc.length, loc.plain_length)


def unpack_location(packed: bytes) -> Location:
    pack_id, offset, length, plain = PACKED.unpack(packed)
    return Location(pack_id.hex(), offset, length, plain)


def layered(copies: dict[bytes, list[Location]], waiting: frozenset[str],
            keep_all: frozenset[bytes] = frozenset()) -> list[dict[bytes, Location]]:
    """The entries of the index files that name ``copies`` (each object's copies, the one
    to use first at their head): the first file names each object at its first copy; the
    others name the copies kept besides it. Those are kept only where the first copy is in a
    pack that a collection still waiting for its writers may delete (``waiting``): a writer
    that started after that pack was condemned may have deduplicated against another copy,
    which must stay named until its manifest is published; and for the objects in
    ``keep_all`` (none of their copies read intact: which one is right is not known).
    Elsewhere one copy is named, as a collection with no run waiting leaves it."""
    files: list[dict[bytes, Location]] = [{}]
    for name, found in copies.items():
        files[0][name] = found[0]
        if len(found) > 1 and (found[0].pack_id in waiting or name in keep_all):
            for depth, spare in enumerate(found[1:], 1):
                if depth == len(files):
                    files.append({})
                files[depth][name] = spare
    return files


class ChunkIndex:
    """The repository's chunk index: the union of its index files, where each object has one
    usable copy. Entries whose pack file does not exist (a prune deletes dead packs before it
    rewrites the index) and copies in quarantine are never used; another copy of the same
    object, named by another index file, is used instead when there is one.

    Copies in **condemned** packs (a garbage collection is about to delete them) are read like
    any other, but a new restore point never refers to them: `referenceable` is false for an
    object whose every usable copy is in one, so a writer stores it again.

    Each location is held packed (`PACKED`, as its index file has it): an index of millions of
    chunks holds one small bytes object per chunk, not a tuple of four objects."""

    def __init__(self, existing_packs: set[str], quarantined: set[CopyKey],
                 condemned: frozenset[str] = frozenset()) -> None:
        self._packs = existing_packs
        self.condemned = condemned
        self._condemned_raw = frozenset(bytes.fromhex(pack_id) for pack_id in condemned)
        self._quarantined = quarantined
        self._q_digests = {key[0] for key in quarantined}
        self._usable: dict[bytes, bytes] = {}  # name -> its copy in use, packed
        self._spares: dict[bytes, list[bytes]] = {}  # more intact copies, used in turn, packed
        self._lost: dict[bytes, tuple[str, str | None]] = {}  # no usable copy: why, lost pack
        self.damaged_files: list[tuple[str, str]] = []  # index files that do not decode
        self.damaged_entries: list[tuple[bytes, str]] = []  # (object, what is wrong): entries
        # that locate an intact copy with the wrong length (Store.misindexed)
        self.unauthentic_files: set[str] = set()  # those of them that fail authentication
        self.files: list[str] = []  # the index files it was read from
        self.misplaced: dict[str, str] = {}  # pack ID -> its file in another folder
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- building

    def add_file(self, entries: dict[bytes, bytes]) -> None:
        """Merge one decoded index file (`decode`: packed locations; files earlier merged
        win, later copies are spares)."""
        raw_packs = {packed[:16] for packed in entries.values()}
        packs = {raw.hex() for raw in raw_packs}
        if packs <= self._packs and not (self._q_digests and entries.keys() & self._q_digests):
            for name in entries.keys() & self._usable.keys():  # the usual case: no checks
                self._add_spare(name, entries.pop(name))
            if self._lost:
                for name in entries.keys() & self._lost.keys():
                    del self._lost[name]
            self._usable.update(entries)
            return
        for name, packed in entries.items():
            loc = unpack_location(packed)
            why = self._unusable(name, loc)
            if why is None:
                self.add({name: loc})
            elif name not in self._usable:
                self._lost.setdefault(name, why)

    def _unusable(self, name: bytes, loc: Location) -> tuple[str, str | None] | None:
        if loc.pack_id not in self._packs:
            moved = self.misplaced.get(loc.pack_id)
            hint = "" if moved is None else \
                f" ({moved} is in another folder: move it to {layout.pack(loc.pack_id)})"
            return f"its pack {loc.pack_id} is missing{hint}", loc.pack_id
        if (name, loc.pack_id, loc.offset) in self._quarantined:
            return (f"its only copy (pack {loc.pack_id}, offset {loc.offset}) is damaged and "
                    "in quarantine"), None
        return None

    def _add_spare(self, name: bytes, packed: bytes) -> None:
        if packed != self._usable[name] and packed not in self._spares.get(name, ()):
            self._spares.setdefault(name, []).append(packed)

    def add(self, locations: dict[bytes, Location]) -> None:
        """Objects just stored (their pack is durable and an index file names them)."""
        with self._lock:
            for name, loc in locations.items():
                packed = pack_location(loc)
                if name in self._usable:
                    self._add_spare(name, packed)
                else:
                    self._usable[name] = packed
                    self._lost.pop(name, None)

    def drop(self, name: bytes, pack_id: str, offset: int, why: str) -> Location | None:
        """Stop using the copy of ``name`` at ``pack_id``, ``offset`` (found damaged);
        -> the copy used from now on, if any."""
        def damaged(packed: bytes) -> bool:
            loc = unpack_location(packed)
            return (loc.pack_id, loc.offset) == (pack_id, offset)

        with self._lock:
            spares = [packed for packed in self._spares.get(name, []) if not damaged(packed)]
            self._spares[name] = spares
            current = self._usable.get(name)
            if current is not None and not damaged(current):
                return unpack_location(current)
            if spares:
                self._usable[name] = spares.pop(0)
                return unpack_location(self._usable[name])
            self._usable.pop(name, None)
            self._lost[name] = why, None
            return None

    def drop_entry(self, name: bytes, pack_id: str, offset: int, length: int,
                   why: str) -> None:
        """Stop using one index entry of ``name`` (not the copy: other entries that locate
        it rightly stay), recording ``why`` in `damaged_entries`."""
        def wrong(packed: bytes) -> bool:
            loc = unpack_location(packed)
            return (loc.pack_id, loc.offset, loc.length) == (pack_id, offset, length)

        with self._lock:
            self.damaged_entries.append((name, why))
            spares = [packed for packed in self._spares.get(name, []) if not wrong(packed)]
            self._spares[name] = spares
            current = self._usable.get(name)
            if current is None or not wrong(current):
                return
            if spares:
                self._usable[name] = spares.pop(0)
            else:
                self._usable.pop(name)
                self._lost[name] = why, None

    # ---------------------------------------------------------------- lookups

    def copies(self, name: bytes) -> list[Location]:
        """Every usable copy of ``name``: the one used, then the spares."""
        packed = self._usable.get(name)
        return [] if packed is None else \
            [unpack_location(packed), *map(unpack_location, self._spares.get(name, ()))]

    def get(self, name: bytes) -> Location | None:
        packed = self._usable.get(name)
        return None if packed is None else unpack_location(packed)

    def __getitem__(self, name: bytes) -> Location:
        return unpack_location(self._usable[name])

    def __contains__(self, name: object) -> bool:
        return name in self._usable

    def __len__(self) -> int:
        return len(self._usable)

    def names(self) -> KeysView[bytes]:
        return self._usable.keys()

    def items(self) -> Iterator[tuple[bytes, Location]]:
        return ((name, unpack_location(packed)) for name, packed in self._usable.items())

    def values(self) -> Iterator[Location]:
        return map(unpack_location, self._usable.values())

    def locations(self) -> dict[bytes, Location]:
        """A copy (taken at once: writers may add to the index meanwhile)."""
        return {name: unpack_location(packed) for name, packed in dict(self._usable).items()}

    def referenceable(self, name: bytes) -> bool:
        """A new restore point may refer to ``name``: a usable copy outside condemned packs."""
        packed = self._usable.get(name)
        if packed is None:
            return False
        if packed[:16] not in self._condemned_raw:
            return True
        return any(spare[:16] not in self._condemned_raw for spare in self._spares.get(name, ()))

    def unreferenceable(self) -> frozenset[bytes]:
        """Objects with usable copies only in condemned packs."""
        if not self._condemned_raw:
            return frozenset()
        return frozenset(n for n, packed in self._usable.items()
                         if packed[:16] in self._condemned_raw and not self.referenceable(n))

    def lost(self) -> frozenset[bytes]:
        """Objects an index file names whose every copy is unusable (damaged, pack gone)."""
        return frozenset(self._lost)

    def named_packs(self) -> set[str]:
        """The packs the index files name: with a usable copy, or gone."""
        return {raw.hex() for raw in {packed[:16] for packed in self._usable.values()}} | {
            pack for _, pack in self._lost.values() if pack is not None}

    def why_missing(self, name: bytes) -> str:
        lost = self._lost.get(name)
        return "it is in no index file" if lost is None else lost[0]

    def missing_pack(self, name: bytes) -> str | None:
        """The pack that held the only copies of ``name``, when that pack is gone."""
        lost = self._lost.get(name)
        return None if lost is None else lost[1]

    def is_known(self, name: bytes) -> bool:
        """An index file names ``name`` (usable or not)."""
        return name in self._usable or name in self._lost
