"""The disk's lock: shared by guest I/O, exclusive (reentrant) for changes of the layer structure.

Shared holders (reads, writes, flushes) run in parallel with each other, never with an exclusive
holder. A waiting exclusive holder holds off new shared ones, so structure changes are not
starved; a thread that already holds the lock (shared or exclusively) may take it shared again
without waiting.

The shared path is on every guest request: it takes one plain mutex (no Condition unless it must
wait) and notifies only when an exclusive holder is waiting for it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from types import TracebackType


class DiskLock:
    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._owner: int | None = None
        self._depth = 0
        self._readers = 0
        self._writers_waiting = 0
        self._local = threading.local()
        self._shared = _Shared(self)

    def __enter__(self) -> None:
        me = threading.get_ident()
        with self._mutex:
            if self._owner == me:
                self._depth += 1
                return
            if getattr(self._local, "reads", 0):
                raise RuntimeError("a reader of the disk may not take its lock exclusively")
            self._writers_waiting += 1
            while self._owner is not None or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._owner, self._depth = me, 1

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        with self._mutex:
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()

    @property
    def held_here(self) -> bool:
        """Whether this thread holds the lock exclusively."""
        return self._owner == threading.get_ident()

    def shared(self) -> _Shared:
        """``with lock.shared():`` holds the lock shared."""
        return self._shared

    @contextlib.contextmanager
    def shared_if_free(self) -> Iterator[bool]:
        """``with lock.shared_if_free() as held:`` holds the lock shared when that takes no
        waiting (``held`` True), else holds nothing (False)."""
        counted = self.acquire_shared(blocking=False)
        try:
            yield counted is not None
        finally:
            self.release_shared(counted)

    def acquire_shared(self, *, blocking: bool = True) -> bool | None:
        """Take the lock shared; -> whether the hold was counted (pass it to `release_shared`),
        or None when ``blocking`` is False and an exclusive holder holds or waits for it."""
        local = self._local
        reads = getattr(local, "reads", 0)
        with self._mutex:
            if self._owner is not None and self._owner == threading.get_ident():
                return False  # already exclusive: reading is allowed
            if not reads:
                while self._owner is not None or self._writers_waiting:
                    if not blocking:
                        return None
                    self._cond.wait()
            self._readers += 1
        local.reads = reads + 1
        return True

    def release_shared(self, counted: bool | None) -> None:
        if counted:
            self._local.reads -= 1
            with self._mutex:
                self._readers -= 1
                if not self._readers and self._writers_waiting:
                    self._cond.notify_all()


class _Shared:
    """The context manager of `DiskLock.shared` (one per lock; the hold is counted per thread)."""

    def __init__(self, lock: DiskLock) -> None:
        self._lock = lock
        self._counted = threading.local()

    def __enter__(self) -> None:
        counted = self._lock.acquire_shared()
        stack = getattr(self._counted, "stack", None)
        if stack is None:
            stack = self._counted.stack = []
        stack.append(counted)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._lock.release_shared(self._counted.stack.pop())
