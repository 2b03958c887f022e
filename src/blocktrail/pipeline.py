"""Bounded read-ahead: apply a function to items on a few threads, results in order; and the
lower CPU priority of a thread that does background work."""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def read_ahead(items: Iterable[T], work: Callable[[T], R], *, window: int,
               executor: Executor | None = None, threads: int = 4) -> Iterator[R]:
    """``work(item)`` for each item, in order, with at most ``window`` in flight: scattered
    reads overlap and memory stays bounded (unlike ``Executor.map``, which submits all)."""
    own = executor is None
    pool = executor or ThreadPoolExecutor(max_workers=threads, thread_name_prefix="read-ahead")
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(work, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        if own:
            pool.shutdown(wait=True)


BACKGROUND_NICE = 10  # added to a background thread's nice value (as `nice` does by default)


def background_priority() -> None:
    """Lower the CPU priority of the calling thread (Linux gives each thread its own nice
    value): work that must keep out of the way (an instant restore's fill) yields the CPU to
    what waits for it now (a guest booting under emulation does no I/O the fill could see,
    only computing). Where that cannot be done, nothing changes."""
    try:
        tid = threading.get_native_id()
        now = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, now + BACKGROUND_NICE))
    except (AttributeError, OSError):
        pass
