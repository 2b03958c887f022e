"""The sending half of a server connection: groups go out whole and in order, small ones at once
on the caller's thread (no thread started), the rest, file parts and large groups from the wire's
thread; sender threads are kept for the next connection."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from blocktrail.nbd.wire import FilePart, SenderThreads, Wire


@contextmanager
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    try:
        yield ours, theirs
    finally:
        ours.close()
        theirs.close()


def receive(sock: socket.socket, count: int) -> bytes:
    out = bytearray()
    sock.settimeout(10)
    while len(out) < count:
        chunk = sock.recv(count - len(out))
        assert chunk, "closed early"
        out += chunk
    return bytes(out)


def test_a_small_group_goes_at_once_without_a_thread() -> None:
    senders = SenderThreads("test-wire")
    with pair() as (ours, theirs):
        wire = Wire(ours, senders)
        threads = threading.active_count()
        sent_on: list[threading.Thread] = []
        wire.send([b"head", memoryview(b"-body")], lambda: sent_on.append(
            threading.current_thread()))
        assert sent_on == [threading.current_thread()]  # sent before send returned
        assert receive(theirs, 9) == b"head-body"
        assert threading.active_count() == threads  # no thread was started
        assert wire.close_if_idle()
        wire.send([b"late"], lambda: sent_on.append(threading.current_thread()))
        assert len(sent_on) == 2  # dropped after close, still reported
        wire.close()


def test_what_the_socket_does_not_take_goes_from_the_thread_in_order(tmp_path: Path) -> None:
    big = os.urandom(8 << 20)  # far more than a socket buffer
    (tmp_path / "f").write_bytes(b"F" * 70_000)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        with pair() as (ours, theirs):
            wire = Wire(ours)
            done: list[str] = []
            wire.send([b"<", big, b">"], lambda: done.append("big"))
            assert done == []  # the rest waits for the thread
            wire.send([b"a"], lambda: done.append("a"))  # behind the big one, not beside it
            wire.send([b"[", FilePart(fd, 0, 70_000), b"]"], lambda: done.append("file"))
            got = receive(theirs, len(big) + 2 + 1 + 70_002)
            assert got == b"<" + big + b">" + b"a" + b"[" + b"F" * 70_000 + b"]"
            deadline = time.monotonic() + 10
            while len(done) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert done == ["big", "a", "file"]
            wire.close()
    finally:
        os.close(fd)


def test_a_dead_peer_drops_the_group_and_reports_it() -> None:
    with pair() as (ours, theirs):
        theirs.close()
        wire = Wire(ours)
        dropped: list[bool] = []
        wire.send([b"x" * 100], lambda: dropped.append(True))
        wire.send([b"y"], lambda: dropped.append(True))
        assert dropped == [True, True] and wire.error is not None
        wire.close()


def test_sender_threads_are_kept_for_the_next_wire(tmp_path: Path) -> None:
    senders = SenderThreads("test-keep", keep=2)
    names: set[int] = set()
    (tmp_path / "f").write_bytes(b"z" * 10)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        for _ in range(5):
            with pair() as (ours, theirs):
                wire = Wire(ours, senders)
                seen = threading.Event()

                def note(seen: threading.Event = seen) -> None:
                    names.add(threading.get_ident())
                    seen.set()

                wire.send([FilePart(fd, 0, 10)], note)  # a file part: the thread sends it
                assert receive(theirs, 10) == b"z" * 10
                assert seen.wait(10)
                wire.close()
                deadline = time.monotonic() + 10
                while not senders.idle and time.monotonic() < deadline:  # back from the wire
                    time.sleep(0.001)
    finally:
        os.close(fd)
    assert len(names) == 1  # one thread served all five, one after the other
    waiting = threading.active_count()
    senders.close()  # the waiting thread ends
    deadline = time.monotonic() + 10
    while threading.active_count() >= waiting and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == waiting - 1 and senders.idle == 0
