"""Restore point manifests (docs/repository.md, "Manifest").

A version 2 manifest checks itself: it carries its own ID (which must equal its file name) and a
blake3 checksum of a canonical encoding of every other field, so a manifest copied over another,
renamed, or edited by hand is refused rather than restored. Version 1 manifests (no checksum)
still load, with the ID check.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import Any, Protocol

from blake3 import blake3

from blocktrail.repo.errors import ManifestCorrupt

# The change label of a point read through a QEMU dirty bitmap (nbd's DIRTY_BITMAP_PREFIX; the
# repository does not import the protocol)
BITMAP_LABEL_PREFIX = "qemu:dirty-bitmap:"

FORMAT = "blocktrail-restore-point"
VERSION = 2
TABLE_PAGES = 1024  # page digests per page table: 64 GiB of disk per table
MAX_SIZE_BYTES = 1 << 62  # no disk is bigger: a manifest saying so is damaged
MAX_CHUNK_SIZE = 1 << 31  # envelope lengths are u32
KINDS = ("full", "incremental", "healed")
VERIFY_STATES = ("unverified", "ok", "failed")
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_EPOCH = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def canonical_body(fields: dict[str, Any]) -> bytes:
    """The bytes a manifest's checksum covers: every field but ``checksum``, as compact JSON
    with sorted keys and ASCII escapes (docs/repository.md, "Manifest checksum")."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode("ascii")


def body_checksum(fields: dict[str, Any]) -> str:
    return blake3(canonical_body(fields)).hexdigest()


