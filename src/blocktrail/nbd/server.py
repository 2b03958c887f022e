"""The asyncio NBD server: serves a `Catalog` of exports (`blocktrail.nbd.export`) on listening
sockets; it knows nothing of what stands behind an export.

Each connection is a coroutine on the event loop that receives and parses requests (the
sans-IO `ServerConnection`), plus a `Wire` thread that sends replies. Reads of data at rest are
answered without copying: the export maps the range to files and the wire sends them with
``sendfile``; when the export would have to wait (a writer holds a disk, say), or for writes,
flushes and block status, the work runs on a small thread pool and the reply is queued from
there (a small write, and a small BLOCK_STATUS answer, are done on the loop when the export
says they can be). Replies may leave in any order
(NBD matches them by cookie); each is sent whole.

TLS (`ServerTls`): STARTTLS with x509 certificates or a PSK, allowed or required. After the
handshake the loop decrypts what it receives and the wire thread encrypts what it sends (reads
are then copied through Python: no sendfile under TLS); the session is shared under a lock.

Limits: connections (further ones are closed at once), the time a client may take to negotiate
(slowloris), and per connection the requests and bytes in flight: past them the server stops
reading from the client until replies have gone out, so a client that sends and never reads
costs bounded memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from blocktrail.nbd.export import Catalog, Export, MappedRead, ReadSegment
from blocktrail.nbd.limits import ServerLimits
from blocktrail.nbd.proto import (
    NEED_DATA,
    Command,
    CommandFlag,
    Disconnect,
    Errno,
    ExportChosen,
    InvalidRequest,
    ReplyType,
    Request,
    ServerConnection,
)
from blocktrail.nbd.proto.errors import NbdError, RequestFailed
from blocktrail.nbd.proto.events import StartTls, TlsMode
from blocktrail.nbd.tls import ServerTlsContext, TlsSession
from blocktrail.nbd.wire import FilePart, Item, SenderThreads, Wire, zeros

log = logging.getLogger(__name__)
_FUA = int(CommandFlag.FUA)
RECEIVE_BYTES = 256 * 1024
# Replies of requests done on the loop are held while more requests are there at once, up to
# this many bytes of replies, or of requests received meanwhile (a reply waits little).
REPLY_BATCH_BYTES = 16 * 1024
REPLY_HOLD_RECEIVED = 1 << 20
# option replies queued unsent past which negotiation reads no more options
NEGOTIATION_QUEUE_BYTES = 1 << 20
SEND_BUFFER_BYTES = 4 << 20
ACCEPT_BATCH = 64  # connections taken per wake-up of the loop, at most
ACCEPT_RETRY_S = 1.0  # out of file descriptors: listening again after this long


@dataclass(frozen=True, slots=True)
class ServerTls:
    """``mode`` ALLOW or REQUIRE with loaded credentials (`blocktrail.nbd.tls.server_context`)."""

    mode: TlsMode
    context: ServerTlsContext


class NbdServer:
    """Serve `catalog` on listening sockets until `close`."""

    def __init__(self, catalog: Catalog, limits: ServerLimits | None = None,
                 tls: ServerTls | None = None) -> None:
        limits = limits or ServerLimits()
        self.catalog = catalog
        self.limits = limits
        self.tls = tls
        self.workers = _Workers(limits.disk_threads, "nbd-disk")
        self.senders = SenderThreads("nbd-wire")
        self._connections: set[asyncio.Task[None]] = set()
        self._listeners: list[socket.socket] = []
        self.refused_connections = 0

    @property
    def connections(self) -> int:
        return len(self._connections)

    def listen(self, sock: socket.socket) -> None:
        """Accept connections on ``sock`` (bound, listening, non-blocking) from now on."""
        self._listeners.append(sock)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, listener: socket.socket) -> None:
        """Take the connections waiting on ``listener`` (a reader callback: no task is woken,
        and no reader added and removed again, per connection). Out of file descriptors or
        memory (EMFILE, ENFILE, ENOBUFS, ENOMEM), it stops listening for `ACCEPT_RETRY_S` (the
        connections wait in the backlog) instead of waking the loop again at once for each."""
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # that one went before it was taken
            except OSError as exc:  # out of resources (or anything else): no busy loop
                log.error("NBD: cannot accept a connection (%s); trying again in %g s", exc,
                          ACCEPT_RETRY_S)
                loop = asyncio.get_running_loop()
                loop.remove_reader(listener.fileno())
                loop.call_later(ACCEPT_RETRY_S, self._listen_again, listener)
                return
            self._admit(sock)

    def _listen_again(self, listener: socket.socket) -> None:
        if listener in self._listeners:  # not closed meanwhile
            asyncio.get_running_loop().add_reader(listener.fileno(), self._accept, listener)

    def _admit(self, sock: socket.socket) -> None:
        if len(self._connections) >= self.limits.max_connections:
            self.refused_connections += 1
            sock.close()
            return
        try:
            sock.setblocking(False)
            with contextlib.suppress(OSError):  # fewer stalls of the wire on a full buffer
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                with contextlib.suppress(OSError):  # reset already: its first read says so
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = _Connection(self, sock)
        except BaseException:
            sock.close()
            raise
        task = asyncio.create_task(connection.run())
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for listener in self._listeners:
            if listener.fileno() >= 0:  # else closed already, and its reader with it
                loop.remove_reader(listener.fileno())
        self._listeners.clear()
        for task in self._connections:
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        self.workers.close()
        self.senders.close()


class _Connection:
    def __init__(self, server: NbdServer, sock: socket.socket) -> None:
        self._server = server
        self._limits = server.limits
        self._sock = sock
        self._tls = server.tls
        self._proto = ServerConnection(server.catalog,
                                       TlsMode.OFF if self._tls is None else self._tls.mode)
        self._lock = threading.Lock()  # the sans-IO core and the accounting below
        self._wire = Wire(sock, server.senders)
        self._session: TlsSession | None = None
        self._tls_lock = threading.Lock()  # the TLS session: decrypting here, encrypting there
        self._in_flight = 0
        self._bytes_in_flight = 0
        self._room = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._waiting = False
        self._readable: asyncio.Future[None] | None = None  # what `_until_readable` awaits
        self._watched = False  # the socket is registered with the loop for reading

    async def run(self) -> None:
        try:
            async with asyncio.timeout(self._limits.handshake_seconds):
                chosen = await self._negotiate()
            if chosen is not None:
                await self._transmit(chosen)
        except (NbdError, TimeoutError, OSError):  # protocol and TLS errors end the connection
            pass
        finally:
            self._unwatch()
            if self._session is not None:
                with contextlib.suppress(NbdError), self._tls_lock:
                    self._session.close()  # close_notify, queued behind the last reply
                self._wire.send([])
            if not self._wire.close_if_idle():  # else wait for the last replies to go out
                await asyncio.to_thread(self._wire.close)
            self._sock.close()

    async def _receive(self, *, wait_first: bool = False) -> None:
        """Receive what comes next (in plaintext: into the core's buffer). ``wait_first``: the
        socket was found empty just now, so wait before trying it."""
        if self._session is not None:
            self._decrypt(await self._recv_bytes())
            return
        if wait_first:
            await self._until_readable()
        while self._receive_now() is None:
            await self._until_readable()

    async def _recv_bytes(self) -> bytes:
        """Bytes from the socket as they come (b"": EOF): TLS records."""
        while True:
            try:
                return self._sock.recv(RECEIVE_BYTES)
            except (BlockingIOError, InterruptedError):
                await self._until_readable()

    async def _until_readable(self) -> None:
        """Wait until the socket has something to read (or is closed). The socket stays
        registered with the loop from one wait to the next (no epoll_ctl, no future of the
        loop's sock_recv per request); `_on_readable` takes it off when nobody waits."""
        self._readable = waiter = self._loop.create_future()
        if not self._watched:
            self._loop.add_reader(self._sock.fileno(), self._on_readable)
            self._watched = True
        try:
            await waiter
        finally:
            self._readable = None

    def _on_readable(self) -> None:
        waiter = self._readable
        if waiter is None:  # nobody reads now (replies are awaited, say): stop watching, or
            self._unwatch()  # the loop would call this on each of its turns until then
        elif not waiter.done():
            waiter.set_result(None)

    def _unwatch(self) -> None:
        if self._watched:
            self._watched = False
            self._loop.remove_reader(self._sock.fileno())

    def _receive_now(self) -> int | None:
        """Receive what the socket holds already, without waiting (in plaintext): how many
        bytes came (0: EOF), None if none were there."""
        if self._session is not None:
            return None
        with self._lock:
            buffer = self._proto.get_buffer()
        try:
            count = self._sock.recv_into(buffer)
        except (BlockingIOError, InterruptedError):
            return None
        with self._lock:
            if count:
                self._proto.buffer_updated(count)
            else:
                self._proto.receive_data(b"")
        return count

    def _decrypt(self, data: bytes | None) -> None:
        """Feed ciphertext (None: none new) and pass what it decrypts to the core."""
        session = self._session
        assert session is not None
        plain: list[bytes] = []
        with self._tls_lock:
            if data is not None:
                session.receive_ciphertext(data)
            while chunk := session.read_plaintext():
                plain.append(chunk)
            ended = chunk == b""
        self._wire.send([])  # TLS's own records (a key update, say) leave in sequence
        with self._lock:
            for chunk in plain:
                self._proto.receive_data(chunk)
            if ended:
                self._proto.receive_data(b"")

    async def _start_tls(self) -> None:
        """STARTTLS was acknowledged (the ACK is queued in plaintext): the handshake."""
        assert self._tls is not None
        session = self._tls.context.session()
        try:
            while not session.do_handshake():
                self._wire.send([session.ciphertext_to_send()], raw=True)
                session.receive_ciphertext(await self._recv_bytes())
        finally:  # the last flight, or the alert that says why the handshake failed
            self._wire.send([session.ciphertext_to_send()], raw=True)
        self._session = session
        self._wire.encryptor = _Encryptor(session, self._tls_lock)
        with self._lock:
            self._proto.tls_established()
        self._decrypt(None)  # the client's first options may have come with its last flight

    def _send_option_replies(self, out: bytes) -> None:
        """Queue option replies; they count as bytes in flight until they are sent."""
        if out:
            size = len(out)
            self._take(size)
            self._wire.send([out], lambda: self._give(size))

    def _option_room(self) -> bool:
        return self._bytes_in_flight < NEGOTIATION_QUEUE_BYTES

    async def _negotiate(self) -> ExportChosen | None:
        while True:
            # a client that sends options (NBD_OPT_LIST, say) and never reads the replies is
            # not read from either: the replies held for it stay bounded
            await self._until(self._option_room)
            with self._lock:
                event = self._proto.next_event()
                out = self._proto.data_to_send()
            self._send_option_replies(out)
            if event is NEED_DATA:
                await self._receive()
            elif isinstance(event, ExportChosen):
                return event
            elif isinstance(event, StartTls):
                await self._start_tls()
            elif isinstance(event, Disconnect):
                return None

    async def _transmit(self, chosen: ExportChosen) -> None:
        target = self._server.catalog.open(chosen.export)
        if target is None:
            return
        done = bytearray()  # replies of requests done at once: sent together, once per batch
        held = 0  # bytes received since the first of them was held
        while True:
            while self._has_room(len(done)):  # the batch counts: a client may never read it
                with self._lock:
                    event = self._proto.next_event()
                if event is NEED_DATA:
                    break
                if isinstance(event, Disconnect):
                    self._send_done(done)
                    await self._until(lambda: self._in_flight == 0)  # answer what is in flight
                    return
                if isinstance(event, Request | InvalidRequest):
                    reply = self._dispatch(target, chosen, event)
                    if reply is not None:
                        done += reply
            else:
                self._send_done(done)
                await self._until(self._has_room)
                continue
            drained = False  # the socket had nothing more an instant ago
            if not done:
                held = 0
            elif len(done) < REPLY_BATCH_BYTES and held < REPLY_HOLD_RECEIVED:
                received = self._receive_now()
                if received is not None:  # more requests were there: their replies go out
                    held += received  # with these, unless receiving them takes long
                    continue
                drained = True
            self._send_done(done)
            held = 0
            await self._receive(wait_first=drained)

    def _send_done(self, done: bytearray) -> None:
        """Send the replies of requests done at once. The batch counts against the limits as
        one request in flight of its size until it is sent: a client that takes no replies
        holds the server off from reading more, also when all it asks is done at once (a
        dirty map of kilobytes answered at once for a request of 28 bytes)."""
        if done:
            size = len(done)
            self._take(size)
            self._wire.send([bytes(done)], lambda: self._give(size))
            done.clear()

    def _has_room(self, batched: int = 0) -> bool:
        """Whether another request may be taken, with ``batched`` bytes of replies done at once
        not yet sent (they count as one more request in flight, as `_send_done` makes them)."""
        return (self._in_flight + (batched > 0) < self._limits.requests_in_flight
                and self._bytes_in_flight + batched < self._limits.bytes_in_flight)

    async def _until(self, condition: Callable[[], bool]) -> None:
        while True:
            with self._lock:
                if condition():
                    self._waiting = False
                    return
                self._waiting = True
                self._room.clear()
            await self._room.wait()

    # ------------------------------------------------------------------ requests

    def _dispatch(self, target: Export, chosen: ExportChosen,
                  event: Request | InvalidRequest) -> bytes | None:
        """Start a request; -> the reply of one done at once (the caller sends it with the
        others of its batch), or None (its reply goes out on its own)."""
        if isinstance(event, InvalidRequest):
            self._refuse(event.cookie, event.errno, event.message)
            return None
        request = event
        command = request.command
        if (command is Command.WRITE or command is Command.WRITE_ZEROES
                or command is Command.TRIM) and not int.__and__(request.flags, _FUA):
            try:
                if target.perform_now(request):  # no thread hand-off, no waiting: done
                    with self._lock:
                        self._proto.reuse(request.data)  # written: the buffer is free
                        return self._proto.done_reply(request.cookie) \
                            if self._proto.can_reply else None
            except RequestFailed as failure:
                self._refuse(request.cookie, failure.errno, failure.message)
                return None
        if command is Command.BLOCK_STATUS:
            try:
                answers = target.block_status_now(request, chosen.contexts)
            except Exception as exc:  # as on a worker: the client gets an error, not silence
                self._refuse(request.cookie, *_failure(request, exc))
                return None
            if answers is not None:  # answered at once: no thread hand-off
                with self._lock:
                    if not self._proto.can_reply:
                        return None
                    self._block_status_chunks(request.cookie, answers)
                    return self._proto.data_to_send()
        size = request.length if command is Command.READ else len(request.data)
        self._take(size)
        if request.command is Command.READ:
            try:
                if request.length == 0:
                    raise RequestFailed("READ of 0 bytes", errno=Errno.EINVAL)
                mapped = target.map_read(request.length, request.offset, wait=False)
            except RequestFailed as failure:
                self._reply_error(request.cookie, failure.errno, failure.message, size)
                return None
            if mapped is not None:
                self._send_read(request, mapped, size)
                return None
        self._server.workers.submit(self._work, target, chosen, request, size)
        return None

    def _work(self, target: Export, chosen: ExportChosen, request: Request, size: int) -> None:
        """A request that may wait for the disk, on a worker thread."""
        try:
            if request.command is Command.READ:
                mapped = target.map_read(request.length, request.offset, wait=True)
                if mapped is None:
                    raise RequestFailed("the export did not map the read", errno=Errno.EIO)
                self._send_read(request, mapped, size)
            elif request.command is Command.BLOCK_STATUS:
                self._send_block_status(request, target.block_status(request, chosen.contexts),
                                        size)
            else:
                target.perform(request)
                self._reply_done(request.cookie, size)
        except Exception as exc:  # a bug here must not leave the client waiting forever
            self._reply_error(request.cookie, *_failure(request, exc), size)

    def _send_read(self, request: Request, mapped: MappedRead, size: int) -> None:
        """Queue a read's reply; ``mapped`` is closed once it is sent or dropped (it may pin
        what it maps: a snapshot's removal waits for it), or here if queueing it fails."""
        try:
            items, replying = self._read_reply(request, mapped)
        except BaseException:
            mapped.close()
            raise

        def sent() -> None:
            mapped.close()
            self._give(size)

        if replying:  # outside the lock: a group sent at once runs ``sent`` here
            self._wire.send(items, sent)
        else:
            sent()

    def _read_reply(self, request: Request, mapped: MappedRead) -> tuple[list[Item], bool]:
        """The items of a read's reply, put in the core; -> them and whether to send them
        (False: the connection can take no reply)."""
        proto, cookie = self._proto, request.cookie
        items: list[Item] = []
        with self._lock:
            replying = proto.can_reply
            if not replying:
                pass
            elif proto.structured_replies and not request.flags & CommandFlag.DF:
                last = len(mapped.segments) - 1
                for index, segment in enumerate(mapped.segments):
                    if segment.fd is None and segment.data is None:
                        proto.reply_hole(cookie, segment.offset, segment.length,
                                         done=index == last)
                        items.append(proto.data_to_send())
                    else:
                        proto.reply_read_header(cookie, segment.offset, segment.length,
                                                done=index == last)
                        items.append(proto.data_to_send())
                        items += _payload(segment, mapped.copy)
            else:
                proto.reply_read_header(cookie, request.offset, request.length, done=True)
                items.append(proto.data_to_send())
                for segment in mapped.segments:
                    items += _payload(segment, mapped.copy)
        return items, replying

    def _send_block_status(self, request: Request, answers: list[tuple[int, bytes]],
                           size: int) -> None:
        self._reply(lambda: self._block_status_chunks(request.cookie, answers), size)

    def _block_status_chunks(self, cookie: int, answers: list[tuple[int, bytes]]) -> None:
        """Put a BLOCK_STATUS reply in the core (holding the lock)."""
        for index, (context_id, payload) in enumerate(answers):
            self._proto.reply_chunk(cookie, ReplyType.BLOCK_STATUS,
                                    context_id.to_bytes(4, "big") + payload,
                                    done=index == len(answers) - 1)

    def _reply_done(self, cookie: int, size: int) -> None:
        def done() -> None:
            if self._proto.structured_replies:
                self._proto.reply_chunk(cookie, ReplyType.NONE, b"", done=True)
            else:
                self._proto.reply_simple(cookie)

        self._reply(done, size)

    def _refuse(self, cookie: int, errno: int, message: str) -> None:
        """The error reply of a request refused before any of it was held."""
        self._take(0)
        self._reply_error(cookie, errno, message, 0)

    def _reply_error(self, cookie: int, errno: int, message: str, size: int) -> None:
        self._reply(lambda: self._proto.reply_error(cookie, errno, message), size)

    def _reply(self, write: Callable[[], None], size: int) -> None:
        """Send the reply ``write`` puts in the core; none when a protocol error has ended the
        connection under the request (nobody reads it any more)."""
        with self._lock:
            replying = self._proto.can_reply
            if replying:
                write()
                out = self._proto.data_to_send()
        if replying:  # outside the lock: a reply sent at once calls _give here
            self._wire.send([out], lambda: self._give(size))
        else:
            self._give(size)

    # ------------------------------------------------------------------ accounting

    def _take(self, size: int) -> None:
        with self._lock:
            self._in_flight += 1
            self._bytes_in_flight += size

    def _give(self, size: int) -> None:
        """A reply went out (or was dropped): on any thread."""
        with self._lock:
            self._in_flight -= 1
            self._bytes_in_flight -= size
            wake = self._waiting
        if wake:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                self._loop.call_soon_threadsafe(self._room.set)


class _Workers:
    """Threads that run what may wait for a disk: a plain queue, no futures (one per request
    would cost more than a small write does)."""

    def __init__(self, count: int, name: str) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]] | None] = \
            queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
                         for i in range(count)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        self._queue.put((fn, args))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, args = item
            fn(*args)  # the functions submitted catch their own errors

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()


class _Encryptor:
    def __init__(self, session: TlsSession, lock: threading.Lock) -> None:
        self._session, self._lock = session, lock

    def encrypt(self, plaintext: bytes) -> bytes:
        with self._lock:
            self._session.write_plaintext(plaintext)
            return self._session.ciphertext_to_send()


def _failure(request: Request, exc: Exception) -> tuple[int, str]:
    """The errno and message of the error reply to a request that raised ``exc``: its own
    when the export refused it (`RequestFailed`), else EIO (a bug, logged)."""
    if isinstance(exc, RequestFailed):
        return exc.errno, exc.message
    log.exception("NBD request %s failed", request.command.name)
    return Errno.EIO, f"internal error: {exc!r}"


def _payload(segment: ReadSegment, copy: bool) -> list[Item]:
    if segment.fd is not None:
        return [FilePart(segment.fd, segment.offset, segment.length, copy)]
    if segment.data is not None:
        return [segment.data]
    return [*zeros(segment.length)]
