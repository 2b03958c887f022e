"""The disk's lock: exclusive (reentrant) for writes and chain changes, shared for reads.

Readers run in parallel with each other (their preads release the GIL), never with a writer.
A waiting writer holds off new readers, so writes are not starved; a thread that already reads,
or already holds the lock exclusively, may read again without waiting.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType


class DiskLock:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._readers = 0
        self._writers_waiting = 0
        self._local = threading.local()

    def __enter__(self) -> None:
        me = threading.get_ident()
        with self._cond:
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
        with self._cond:
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()

    @contextmanager
    def shared(self) -> Iterator[None]:
        counted = self.acquire_shared()
        try:
            yield
        finally:
            self.release_shared(counted)

    def acquire_shared(self, *, blocking: bool = True) -> bool | None:
        """Take the lock shared; -> whether the hold was counted (pass it to `release_shared`),
        or None when ``blocking`` is False and a writer holds or waits for the lock."""
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:  # already exclusive: reading is allowed
                return False
            if not getattr(self._local, "reads", 0):
                while self._owner is not None or self._writers_waiting:
                    if not blocking:
                        return None
                    self._cond.wait()
            self._readers += 1
            self._local.reads = getattr(self._local, "reads", 0) + 1
            return True

    def release_shared(self, counted: bool | None) -> None:
        if counted:
            with self._cond:
                self._readers -= 1
                self._local.reads -= 1
                if not self._readers:
                    self._cond.notify_all()
