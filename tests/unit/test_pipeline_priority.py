"""A background thread lowers its own CPU priority (its nice value), not its process's or any
other thread's; the fill of an instant restore and its background fetches run so."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from blocktrail.backup.chunksource import RepositoryChunkSource
from blocktrail.pipeline import BACKGROUND_NICE, background_priority

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice is Linux's")


def _nice_of(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


@linux_only
def test_background_priority_lowers_only_the_calling_thread() -> None:
    mine = _nice_of(threading.get_native_id())
    seen: list[int] = []

    def work() -> None:
        background_priority()
        seen.append(_nice_of(threading.get_native_id()))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen == [min(19, mine + BACKGROUND_NICE)]
    assert _nice_of(threading.get_native_id()) == mine


@linux_only
def test_background_fetch_threads_run_at_the_lower_priority() -> None:
    mine = _nice_of(threading.get_native_id())
    source = RepositoryChunkSource("/nonexistent", "p", chunk_size=65536, connect=False)
    try:
        nice = source._background_pool.submit(
            lambda: _nice_of(threading.get_native_id())).result()
        foreground = source._pool.submit(
            lambda: _nice_of(threading.get_native_id())).result()
    finally:
        source.close()
    assert nice == min(19, mine + BACKGROUND_NICE)
    assert foreground == mine
