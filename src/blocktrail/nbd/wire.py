"""The sending half of an NBD connection, on a thread of its own.

Replies are queued as groups (a header and its data, sent without anything in between) and sent in
order by one thread per connection. Data that lives in a file goes out with ``sendfile``, from the
page cache to the socket without passing through Python; the kernel copy runs outside the GIL,
beside the event loop that parses the next requests, and a read of cold data blocks this thread,
not the loop. With TLS the same items are read and encrypted here instead.
"""

from __future__ import annotations

import os
import select
import socket
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

_ZEROS = bytes(1 << 20)
_MAX_GATHER = 64  # byte items sent with one sendmsg


@dataclass(slots=True)
class FilePart:
    """``length`` bytes of the open file ``fd`` at ``offset`` (zeros past the file's end)."""

    fd: int
    offset: int
    length: int


Item = bytes | memoryview | FilePart


class Encryptor(Protocol):
    """What TLS needs to provide: plaintext in, ciphertext out (called on the wire thread)."""

    def encrypt(self, plaintext: bytes) -> bytes: ...


def zeros(length: int) -> list[memoryview]:
    """Items that send ``length`` zero bytes without allocating them."""
    view = memoryview(_ZEROS)
    return [view[: min(len(_ZEROS), length - at)] for at in range(0, length, len(_ZEROS))]


class Wire:
    """Queue groups with `send`; they go out in order. `close` stops the thread (after sending
    what is queued when ``flush``)."""

    def __init__(self, sock: socket.socket, name: str = "nbd-wire") -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._cond = threading.Condition()
        self._queue: deque[tuple[list[Item], Callable[[], None] | None,
                                 Encryptor | None]] = deque()
        self._closing = False
        self._flush_on_close = True
        self.error: Exception | None = None  # why the wire stopped sending
        self.encryptor: Encryptor | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def send(self, items: list[Item], on_sent: Callable[[], None] | None = None, *,
             raw: bool = False) -> None:
        """Queue one group; ``on_sent`` runs on the wire thread once it is sent, or when it
        is dropped because the connection failed (it must not raise). Once `encryptor` is set,
        groups are encrypted, except ``raw`` ones (TLS's own records)."""
        with self._cond:
            if self._closing or self.error is not None:
                dropped = True
            else:
                dropped = False
                self._queue.append((items, on_sent, None if raw else self.encryptor))
                self._cond.notify()
        if dropped and on_sent is not None:
            on_sent()

    def close(self, *, flush_seconds: float = 5.0) -> None:
        """Stop the thread, after sending what is queued if the peer takes it within
        ``flush_seconds``."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(flush_seconds)
        if self._thread.is_alive():
            with self._cond:
                self._flush_on_close = False
                self._cond.notify_all()
            self._thread.join()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
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
            except Exception as exc:  # a dead peer, or a TLS failure: nothing more goes out
                with self._cond:
                    self.error = exc
            finally:
                with self._cond:
                    self._queue.popleft()
                    self._cond.notify_all()
                if on_sent is not None:
                    on_sent()
        self._drop_queued()

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
            if isinstance(item, FilePart):
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
            while sent:
                head = views[0]
                if sent >= len(head):
                    sent -= len(head)
                    views.popleft()
                else:
                    views[0] = head[sent:]
                    sent = 0

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


def _file_bytes(part: FilePart) -> bytes:
    data = os.pread(part.fd, part.length, part.offset)
    return data + bytes(part.length - len(data))

