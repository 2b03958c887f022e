"""disk.json: the disk's identity, size, chain, snapshots and tracker state (disk-format.md)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from blocktrail.errors import CorruptMetadata, UnsupportedFormat

FORMAT = "blocktrail-disk"
FORMAT_VERSION = 2  # 2: a seal per layer, with the change time (1: one seal, at clean close)
META_FILE = "disk.json"
MAX_GRANULES = 2**32
LAYER_ID = re.compile(r"[0-9a-f]{16}")  # what `stack.new_layer_id` makes: it goes into file names
LAYER_KINDS = ("base", "delta", "restoring")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A frozen point of a disk: its name, the change ID of its point, when, and its size."""

    name: str
    change_id: str
    created_at: datetime
    size_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "change_id": self.change_id,
                "created_at": self.created_at.isoformat(), "size_bytes": self.size_bytes}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Snapshot:
        return cls(str(obj["name"]), str(obj["change_id"]),
                   datetime.fromisoformat(str(obj["created_at"])), int(obj["size_bytes"]))


@dataclass(slots=True)
class LayerRecord:
    id: str
    kind: str  # "base" | "delta"
    visible_below: int | None  # delta only: lowest disk size seen while it was the top
    snapshot: str | None  # the snapshot whose frozen layer this is
    # file name -> [size, mtime_ns, ctime_ns, inode] of a layer nothing may change (a frozen
    # one; every layer at a clean close); None while the layer may be written
    seal: dict[str, list[int]] | None = None
    source: dict[str, Any] | None = None  # "restoring" only: where its chunks come from

    def problem(self) -> str | None:
        """Why this record cannot be one a disk wrote, or None."""
        if not LAYER_ID.fullmatch(self.id):
            return "not a layer ID"
        if self.kind not in LAYER_KINDS:
            return f"unknown kind {self.kind!r}"
        below = self.visible_below
        if self.kind == "delta" and (not isinstance(below, int) or isinstance(below, bool)
                                     or below < 0):
            # not bounded by the disk's size: a frozen layer keeps the size it saw as the top
            return f"visible_below {below!r} is not a size in bytes"
        return None

    def to_json(self) -> dict[str, Any]:
        out = {"id": self.id, "kind": self.kind, "visible_below": self.visible_below,
               "snapshot": self.snapshot, "seal": self.seal}
        if self.source is not None:
            out["source"] = self.source
        return out


@dataclass(slots=True)
class DiskMeta:
    disk_id: str
    created_at: str
    size_bytes: int
    granularity: int
    cluster_size: int
    state: str  # "open" | "closed"
    layers: list[LayerRecord]
    snapshots: list[Snapshot]
    tracker: dict[str, Any]
    # version 1 only: [size, mtime_ns, inode] of every layer file, written at clean close
    legacy_seal: dict[str, list[int]] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_bytes(self) -> bytes:
        obj = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "disk_id": self.disk_id,
            "created_at": self.created_at,
            "size_bytes": self.size_bytes,
            "granularity": self.granularity,
            "cluster_size": self.cluster_size,
            "state": self.state,
            "layers": [layer.to_json() for layer in self.layers],
            "snapshots": [s.to_json() for s in self.snapshots],
            "tracker": self.tracker,
        }
        return (json.dumps(obj, indent=2) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> DiskMeta:
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptMetadata(f"{where}: disk metadata is not valid JSON ({exc})") from exc
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise UnsupportedFormat(f"{where}: not a blocktrail disk")
        version = obj.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise UnsupportedFormat(f"{where}: disk format version {version!r} is not one")
        if version > FORMAT_VERSION:
            raise UnsupportedFormat(
                f"{where}: disk format version {version} was written by a newer blocktrail "
                f"(this one reads up to {FORMAT_VERSION})")
        try:
            meta = cls(
                disk_id=str(obj["disk_id"]),
                created_at=str(obj["created_at"]),
                size_bytes=int(obj["size_bytes"]),
                granularity=int(obj["granularity"]),
                cluster_size=int(obj["cluster_size"]),
                state=str(obj["state"]),
                layers=[LayerRecord(str(la["id"]), str(la["kind"]), la["visible_below"],
                                    la["snapshot"], _seal(la.get("seal")),
                                    None if la.get("source") is None else dict(la["source"]))
                        for la in obj["layers"]],
                snapshots=[Snapshot.from_json(s) for s in obj["snapshots"]],
                tracker=dict(obj["tracker"]),
                legacy_seal=(_seal(obj.get("seal")) or {}) if version == 1 else {},
                format_version=version,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptMetadata(f"{where}: disk metadata is incomplete ({exc!r})") from exc
        meta._check(where)
        return meta

    def _check(self, where: str) -> None:
        """`CorruptMetadata` for sizes no disk was ever created with."""
        for name, value in (("granularity", self.granularity),
                            ("cluster_size", self.cluster_size)):
            if value < 512 or value & (value - 1):
                raise CorruptMetadata(f"{where}: disk metadata is damaged ({name} {value} is "
                                      "not a power of two of at least 512)")
        if self.size_bytes < 0 or -(-self.size_bytes // self.granularity) > MAX_GRANULES:
            raise CorruptMetadata(f"{where}: disk metadata is damaged (size_bytes "
                                  f"{self.size_bytes} is negative or more than 2^32 granules)")
        if not self.layers:
            raise CorruptMetadata(f"{where}: disk metadata is damaged (no layer)")
        seen: set[str] = set()
        for layer in self.layers:
            problem = layer.problem()
            if problem is None and layer.id in seen:
                problem = "it is listed twice"
            if problem is not None:
                raise CorruptMetadata(
                    f"{where}: disk metadata is damaged (layer {layer.id!r}: {problem})")
            seen.add(layer.id)


def _seal(obj: Any) -> dict[str, list[int]] | None:
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise TypeError(f"a seal must be an object, not {obj!r}")
    return {str(name): [int(v) for v in values] for name, values in obj.items()}
