"""Restore point manifests (docs/repository.md, "Manifest")."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import Any

from blocktrail.repo.errors import ManifestCorrupt

FORMAT = "blocktrail-restore-point"
VERSION = 1


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

    def to_bytes(self) -> bytes:
        obj = {"format": FORMAT, "version": VERSION, **asdict(self)}
        obj["tables"] = list(self.tables)
        return (json.dumps(obj, indent=1) + "\n").encode()

    def summary(self) -> dict[str, Any]:
        """What `points --json` shows."""
        return {"id": self.id, "disk_id": self.disk_id, "kind": self.kind,
                "change_id": self.change_id, "created_at": self.created_at,
                "verify_state": self.verify_state, "size_bytes": self.size_bytes,
                "parent": self.parent, "fallback_reason": self.fallback_reason,
                "tracker_trusted": self.tracker_trusted}

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> RestorePoint:
        try:
            obj = json.loads(data)
            if obj.get("format") != FORMAT:
                raise ManifestCorrupt(f"{where}: not a restore point manifest")
            if obj.get("version") != VERSION:
                raise ManifestCorrupt(f"{where}: manifest version {obj.get('version')} is not "
                                      f"supported")
            return cls(
                id=str(obj["id"]), disk_id=str(obj["disk_id"]), size_bytes=int(obj["size_bytes"]),
                chunk_size=int(obj["chunk_size"]), page_chunks=int(obj["page_chunks"]),
                tables=tuple(str(t) for t in obj["tables"]), kind=str(obj["kind"]),
                parent=obj["parent"], change_id=obj["change_id"],
                fallback_reason=obj["fallback_reason"], created_at=str(obj["created_at"]),
                tool=str(obj["tool"]), verify_state=str(obj["verify_state"]),
                tracker_trusted=bool(obj["tracker_trusted"]), audit=dict(obj["audit"]),
                stats=dict(obj["stats"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ManifestCorrupt(f"{where}: manifest is damaged ({exc})") from exc
