"""The sending half of an NBD connection, on a thread of its own.

Replies are queued as groups (a header and its data, sent without anything in between) and sent in
order by one thread per connection (from `SenderThreads`, which keeps the threads of connections
that ended for the next ones). Data that lives in a file goes out with ``sendfile``, from the
page cache to the socket without passing through Python; the kernel copy runs outside the GIL,
beside the event loop that parses the next requests, and a read of cold data blocks this thread,
not the loop. With TLS the same items are read and encrypted here instead."""

from __future__ import annotations

import contextlib
import os
import queue
import select
import socket
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

_ZEROS = bytes(1 << 20)
_MAX_GATHER = 64  # byte items sent with one sendmsg
COPY_BYTES = 1 << 20  # a file part that is copied is read and sent this much at a time


@dataclass(slots=True)
class FilePart:
    """``length`` bytes of the open file ``fd`` at ``offset`` (zeros past the file's end).
    ``copy``: read them and send the copy, not ``sendfile``: a spliced page goes out when the
    peer takes it, so a change of the file after the group was sent could still show (the
    export says when its files may change once the read is closed)."""

    fd: int
    offset: int
    length: int
    copy: bool = False


Item = bytes | memoryview | FilePart


class Encryptor(Protocol):
    """What TLS needs to provide: plaintext in, ciphertext out (called on the wire thread)."""

    def encrypt(self, plaintext: bytes) -> bytes: ...


def zeros(length: int) -> list[memoryview]:
    """Items that send ``length`` zero bytes without allocating them."""
    view = memoryview(_ZEROS)
    return [view[: min(len(_ZEROS), length - at)] for at in range(0, length, len(_ZEROS))]


