"""A disk's chain of layers and the steps that change it, shared by `Disk` and `Consolidation`.

`Disk` owns one `LayerStack` and gives it the two things only the disk knows: how to commit its
metadata (disk.json) and how large a new top must be. `Consolidation` works through the stack's
public steps, so neither reaches into the other.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from blocktrail.disk.layers import DeltaLayer, Layer
from blocktrail.disk.rwlock import DiskLock
from blocktrail.errors import BlocktrailError, DiskClosed, io_error
from blocktrail.fileio import FileIO

_P = ParamSpec("_P")
_R = TypeVar("_R")


class LayerStack:
    """The layers bottom to top, the disk lock, and whether the disk is still usable."""

    def __init__(self, path: str, fileio: FileIO, layers: list[Layer], cluster_size: int,
                 commit: Callable[[], None], top_size: Callable[[], int]) -> None:
        self.path = path
        self.fileio = fileio
        self.layers = layers
        self.cluster_size = cluster_size
        self.lock = DiskLock()
        self.closed = False
        self.failed: BaseException | None = None
        self._commit = commit
        self._top_size = top_size
        self._pins: dict[str, int] = {}  # snapshot change ID -> its mapped reads not closed
        self._pins_changed = threading.Condition()

    # ------------------------------------------------------------------ state

    def check_usable(self) -> None:
        if self.closed:
            raise DiskClosed(f"disk {self.path} is closed")
        if self.failed is not None:
            raise DiskClosed(f"disk {self.path} failed ({self.failed!r}); reopen it to recover")

    def guard(self, fn: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs) -> _R:
        """Run a step whose failure leaves memory and files out of step: the disk is unusable
        afterwards (reopen it to recover from the files)."""
        try:
            return fn(*args, **kwargs)
        except BlocktrailError:
            raise
        except OSError as exc:
            self.failed = exc
            raise io_error(f"I/O error on disk {self.path}", exc,
                           "; nothing acknowledged is lost: reopen the disk to recover") from exc
        except BaseException as exc:
            self.failed = exc
            raise

    def commit(self) -> None:
        """Atomically replace disk.json with the in-memory state."""
        self._commit()

    # ------------------------------------------------------------------ pins

    def pin(self, change_id: str) -> None:
        """A mapped read of the snapshot of ``change_id`` holds descriptors of the layers of
        its view, to be read later: until `unpin`, the merge that removes that snapshot changes
        nothing (taken under the disk lock, shared, with the snapshot found there). Only that
        merge would change what the read maps: another one changes a layer only where a layer
        above it in the view holds the bytes."""
        with self._pins_changed:
            self._pins[change_id] = self._pins.get(change_id, 0) + 1

    def unpin(self, change_id: str) -> None:
        """The mapped read was closed (on any thread; never waits for the disk lock)."""
        with self._pins_changed:
            left = self._pins[change_id] - 1
            if left:
                self._pins[change_id] = left
            else:
                del self._pins[change_id]
                self._pins_changed.notify_all()

    def pins(self, change_id: str) -> int:
        with self._pins_changed:
            return self._pins.get(change_id, 0)

    def wait_unpinned(self, change_id: str, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until no mapped read pins the snapshot; -> whether
        none does. Not to be called holding the disk lock: closers do not need it, but guest
        I/O does."""
        with self._pins_changed:
            return self._pins_changed.wait_for(lambda: change_id not in self._pins,
                                               max(0.0, timeout))

    # ------------------------------------------------------------------ layers

    @property
    def top(self) -> Layer:
        return self.layers[-1]

    def layer(self, layer_id: str) -> Layer:
        return self.layers[self.index(layer_id)]

    def index(self, layer_id: str) -> int:
        return next(i for i, la in enumerate(self.layers) if la.id == layer_id)

    def seal_of(self, layer: Layer) -> dict[str, list[int]]:
        return {name: list(self.fileio.seal(os.path.join(self.path, name)))
                for name in layer.file_names()}

    def push_top(self) -> None:
        """Put a new empty delta above the (flushed) top and commit."""
        top = DeltaLayer.create(self.fileio, self.path, new_layer_id(), self.cluster_size,
                                self._top_size())
        self.fileio.fsync_dir(self.path)
        self.layers.append(top)
        self._commit()

    def freeze_top(self) -> None:
        """Flush the top and seal it: no guest write lands in it from now on (the caller puts a
        new top above it, or the disk closes)."""
        top = self.top
        self.guard(top.flush)
        top.seal = self.guard(self.seal_of, top)

    def push_helper_top(self) -> None:
        """Freeze the top for a merge under a new, empty top."""
        self.freeze_top()
        self.guard(self.push_top)

    def finish_merge(self, parent_id: str, child_id: str) -> list[str]:
        """The child's clusters are all in the parent: make that durable, drop the child.
        -> the child's files, now referenced by nothing, for the caller to delete."""
        parent, child = self.layer(parent_id), self.layer(child_id)
        self.guard(parent.flush)
        parent.snapshot = child.snapshot
        self.layers.remove(child)
        frozen = parent.snapshot is not None and parent is not self.top
        parent.seal = self.guard(self.seal_of, parent) if frozen else None
        self.guard(self._commit)
        child.close()
        return [os.path.join(self.path, name) for name in child.file_names()]

    def delete_files(self, paths: list[str]) -> None:
        """Delete files no metadata references any more (a crash before this leaves them to
        the next open)."""
        for path in paths:
            self.guard(unlink_unreferenced, self.fileio, path)


def unlink_unreferenced(fileio: FileIO, path: str) -> None:
    """Delete a file no metadata references; one already gone is fine. Two deleters may race
    for it: a consolidation deletes a merged layer's files outside the disk lock, and a reset or
    revert deletes every unreferenced file in between its steps."""
    with contextlib.suppress(FileNotFoundError):
        fileio.unlink(path)


def new_layer_id() -> str:
    return secrets.token_hex(8)  # the form meta.LAYER_ID checks: it goes into file names