@dataclass(frozen=True, slots=True)
class RestorePoint:
    """One restore point: a full index of its disk at one moment."""

    id: str
    disk_id: str
    size_bytes: int
    chunk_size: int
    page_chunks: int
    tables: tuple[str, ...]  # hex digests of page tables (each lists up to 1024 pages)
    kind: str  # "full" | "incremental" | "healed"
    parent: str | None
    change_id: str | None
    fallback_reason: str | None
    created_at: str
    tool: str
    verify_state: str = "unverified"  # "unverified" | "ok" | "failed"
    tracker_trusted: bool = True
    audit: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def created(self) -> datetime:
        return datetime.fromisoformat(self.created_at)

    def with_verify_state(self, state: str) -> RestorePoint:
        return replace(self, verify_state=state)

    @property
    def taint(self) -> str | None:
        """Why neither it, nor an older point of its disk, nor a point whose parent chain holds
        it is a base (backup/base.py), or None: ``failed`` verification, its audit caught the
        tracker missing changes (``tracker-missed``), or it records as its change label a
        dirty bitmap that the NBD server had refused (``refused-bitmap``: an earlier blocktrail
        recorded it regardless, its fallback reason being that refusal)."""
        if self.verify_state == "failed":
            return "failed"
        if not self.tracker_trusted:
            return "tracker-missed"
        label = self.change_id or ""
        if label.startswith(BITMAP_LABEL_PREFIX) and \
                f"did not agree to {label}" in (self.fallback_reason or ""):
            return "refused-bitmap"
        return None

    def to_bytes(self) -> bytes:
        """The manifest file: version 2, its checksum computed now (a rewrite recomputes it)."""
        obj = {"format": FORMAT, "version": VERSION, **asdict(self)}
        obj["tables"] = list(self.tables)
        obj["checksum"] = body_checksum(obj)
        return (json.dumps(obj, indent=1) + "\n").encode()

    def summary(self) -> dict[str, Any]:
        """What `points --json` shows."""
        return {"id": self.id, "disk_id": self.disk_id, "kind": self.kind,
                "change_id": self.change_id, "created_at": self.created_at,
                "verify_state": self.verify_state, "size_bytes": self.size_bytes,
                "parent": self.parent, "fallback_reason": self.fallback_reason,
                "tracker_trusted": self.tracker_trusted}

    @classmethod
    def from_bytes(cls, data: bytes, where: str, expected_id: str | None = None) -> RestorePoint:
        """Decode and check a manifest: its checksum (version 2) and that its ID is
        ``expected_id`` (the file name without ``.json``). Anything else: `ManifestCorrupt`."""
        try:
            obj = json.loads(data)
        except ValueError as exc:
            raise ManifestCorrupt(f"{where}: manifest is damaged ({exc})") from exc
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ManifestCorrupt(f"{where}: not a restore point manifest")
        version = obj.get("version")
        if version == 2:
            stored = obj.pop("checksum", None)
            if stored != body_checksum(obj):
                raise ManifestCorrupt(
                    f"{where}: manifest checksum mismatch: the file was damaged or edited "
                    "after it was written")
        elif version == 1:
            if "checksum" in obj:  # no version 1 manifest was ever written with one
                raise ManifestCorrupt(
                    f"{where}: a version 1 manifest with a checksum: no blocktrail writes "
                    "that; the file was edited after it was written (a version 2 manifest "
                    "changed to version 1?)")
        else:
            raise ManifestCorrupt(f"{where}: manifest version {version!r} is not supported "
                                  f"(this blocktrail reads versions 1 and {VERSION})")
        point = cls._decode(obj, where)
        if expected_id is not None and point.id != expected_id:
            raise ManifestCorrupt(
                f"{where}: holds restore point {point.id!r}, not {expected_id!r} (the file was "
                "copied or renamed): it is not used")
        return point

    @property
    def chunks(self) -> int:
        return -(-self.size_bytes // self.chunk_size)

    @property
    def pages(self) -> int:
        return -(-self.chunks // self.page_chunks)

    def table_width(self, table_no: int) -> int:
        """How many page digests table ``table_no`` lists."""
        return min(TABLE_PAGES, self.pages - table_no * TABLE_PAGES)

    def page_width(self, page_no: int) -> int:
        """How many chunk digests page ``page_no`` lists."""
        return min(self.page_chunks, self.chunks - page_no * self.page_chunks)

    @classmethod
    def _decode(cls, obj: dict[str, Any], where: str) -> RestorePoint:
        try:
            tables = obj["tables"]
            if type(tables) is not list or not all(type(t) is str for t in tables):
                raise TypeError(f"tables is not a list of digests: {tables!r}"[:200])
            point = cls(
                id=str(obj["id"]), disk_id=str(obj["disk_id"]),
                size_bytes=_int(obj, "size_bytes", 0, MAX_SIZE_BYTES),
                chunk_size=_int(obj, "chunk_size", 1, MAX_CHUNK_SIZE),
                page_chunks=_int(obj, "page_chunks", 1, MAX_CHUNK_SIZE // 32),
                tables=tuple(tables), kind=str(obj["kind"]),
                parent=_optional_str(obj["parent"]), change_id=_optional_str(obj["change_id"]),
                fallback_reason=_optional_str(obj["fallback_reason"]),
                created_at=str(obj["created_at"]), tool=str(obj["tool"]),
                verify_state=str(obj["verify_state"]),
                tracker_trusted=bool(obj["tracker_trusted"]), audit=dict(obj["audit"]),
                stats=dict(obj["stats"]))
            if point.created.tzinfo is None:
                raise ValueError(f"created_at {point.created_at!r} has no time zone")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ManifestCorrupt(f"{where}: manifest is damaged ({exc!r})") from exc
        if point.kind not in KINDS or point.verify_state not in VERIFY_STATES \
                or not all(_HEX_DIGEST.fullmatch(t) for t in point.tables):
            raise ManifestCorrupt(f"{where}: manifest is damaged (a field has an impossible "
                                  "value)")
        needed = -(-point.pages // TABLE_PAGES)
        if len(point.tables) != needed:
            raise ManifestCorrupt(
                f"{where}: manifest is damaged: it names {len(point.tables)} page tables, but "
                f"a disk of {point.size_bytes} bytes needs {needed}")
        return point


def _int(obj: dict[str, Any], key: str, low: int, high: int) -> int:
    value = obj[key]
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{key} is {value!r}, not a whole number from {low} to {high}")
    return value


def _optional_str(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"expected a string or null, not {value!r}")
    return value


def _epoch_and_sequence(change_id: str | None) -> tuple[str, int] | None:
    """``<epoch-uuid>/<sequence>`` split; None for anything else (an NBD bitmap label)."""
    if change_id is None:
        return None
    epoch, sep, seq = change_id.partition("/")
    if not sep or not seq.isdigit() or not _EPOCH.fullmatch(epoch):
        return None
    return epoch, int(seq)


class PointLookup(Protocol):
    """Restore points by ID: a dict of them, or a walk that reads a manifest when it is asked
    for (repo/pointwalk.py). None: no such point, or its manifest is damaged."""

    def get(self, point_id: str, /) -> RestorePoint | None: ...


def parent_chain(point: RestorePoint, by_id: PointLookup) -> list[RestorePoint]:
    """``point``, its parent, that one's parent, ... up to the first full or healed point, that
    one included: the points whose chunks ``point`` may have inherited. A parent ``by_id``
    does not give (forgotten, or its manifest damaged) ends it."""
    chain: list[RestorePoint] = []
    link: RestorePoint | None = point
    seen: set[str] = set()
    while link is not None and link.id not in seen:
        seen.add(link.id)
        chain.append(link)
        if link.kind in ("full", "healed") or link.parent is None:
            break
        link = by_id.get(link.parent)
    return chain


def link_problems(point: RestorePoint, parent: RestorePoint | None) -> list[str]:
    """What is wrong with ``point``'s base link, given the manifest it names as its parent
    (None: the parent was forgotten, or its manifest is damaged and reported on its own)."""
    if point.kind == "full":
        return []
    if point.parent is None:
        return [f"a restore point of kind {point.kind} that names no parent"]
    if parent is None:
        return []  # forgotten: a manifest never depends on another
    problems = []
    if parent.disk_id != point.disk_id:
        problems.append(f"its parent {parent.id} is a restore point of disk {parent.disk_id}, "
                        f"not of {point.disk_id}")
    if parent.created >= point.created:
        problems.append(f"its parent {parent.id} is not older than it")
    mine, theirs = _epoch_and_sequence(point.change_id), _epoch_and_sequence(parent.change_id)
    if mine is not None and theirs is not None and mine[0] == theirs[0]:
        if point.kind == "healed" and mine[1] != theirs[1]:
            problems.append(f"it heals {parent.id} (change ID {parent.change_id}) but records "
                            f"change ID {point.change_id}")
        elif mine[1] < theirs[1]:
            problems.append(f"its change ID {point.change_id} is older than its parent "
                            f"{parent.id}'s ({parent.change_id})")
    return problems
