"""The disk lock: parallel readers, lone writers, reentrancy, no upgrade."""

from __future__ import annotations

import threading
import time

import pytest

from blocktrail.disk.rwlock import DiskLock


def test_readers_share_and_writers_wait_for_them() -> None:
    lock = DiskLock()
    inside = threading.Barrier(3, timeout=5)
    events: list[str] = []

    def reader() -> None:
        with lock.shared():
            inside.wait()  # all three readers are inside at once
            time.sleep(0.05)
            events.append("read")

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    inside.wait()
    with lock:  # waits until both readers left
        events.append("write")
    for t in threads:
        t.join()
    assert events == ["read", "read", "write"]


def test_writer_is_reentrant_and_may_read() -> None:
    lock = DiskLock()
    with lock, lock, lock.shared():
        pass
    with lock.shared(), lock.shared():  # a reader may read again
        pass


def test_a_reader_cannot_upgrade() -> None:
    lock = DiskLock()
    with lock.shared(), pytest.raises(RuntimeError, match="may not take"), lock:
        pass


def test_waiting_writer_holds_off_new_readers() -> None:
    lock = DiskLock()
    order: list[str] = []
    first_in = threading.Event()

    def first_reader() -> None:
        with lock.shared():
            first_in.set()
            time.sleep(0.1)
            order.append("reader-1")

    def writer() -> None:
        with lock:
            order.append("writer")

    def second_reader() -> None:
        with lock.shared():
            order.append("reader-2")

    t1 = threading.Thread(target=first_reader)
    t1.start()
    first_in.wait()
    tw = threading.Thread(target=writer)
    tw.start()
    time.sleep(0.03)  # the writer now waits
    t2 = threading.Thread(target=second_reader)
    t2.start()
    for t in (t1, tw, t2):
        t.join()
    assert order == ["reader-1", "writer", "reader-2"]