class SenderThreads:
    """Daemon threads that run wires' sending loops. A thread whose wire is done waits for the
    next one (up to ``keep`` threads wait), so a new connection does not start a thread: that
    costs the event loop about 0.3 ms, as `Thread.start` waits until the thread runs."""

    def __init__(self, name: str = "nbd-wire", keep: int = 16) -> None:
        self._name = name
        self._keep = keep
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads that are done and will take the next job at once

    @property
    def idle(self) -> int:
        """Threads waiting for a wire."""
        with self._lock:
            return self._idle

    def run(self, job: Callable[[], None]) -> None:
        with self._lock:
            start = self._idle == 0
            if not start:
                self._idle -= 1
        self._jobs.put(job)
        if start:
            threading.Thread(target=self._worker, name=self._name, daemon=True).start()

    def close(self) -> None:
        """Let the waiting threads end, and the others once their wire is done."""
        with self._lock:
            waiting, self._idle, self._keep = self._idle, 0, 0
        for _ in range(waiting):
            self._jobs.put(None)

    def _worker(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()
            with self._lock:
                if self._idle >= self._keep:
                    return
                self._idle += 1


class Wire:
    """Queue groups with `send`; they go out in order. `close` stops the thread (after sending
    what is queued when ``flush``).

    A group of bytes that finds nothing queued before it is sent at once by the caller, as far
    as the socket takes it without waiting; only the rest, file parts, and encrypted groups
    wait for the thread, which starts with the first of them. So negotiation and small replies
    cost no thread switch, and a connection that sends nothing else never starts a thread."""

    def __init__(self, sock: socket.socket, senders: SenderThreads | None = None) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._senders = senders
        self._cond = threading.Condition()
        self._queue: deque[tuple[list[Item], Callable[[], None] | None,
                                 Encryptor | None]] = deque()
        self._closing = False
        self._flush_on_close = True
        self._running = False  # the thread's sending loop has started
        self._stopped = threading.Event()  # no sending loop runs (none started, or it ended)
        self._stopped.set()
        self.error: Exception | None = None  # why the wire stopped sending
        self.encryptor: Encryptor | None = None

    def send(self, items: list[Item], on_sent: Callable[[], None] | None = None, *,
             raw: bool = False) -> None:
        """Queue one group; ``on_sent`` runs once it is sent (on the caller's thread when it
        went at once, else on the wire thread), or when it is dropped because the connection
        failed; it must not raise. Once `encryptor` is set, groups are encrypted, except
        ``raw`` ones (TLS's own records)."""
        with self._cond:
            done = self._closing or self.error is not None
            if not done:
                encryptor = None if raw else self.encryptor
                if not self._queue and encryptor is None:
                    items = self._send_now(items)
                    done = not items or self.error is not None
                if not done:
                    self._queue.append((items, on_sent, encryptor))
                    self._wake()
        if done and on_sent is not None:
            on_sent()

    def _send_now(self, items: list[Item]) -> list[Item]:
        """Send the leading bytes of ``items`` as far as the socket takes them without waiting
        (file parts are the thread's: reading them may wait for the disk); -> what is left."""
        views: deque[memoryview] = deque()
        rest = 0
        for item in items:
            if isinstance(item, FilePart):
                break
            if len(item):
                views.append(memoryview(item))
            rest += 1
        while views:
            try:
                sent = self._sock.sendmsg([views[i] for i in range(min(len(views),
                                                                         _MAX_GATHER))])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # a dead peer: nothing more goes out
                self._failed(exc)
                return []
            _consume(views, sent)
        return [*views, *items[rest:]]

    def _wake(self) -> None:
        """The thread has a group to send: start it, or tell it (called holding the lock)."""
        if self._running:
            self._cond.notify()
            return
        self._running = True
        self._stopped.clear()
        (self._senders or SenderThreads(keep=0)).run(self._run)

    def close(self, *, flush_seconds: float = 5.0) -> None:
        """Stop the thread, after sending what is queued if the peer takes it within
        ``flush_seconds``."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if not self._stopped.wait(flush_seconds):
            with self._cond:
                self._flush_on_close = False
                self._cond.notify_all()
            self._stopped.wait()

    def close_if_idle(self) -> bool:
        """Stop at once if nothing is queued: True, and the socket is the caller's again (the
        thread sends nothing more); False, and nothing changed (call `close`, which waits)."""
        with self._cond:
            if self._queue:  # a group stays queued until it is sent
                return False
            self._closing = True
            self._cond.notify_all()
            return True

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            self._send_queued()
        finally:
            self._stopped.set()

    def _send_queued(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue or (self._closing and not self._flush_on_close) \
                        or self.error is not None:
                    break
                items, on_sent, encryptor = self._queue[0]
            try:
                self._send_group(items, encryptor)
            except Exception as exc:  # a dead peer, a file that cannot be read, a TLS
                with self._cond:  # failure: nothing more goes out
                    self._failed(exc)
            finally:
                with self._cond:
                    self._queue.popleft()
                    self._cond.notify_all()
                if on_sent is not None:
                    on_sent()
        self._drop_queued()

    def _failed(self, exc: Exception) -> None:
        """Sending failed, perhaps inside a reply (under the lock): a hard disconnect, as the
        NBD spec asks of a server that cannot finish a reply it began; the connection's reader
        then sees the end, and nothing more is sent."""
        self.error = exc
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def _drop_queued(self) -> None:
        with self._cond:
            dropped, self._queue = list(self._queue), deque()
            self._cond.notify_all()
        for _, on_sent, _ in dropped:
            if on_sent is not None:
                on_sent()

    def _send_group(self, items: list[Item], encryptor: Encryptor | None) -> None:
        if encryptor is not None:
            self._send_encrypted(items, encryptor)
            return
        pending: list[bytes | memoryview] = []
        for item in items:
            if isinstance(item, FilePart) and item.copy:
                for at in range(item.offset, item.offset + item.length, COPY_BYTES):
                    n = min(COPY_BYTES, item.offset + item.length - at)
                    pending.append(_file_bytes(FilePart(item.fd, at, n)))
                    self._send_buffers(pending)
                    pending = []
            elif isinstance(item, FilePart):
                self._send_buffers(pending)
                pending = []
                self._send_file(item)
            else:
                pending.append(item)
        self._send_buffers(pending)

    def _send_encrypted(self, items: list[Item], encryptor: Encryptor) -> None:
        plain = b"".join(_file_bytes(i) if isinstance(i, FilePart) else bytes(i) for i in items)
        self._send_buffers([encryptor.encrypt(plain)])

    def _send_buffers(self, buffers: list[bytes | memoryview]) -> None:
        views = deque(memoryview(b) for b in buffers if len(b))
        while views:
            batch = [views[i] for i in range(min(len(views), _MAX_GATHER))]
            try:
                sent = self._sock.sendmsg(batch)
            except (BlockingIOError, InterruptedError):
                self._wait_writable()
                continue
            _consume(views, sent)

    def _send_file(self, part: FilePart) -> None:
        offset, left = part.offset, part.length
        while left:
            try:
                sent = os.sendfile(self._fd, part.fd, offset, left)
            except (BlockingIOError, InterruptedError):
                self._wait_writable()
                continue
            if sent == 0:  # the file ends early (a base image shorter than the disk): zeros
                self._send_buffers([*zeros(left)])
                return
            offset, left = offset + sent, left - sent

    def _wait_writable(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        while True:
            with self._cond:
                if self._closing and not self._flush_on_close:
                    raise ConnectionAbortedError("the connection is closing")
            events = poller.poll(200)
            if events:
                for _, mask in events:
                    if mask & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                        raise ConnectionResetError("the peer closed the connection")
                return


def _consume(views: deque[memoryview], sent: int) -> None:
    """Drop the first ``sent`` bytes of ``views``."""
    while sent:
        head = views[0]
        if sent >= len(head):
            sent -= len(head)
            views.popleft()
        else:
            views[0] = head[sent:]
            sent = 0


def _file_bytes(part: FilePart) -> bytes:
    data = os.pread(part.fd, part.length, part.offset)
    return data + bytes(part.length - len(data))

