"""Change IDs: ``<epoch-uuid>/<sequence>`` names a point in a disk's write history."""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass

from blocktrail.errors import InvalidChangeId

ALL_ALLOCATED = "*"


@dataclass(frozen=True, order=True, slots=True)
class ChangeId:
    epoch: str
    seq: int

    def __str__(self) -> str:
        return f"{self.epoch}/{self.seq}"

    @classmethod
    def parse(cls, text: str) -> ChangeId:
        """Parse ``<epoch-uuid>/<sequence>``; anything else is `InvalidChangeId`."""
        return _parse(text)


@functools.lru_cache(maxsize=4096)  # a dirty map's every request parses the same few IDs
def _parse(text: str) -> ChangeId:
    epoch, sep, seq = text.strip().partition("/")
    try:
        if not sep or not seq.isdigit():
            raise ValueError
        canonical = str(uuid.UUID(epoch))
    except ValueError:
        raise InvalidChangeId(
            f"malformed change ID {text!r}: expected '<epoch-uuid>/<sequence>' or '*'"
        ) from None
    return ChangeId(canonical, int(seq))


def new_epoch() -> str:
    return str(uuid.uuid4())
