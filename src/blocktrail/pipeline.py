"""Bounded read-ahead: apply a function to items on a few threads, results in order."""

from __future__ import annotations

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
