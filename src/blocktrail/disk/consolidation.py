"""Removing a snapshot: merge layers online, one short locked step at a time.

A removal leaves a layer that belongs to no snapshot below the top; the consolidation merges
the layer above it into it, pair by pair, until the unowned layer either takes over a snapshot's
layer or becomes the writable top again. Guest writes never land in a layer being merged: when the
child is the writable top, a new empty helper top is put above it first. The last, small helper
is merged under the disk lock in one step (the "stun"), like VMware's consolidation.

The removed snapshot's layer is the one merged into, in place: reads of that snapshot mapped
before the removal (`Disk.map_read`, sent later from duplicate descriptors) pin the snapshot,
and the merge changes nothing until they are closed. None can be taken after the removal (the
snapshot is gone), so the wait ends once the replies in flight are sent; it is bounded, and a
merge that cannot start yet is left for later (`SnapshotReadsInFlight`), never begun under a
reader.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from blocktrail.disk import chain
from blocktrail.disk.layers import DeltaLayer
from blocktrail.disk.stack import LayerStack
from blocktrail.errors import SnapshotReadsInFlight

FINAL_MERGE_MAX_CLUSTERS = 64
MAX_HELPER_ROUNDS = 8
# How long `Consolidation.run` waits for reads of the removed snapshot still being sent (an NBD
# connection holds at most 64 MiB of replies: a client that reads at all takes them in seconds).
READS_WAIT_SECONDS = 30.0


@dataclass(slots=True)
class _Pair:
    child_id: str
    todo: list[int]  # child clusters still to copy, in order
    final: bool  # merging the writable top under the lock
    synced: bool = False  # all copied and the parent made durable (outside the lock)


class Consolidation:
    """The merge of a removed snapshot's layer; `step` until `done`."""

    def __init__(self, stack: LayerStack, parent_id: str, on_done: Callable[[], None],
                 removed: str | None = None) -> None:
        """``removed``: the change ID of the removed snapshot whose layer ``parent_id`` was (None:
        no reader can have mapped it, e.g. a restored base, or a merge resumed at open)."""
        self._stack = stack
        self._removed = removed
        self._on_done = on_done
        self.parent_id = parent_id
        self._pair: _Pair | None = None
        self._rounds = 0
        self.done = False
        self.clusters_copied = 0
        self._sync_lock = threading.Lock()
        self._garbage: list[str] = []  # files of merged layers, deleted outside the lock
        self._unpinned = removed is None  # no mapped read of the removed snapshot is left

    @property
    def reads_in_flight(self) -> int:
        """Mapped reads of the removed snapshot, taken before its removal and not closed yet:
        until they are, the merge changes nothing (they may still read its layer's files)."""
        if self._unpinned or self.done:
            return 0
        assert self._removed is not None
        count = self._stack.pins(self._removed)
        self._unpinned = not count  # no new ones come: the snapshot is gone
        return count

    def step(self, max_clusters: int = 256) -> bool:
        """Copy up to ``max_clusters`` clusters under the disk lock; -> True when finished.
        While `reads_in_flight`: nothing is done (-> False)."""
        stack = self._stack
        with stack.lock:
            if not self.done:
                stack.check_usable()
                if self.reads_in_flight:
                    return False
                self._step_locked(max_clusters)
            pair, garbage, self._garbage = self._pair, self._garbage, []
        stack.delete_files(garbage)  # big files take long to unlink: not under the lock
        if pair is not None and not pair.todo and not pair.synced:
            # Copied: make the parent durable without holding guest I/O up. Nobody else
            # writes the parent (it lies below the top); the next step commits the merge.
            with self._sync_lock:
                if not pair.synced:
                    stack.guard(stack.layer(self.parent_id).flush)
                    pair.synced = True
        return self.done

    def run(self, wait_seconds: float | None = None) -> None:
        """Step until done. Reads of the removed snapshot still in flight are waited for, up to
        ``wait_seconds`` in all (default `READS_WAIT_SECONDS`), outside the disk lock (not at
        all by a thread that holds the lock: it would hold up every guest I/O); past that
        `SnapshotReadsInFlight`, and the merge is still to run (nothing of it was done)."""
        stack = self._stack
        deadline = time.monotonic() + (READS_WAIT_SECONDS if wait_seconds is None
                                       else wait_seconds)
        while not self.step():
            reads = self.reads_in_flight
            if not reads:
                continue
            left = 0.0 if stack.lock.held_here else deadline - time.monotonic()
            assert self._removed is not None  # reads_in_flight says so
            if not stack.wait_unpinned(self._removed, left):
                raise SnapshotReadsInFlight(
                    f"disk {stack.path}: the layer of a removed snapshot is not merged yet: "
                    f"{reads} read(s) of that snapshot, mapped before it was removed, are "
                    "still being sent (an NBD client that takes its replies slowly or not at "
                    "all); try again once they are sent, or disconnect that client")

    def _step_locked(self, max_clusters: int) -> None:
        stack = self._stack
        if self._pair is None:
            self._start_pair()
            if self.done:
                return
        pair = self._pair
        assert pair is not None
        parent, child = stack.layer(self.parent_id), stack.layer(pair.child_id)
        assert isinstance(child, DeltaLayer)
        batch = pair.todo if pair.final else pair.todo[:max_clusters]
        stack.guard(chain.merge_clusters, parent, child, batch)
        del pair.todo[: len(batch)]
        self.clusters_copied += len(batch)
        if not pair.todo and (pair.final or pair.synced):
            self._garbage += stack.finish_merge(self.parent_id, pair.child_id)
            self._pair = None

    def _start_pair(self) -> None:
        """Pick the layer above the unowned parent and get it ready to merge."""
        stack = self._stack
        layers = stack.layers
        index = stack.index(self.parent_id)
        if layers[index].snapshot is not None or index == len(layers) - 1:
            self.done = True  # the parent holds a snapshot again, or is the top again
            self._on_done()
            return
        child = layers[index + 1]
        assert isinstance(child, DeltaLayer)
        final = False
        if index + 1 == len(layers) - 1:  # the child is the writable top
            small = len(child.states) <= FINAL_MERGE_MAX_CLUSTERS
            if small or self._rounds >= MAX_HELPER_ROUNDS:
                final = True
            else:
                stack.push_helper_top()
                self._rounds += 1
        parent = stack.layer(self.parent_id)
        stack.guard(chain.hide_below_limit, parent, child)
        self._pair = _Pair(child.id, sorted(child.states), final)
