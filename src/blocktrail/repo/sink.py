"""Storing new objects: packs written on a background thread, then one index file naming them.

A sink that is closed before its index file exists deletes the packs it wrote: no index file
names them, so no other writer can know them, and leaving them would only fill the disk (a
full file system is the usual reason a backup fails)."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from blocktrail.repo import index as index_file
from blocktrail.repo.packs import PACK_TARGET_BYTES, Location, PackBuilder

if TYPE_CHECKING:
    from blocktrail.repo.repository import Repository


class PackSink:
    """Objects in, packs and (at `publish`) one index file out. ``known(name)``: the object
    is stored already (deduplicated, not packed again)."""

    def __init__(self, repo: Repository, known: Callable[[bytes], bool], *,
                 consequence: str = "nothing was published") -> None:
        self._repo = repo
        self._known = known
        self._consequence = consequence
        self._pack = PackBuilder()
        self._new: dict[bytes, Location] = {}  # in packs handed to the pack writer
        self._in_pack: set[bytes] = set()
        self._written: list[str] = []  # pack ids handed to the pack writer
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pack-writer")
        self._write: Future[None] | None = None
        self._index_name: str | None = None
        self._published = False
        self.bytes_stored = 0

    def holds(self, name: bytes) -> bool:
        return name in self._new or name in self._in_pack

    def add(self, name: bytes, envelope: bytes, plain_length: int) -> bool:
        """Pack an object unless it is stored already; -> True if packed."""
        if self.holds(name) or self._known(name):
            return False
        self._pack.add(name, envelope, plain_length)
        self._in_pack.add(name)
        self.bytes_stored += len(envelope)
        if self._pack.size >= PACK_TARGET_BYTES:
            self._hand_over()
        return True

    def _hand_over(self) -> None:
        """Give the full pack to the pack-writing thread (one pack in flight at a time), so
        reading, hashing and compressing go on while it is written."""
        if not self._pack.entries:
            return
        self._wait()
        self._written.append(self._pack.pack_id)
        self._write = self._writer.submit(self._repo.write_pack, self._pack.pack_id,
                                          self._pack.finish(), self._consequence)
        self._new.update(self._pack.locations())
        self._pack = PackBuilder()
        self._in_pack.clear()

    def _wait(self) -> None:
        if self._write is not None:
            write, self._write = self._write, None
            write.result()  # a failed write surfaces here

    def finish_packs(self) -> dict[bytes, Location]:
        """Write the last pack and wait until every pack is durable; -> where each object is."""
        self._hand_over()
        self._wait()
        return dict(self._new)

    def named_elsewhere(self) -> None:
        """The caller wrote an index file naming this sink's packs itself (repair)."""
        self._published = True

    def publish(self) -> dict[bytes, Location]:
        """Every pack durable, then one index file naming their objects (none if no object
        was new); the repository's chunk index learns them. -> the new locations."""
        locations = self.finish_packs()
        if locations:
            self._index_name = f"{secrets.token_hex(16)}.idx"
            self._repo.write_index(self._index_name, index_file.encode(locations),
                                   self._consequence)
            self._repo.add_locations(locations)
        self._published = True
        return locations

    def close(self) -> None:
        """Done, or given up: a pack being written finishes; unless an index file names them
        now, the packs written are deleted again."""
        self._writer.shutdown(wait=True)
        if self._published or not self._written:
            return
        if self._index_name is not None and self._repo.index_file_exists(self._index_name):
            # The index file became visible although writing it failed (its directory's fsync
            # did): another writer may already deduplicate against these packs. Keep them;
            # prune collects them if no restore point comes to need them.
            return
        for pack_id in self._written:
            with contextlib.suppress(OSError):
                self._repo.delete_pack(pack_id)
