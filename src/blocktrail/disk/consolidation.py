"""Removing a snapshot: merge layers online, one short locked step at a time.

A removal leaves a layer that belongs to no snapshot below the top; the consolidation merges
the layer above it into it, pair by pair, until the unowned layer either takes over a snapshot's
layer or becomes the writable top again. Guest writes never land in a layer being merged: when the
child is the writable top, a new empty helper top is put above it first. The last, small helper
is merged under the disk lock in one step (the "stun"), like VMware's consolidation.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from blocktrail.disk import chain
from blocktrail.disk.layers import DeltaLayer
from blocktrail.disk.stack import LayerStack

FINAL_MERGE_MAX_CLUSTERS = 64
MAX_HELPER_ROUNDS = 8


@dataclass(slots=True)
class _Pair:
    child_id: str
    todo: list[int]  # child clusters still to copy, in order
    final: bool  # merging the writable top under the lock
    synced: bool = False  # all copied and the parent made durable (outside the lock)


class Consolidation:
    """The merge of a removed snapshot's layer; `step` until `done`."""

    def __init__(self, stack: LayerStack, parent_id: str, on_done: Callable[[], None]) -> None:
        self._stack = stack
        self._on_done = on_done
        self.parent_id = parent_id
        self._pair: _Pair | None = None
        self._rounds = 0
        self.done = False
        self.clusters_copied = 0
        self._sync_lock = threading.Lock()
        self._garbage: list[str] = []  # files of merged layers, deleted outside the lock

    def step(self, max_clusters: int = 256) -> bool:
        """Copy up to ``max_clusters`` clusters under the disk lock; -> True when finished."""
        stack = self._stack
        with stack.lock:
            if not self.done:
                stack.check_usable()
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

    def run(self) -> None:
        while not self.step():
            pass

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
