"""Quarantine: damaged copies of objects, recorded so that nothing is ever read from or
deduplicated against them again (docs/repository.md, "Quarantine").

A record is a small create-only file ``quarantine/<digest>-<pack-id>-<offset>.json``. Its *name*
is the record (a damaged record still quarantines its copy); its content says what was found.
Records are never rewritten, so they work on object storage too (a conditional put).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from blocktrail.repo.objects import KIND_CHUNK, KIND_PAGE, KIND_TABLE

FORMAT = "blocktrail-quarantine"
VERSION = 1
DIRECTORY = "quarantine"
KIND_NAMES = {KIND_CHUNK: "chunk", KIND_PAGE: "page", KIND_TABLE: "page table"}
_NAME = re.compile(r"([0-9a-f]{64})-([0-9a-f]{32})-(0|[1-9][0-9]{0,19})\.json")

CopyKey = tuple[bytes, str, int]  # digest, pack id, offset: one stored copy of an object


@dataclass(frozen=True, slots=True)
class DamagedCopy:
    """One stored copy of an object whose bytes do not match its name."""

    digest: bytes
    kind: int
    pack_id: str
    offset: int
    length: int
    reason: str
    not_recorded: str | None = None  # why no record was written: set aside by this process only

    @property
    def key(self) -> CopyKey:
        return self.digest, self.pack_id, self.offset

    @property
    def kind_name(self) -> str:
        return KIND_NAMES.get(self.kind, "object")

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.digest.hex(), "kind": self.kind_name, "pack": self.pack_id,
                "offset": self.offset, "length": self.length, "reason": self.reason}


def record_name(key: CopyKey) -> str:
    digest, pack_id, offset = key
    return f"{digest.hex()}-{pack_id}-{offset}.json"


def parse_record_name(name: str) -> CopyKey | None:
    """The copy a record names; None for any other file (a temporary file, say)."""
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    return bytes.fromhex(match[1]), match[2], int(match[3])


def record_bytes(copy: DamagedCopy) -> bytes:
    body = {"format": FORMAT, "version": VERSION, **copy.to_json(),
            "found_at": datetime.now(UTC).isoformat()}
    return (json.dumps(body, indent=1) + "\n").encode()
