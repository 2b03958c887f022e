"""An asyncio NBD client with libnbd's verbs.

    client = await NbdClient.connect("nbd+unix:///disk0?socket=/run/nbd.sock",
                                     contexts=["base:allocation"])
    data = await client.pread(1 << 20, 0)
    extents = await client.block_status(64 << 20, 0, "base:allocation")  # [(length, flags)]
    await client.close()                                                  # NBD_CMD_DISC

Any number of requests may be in flight on one connection: each has a cookie and a future, and
the protocol callback that receives the server's bytes dispatches every reply as it completes.
A read's payload is received straight into its buffer (`ClientConnection.get_buffer`). Requests
larger than the server's maximum block size are split; offsets and lengths must be multiples of
its minimum. A server's error reply raises `RequestFailed` (the errno and the server's message)
and the connection carries on; anything the server sends that the protocol forbids raises
`RemoteProtocolError`, fails every request in flight, and ends the connection. Memory is bounded:
at most ``max_in_flight`` requests and ``max_in_flight_bytes`` of payload are outstanding. A
request whose reply has not ended ``request_timeout`` seconds after it was sent (300 by default;
None: no limit) ends the connection with `ConnectionLost`: its replies can no longer be matched
with certainty, so every request in flight fails with it.

An nbds:// URI (or ``tls=``) means STARTTLS, required: x509 (``tls-certificates=DIR``, QEMU's
client layout) or PSK (``tls-psk-file=FILE`` and a username). The server must agree; there is
no fallback to plaintext. Under TLS the bytes received go through the session before the core.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import cast

from blocktrail.errors import InvalidArgument, OutOfRange
from blocktrail.nbd.proto.client import ClientConnection
from blocktrail.nbd.proto.constants import Command, CommandFlag, Errno, TransmissionFlag
from blocktrail.nbd.proto.errors import (
    CommandNotSupported,
    ConnectionLost,
    NbdError,
    RemoteProtocolError,
    RequestFailed,
    ServerUnreachable,
)
from blocktrail.nbd.proto.events import (
    NEED_DATA,
    BlockSize,
    BlockStatus,
    Disconnect,
    ReadChunk,
    Ready,
    ReplyChunk,
    ReplyDone,
    StartTls,
    TlsMode,
)
from blocktrail.nbd.tls import ClientTlsContext, TlsConfig, TlsSession, client_context
from blocktrail.nbd.uri import NbdEndpoint, NbdUri, TlsParameters

Descriptor = tuple[int, int]  # (length, flags) of one block status extent
# Reads and writes go in pieces of this, all in flight together. Measured against qemu-nbd
# (bench/nbd_client_bench.py): it spent about twice the CPU per byte serving 1-2 MiB requests as
# 512 KiB ones (not so with glibc's malloc trim and mmap thresholds raised), and smaller pieces
# cost this client more per byte than they save.
MAX_REQUEST_BYTES = 512 << 10
MAX_WIRE_LENGTH = 0xFFFFFFFF  # the request header's length field
DEFAULT_TIMEOUT = 30.0
# A request whose reply has not ended after this long ends the connection (ConnectionLost):
# a server that never finishes a reply must not hold a backup forever.
DEFAULT_REQUEST_TIMEOUT = 300.0
DISCONNECT_TIMEOUT = 10.0


class _Budget:
    """Requests and payload bytes in flight, both bounded; waiters are served in order. A
    request larger than the whole byte budget goes when nothing else is in flight."""

    def __init__(self, requests: int, nbytes: int) -> None:
        self._requests = requests
        self._bytes = nbytes
        self._max_bytes = nbytes
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def _fits(self, nbytes: int) -> bool:
        return self._requests > 0 and self._bytes >= min(nbytes, self._max_bytes)

    def _take(self, nbytes: int) -> None:
        self._requests -= 1
        self._bytes -= min(nbytes, self._max_bytes)

    async def acquire(self, nbytes: int) -> None:
        if not self._waiters and self._fits(nbytes):
            self._take(nbytes)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((nbytes, waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(nbytes)  # granted just as we were cancelled: hand it on
            else:
                self._waiters.remove((nbytes, waiter))
            raise

    def release(self, nbytes: int) -> None:
        self._requests += 1
        self._bytes += min(nbytes, self._max_bytes)
        while self._waiters and self._fits(self._waiters[0][0]):
            size, waiter = self._waiters.popleft()
            if not waiter.done():
                self._take(size)
                waiter.set_result(None)


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[ReplyDone]
    nbytes: int
    statuses: list[BlockStatus] = field(default_factory=list)


class _Wire(asyncio.BufferedProtocol):
    """The asyncio side of one connection: bytes in (into the buffers the protocol core
    chooses), write flow control, end of the connection."""

    def __init__(self, client: NbdClient) -> None:
        self._client = client
        self.transport: asyncio.Transport | None = None
        self._ciphertext = memoryview(bytearray(256 << 10))
        self.paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream, by construction

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._client._session is not None:  # ciphertext: to the TLS session first
            return self._ciphertext
        return self._client._conn.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self._client._session is not None:
            self._client._received_ciphertext(bytes(self._ciphertext[:nbytes]))
        else:
            self._client._received(nbytes)

    def eof_received(self) -> bool:
        self._client._eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._client._lost(exc)
        self.paused = False
        self._wake()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake()

    def _wake(self) -> None:
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    async def drain(self) -> None:
        while self.paused:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(waiter)
            await waiter


class NbdClient:
    """One connection to one export. Make it with `connect` or `connect_endpoint`."""

    def __init__(self, conn: ClientConnection, uri: NbdUri, *, max_in_flight: int,
                 max_in_flight_bytes: int, tls: ClientTlsContext | None = None,
                 request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT) -> None:
        self._conn = conn
        self._request_timeout = request_timeout
        self.uri = uri
        self._tls = tls
        self._session: TlsSession | None = None  # from STARTTLS's ACK on
        self._loop = asyncio.get_running_loop()
        self._wire = _Wire(self)
        self._ready: asyncio.Future[Ready] = self._loop.create_future()
        self._info: Ready | None = None
        self._pending: dict[int, _Pending] = {}
        self._budget = _Budget(max_in_flight, max_in_flight_bytes)
        self._error: NbdError | None = None  # the connection is over: why
        self._closing = False
        self._flush_scheduled = False
        self._shutdown_seen = False

    # ------------------------------------------------------------------ connecting

    @classmethod
    async def connect(cls, target: str | NbdUri, *, contexts: Sequence[str] = (),
                      timeout: float | None = DEFAULT_TIMEOUT, max_in_flight: int = 64,
                      max_in_flight_bytes: int = 256 << 20,
                      request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT) -> NbdClient:
        """Connect to an NBD URI (nbd://, nbd+unix://; nbds:// needs TLS, not available yet)
        and ask for the meta ``contexts``; `contexts` tells which the server agreed to."""
        uri = target if isinstance(target, NbdUri) else NbdUri.parse(target)
        return await cls.connect_endpoint(uri.endpoint, uri.export, contexts=contexts,
                                          tls=uri.tls, timeout=timeout,
                                          max_in_flight=max_in_flight,
                                          max_in_flight_bytes=max_in_flight_bytes,
                                          request_timeout=request_timeout)

    @classmethod
    async def connect_endpoint(cls, endpoint: NbdEndpoint | str, export: str = "", *,
                               contexts: Sequence[str] = (), tls: TlsParameters | None = None,
                               timeout: float | None = DEFAULT_TIMEOUT,
                               max_in_flight: int = 64,
                               max_in_flight_bytes: int = 256 << 20,
                               request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT
                               ) -> NbdClient:
        if isinstance(endpoint, str):
            endpoint = NbdEndpoint.parse(endpoint)
        uri = NbdUri(endpoint, export, tls)
        if max_in_flight < 1 or max_in_flight_bytes < 1:
            raise InvalidArgument("max_in_flight and max_in_flight_bytes must be positive")
        if request_timeout is not None and not request_timeout > 0:
            raise InvalidArgument("request_timeout must be positive (or None: no limit)")
        tls_context = None if tls is None else client_context(tls_config(tls))
        conn = ClientConnection(export, list(contexts),
                                tls=TlsMode.OFF if tls is None else TlsMode.REQUIRE)
        client = cls(conn, uri, max_in_flight=max_in_flight,
                     max_in_flight_bytes=max_in_flight_bytes, tls=tls_context,
                     request_timeout=request_timeout)
        try:
            async with asyncio.timeout(timeout):
                await client._open(endpoint)
        except (OSError, TimeoutError) as exc:
            client._abort(None)
            reason = f"no handshake within {timeout} s" if isinstance(exc, TimeoutError) else exc
            raise ServerUnreachable(f"cannot connect to the NBD server at {endpoint}: "
                                    f"{reason}") from None
        except BaseException:
            client._abort(None)
            raise
        return client

    async def _open(self, endpoint: NbdEndpoint) -> None:
        if endpoint.unix_path is not None:
            await self._loop.create_unix_connection(lambda: self._wire, endpoint.unix_path)
        elif endpoint.host is not None:
            await self._loop.create_connection(lambda: self._wire, endpoint.host, endpoint.port)
        self._info = await self._ready

    # ------------------------------------------------------------------ what was negotiated

    @property
    def _ready_info(self) -> Ready:
        if self._info is None:
            raise ConnectionLost(f"{self.uri}: not connected")
        return self._info

    @property
    def size_bytes(self) -> int:
        return self._ready_info.size_bytes

    @property
    def contexts(self) -> tuple[str, ...]:
        """The meta contexts the server agreed to."""
        return tuple(self._ready_info.contexts.values())

    @property
    def block_size(self) -> BlockSize:
        return self._ready_info.block_size

    @property
    def structured_replies(self) -> bool:
        return self._ready_info.structured_replies

    @property
    def transmission_flags(self) -> int:
        return self._ready_info.transmission_flags

    def _flag(self, flag: TransmissionFlag) -> bool:
        return bool(self._ready_info.transmission_flags & flag)

    def is_read_only(self) -> bool:
        return self._flag(TransmissionFlag.READ_ONLY)

    def can_flush(self) -> bool:
        return self._flag(TransmissionFlag.SEND_FLUSH)

    def can_fua(self) -> bool:
        return self._flag(TransmissionFlag.SEND_FUA)

    def can_trim(self) -> bool:
        return self._flag(TransmissionFlag.SEND_TRIM) and not self.is_read_only()

    def can_zero(self) -> bool:
        return self._flag(TransmissionFlag.SEND_WRITE_ZEROES) and not self.is_read_only()

    def can_fast_zero(self) -> bool:
        return self._flag(TransmissionFlag.SEND_FAST_ZERO) and self.can_zero()

    def can_multi_conn(self) -> bool:
        return self._flag(TransmissionFlag.CAN_MULTI_CONN)

    def can_meta_context(self, name: str) -> bool:
        return name in self._ready_info.contexts.values()

    # ------------------------------------------------------------------ the verbs

    async def pread(self, count: int, offset: int) -> bytes:
        buffer = bytearray(count)
        await self.pread_into(buffer, offset)
        return bytes(buffer)

    async def pread_into(self, buffer: bytearray | memoryview, offset: int) -> None:
        """Read ``len(buffer)`` bytes at ``offset`` into ``buffer`` (without a copy)."""
        view = memoryview(buffer).cast("B")
        if not self._check_range("read", len(view), offset):
            return
        await self._each(Command.READ, offset, len(view), self._data_step(),
                         lambda at, n: self._request(Command.READ, at, n, into=view[
                             at - offset : at - offset + n]))

    async def pwrite(self, buffer: bytes | bytearray | memoryview, offset: int, *,
                     fua: bool = False) -> None:
        view = memoryview(buffer).cast("B")
        self._need_writable("write")
        flags = self._fua(fua)
        if not self._check_range("write", len(view), offset):
            return
        await self._each(Command.WRITE, offset, len(view), self._data_step(),
                         lambda at, n: self._request(Command.WRITE, at, n, flags, data=view[
                             at - offset : at - offset + n]))

    async def zero(self, count: int, offset: int, *, fua: bool = False,
                   punch_hole: bool = True, fast: bool = False) -> None:
        """Write zeros (NBD_CMD_WRITE_ZEROES); ``punch_hole=False`` keeps the area allocated,
        ``fast=True`` fails with ENOTSUP unless the server can zero faster than writing."""
        self._need_writable("zero")
        if not self.can_zero():
            raise CommandNotSupported(f"{self.uri} does not support write zeroes")
        if fast and not self.can_fast_zero():
            raise CommandNotSupported(f"{self.uri} does not support fast zero")
        flags = self._fua(fua) | (0 if punch_hole else CommandFlag.NO_HOLE) | (
            CommandFlag.FAST_ZERO if fast else 0)
        if self._check_range("zero", count, offset):
            await self._each(Command.WRITE_ZEROES, offset, count, self._data_step(),
                             lambda at, n: self._request(Command.WRITE_ZEROES, at, n, flags))

    async def trim(self, count: int, offset: int, *, fua: bool = False) -> None:
        self._need_writable("trim")
        if not self.can_trim():
            raise CommandNotSupported(f"{self.uri} does not support trim")
        flags = self._fua(fua)
        if self._check_range("trim", count, offset):
            await self._each(Command.TRIM, offset, count, self._data_step(),
                             lambda at, n: self._request(Command.TRIM, at, n, flags))

    async def flush(self) -> None:
        if not self.can_flush():
            raise CommandNotSupported(f"{self.uri} does not support flush")
        await self._request(Command.FLUSH, 0, 0)

    async def block_status(self, count: int, offset: int, context: str) -> list[Descriptor]:
        """(length, flags) extents of ``context`` from ``offset``: consecutive, covering at
        most ``count`` bytes; the server may describe less (ask again from where it ended)."""
        return (await self.block_status_all(count, offset, contexts=(context,)))[context]

    async def block_status_all(self, count: int, offset: int, *,
                               contexts: Sequence[str] | None = None
                               ) -> dict[str, list[Descriptor]]:
        """One BLOCK_STATUS request: the extents of every agreed context (or of ``contexts``)."""
        wanted = list(self._ready_info.contexts.values()) if contexts is None else list(contexts)
        for name in wanted:
            if not self.can_meta_context(name):
                raise CommandNotSupported(
                    f"{self.uri}: the server did not agree to meta context {name!r} (agreed: "
                    f"{', '.join(self.contexts) or 'none'})")
        if not wanted or not self._check_range("block status", count, offset):
            return {name: [] for name in wanted}
        minimum = self.block_size.minimum
        length = min(count, MAX_WIRE_LENGTH - MAX_WIRE_LENGTH % minimum)
        statuses = await self._request(Command.BLOCK_STATUS, offset, length)
        found = {status.context: status.descriptors for status in statuses}
        return {name: _clip(found[name], length) for name in wanted}

    async def extents(self, context: str, offset: int = 0,
                      length: int | None = None) -> list[tuple[int, int, int]]:
        """(offset, length, flags) of ``context`` over ``[offset, offset + length)`` (default:
        to the end of the export), asking as often as the server's answers need."""
        end = self.size_bytes if length is None else offset + length
        out: list[tuple[int, int, int]] = []
        while offset < end:
            for size, flags in await self.block_status(end - offset, offset, context):
                out.append((offset, size, flags))
                offset += size
        return out

    # ------------------------------------------------------------------ closing

    async def close(self) -> None:
        """Wait for the requests in flight, send NBD_CMD_DISC, close the connection."""
        if self._closing:
            return
        self._closing = True
        transport = self._wire.transport
        if self._error is None and transport is not None and self._info is not None:
            waiting = [p.future for p in self._pending.values()]
            if waiting:
                await asyncio.wait(waiting, timeout=DISCONNECT_TIMEOUT)
            with contextlib.suppress(NbdError):
                self._conn.send_request(Command.DISC)
                self._flush()
                if transport.can_write_eof():
                    transport.write_eof()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._wire.closed), DISCONNECT_TIMEOUT)
        self._abort(ConnectionLost(f"{self.uri}: the connection was closed"))

    async def __aenter__(self) -> NbdClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, value: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.close()

    # ------------------------------------------------------------------ requests

    def _check_open(self) -> None:
        if self._error is not None:
            raise type(self._error)(self._error.message)
        if self._closing:
            raise ConnectionLost(f"{self.uri}: the connection is closed")
        if self._shutdown_seen:
            raise ConnectionLost(f"{self.uri}: the server is shutting down (ESHUTDOWN)")

    def _check_range(self, what: str, count: int, offset: int) -> bool:
        """False: nothing to do (count 0). Raises for a range outside the export or not
        aligned to the server's minimum block size."""
        if count < 0 or offset < 0:
            raise InvalidArgument(f"{what}: negative offset or count ({offset}, {count})")
        size = self.size_bytes
        if offset + count > size:
            raise OutOfRange(f"{what} of {count} bytes at offset {offset} lies beyond the end "
                             f"of {self.uri} ({size} bytes)")
        minimum = self.block_size.minimum
        if offset % minimum or (count % minimum and offset + count != size):
            raise InvalidArgument(f"{what} of {count} bytes at offset {offset} is not aligned "
                                  f"to the server's minimum block size ({minimum} bytes)")
        return count > 0

    def _need_writable(self, what: str) -> None:
        if self.is_read_only():
            raise CommandNotSupported(f"{self.uri} is read-only: it takes no {what}")

    def _fua(self, fua: bool) -> int:
        if fua and not self.can_fua():
            raise CommandNotSupported(f"{self.uri} does not support FUA")
        return CommandFlag.FUA if fua else 0

    def _data_step(self) -> int:
        block = self.block_size
        step = min(block.maximum, MAX_REQUEST_BYTES, MAX_WIRE_LENGTH)
        return max(block.minimum, step - step % block.minimum)

    async def _each(self, command: Command, offset: int, count: int, step: int,
                    request: Callable[[int, int], Awaitable[object]]) -> None:
        """Send ``[offset, offset + count)`` as requests of at most ``step`` bytes, all in
        flight together."""
        if count <= step:
            await request(offset, count)
            return
        results = await asyncio.gather(
            *(request(at, min(step, offset + count - at)) for at in range(offset, offset + count,
                                                                          step)),
            return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _request(self, command: Command, offset: int, length: int, flags: int = 0, *,
                       data: memoryview | None = None,
                       into: memoryview | None = None) -> list[BlockStatus]:
        self._check_open()
        nbytes = length if command in (Command.READ, Command.WRITE) else 0
        await self._budget.acquire(nbytes)
        try:
            self._check_open()
            if into is not None:
                cookie = self._conn.send_read(offset, into, flags)
            else:
                cookie = self._conn.send_request(command, offset, length, flags,
                                                 b"" if data is None else data)
        except BaseException:
            self._budget.release(nbytes)
            raise
        pending = _Pending(self._loop.create_future(), nbytes)
        self._pending[cookie] = pending
        self._schedule_flush()
        try:
            async with asyncio.timeout(self._request_timeout):  # from sending to the reply
                if self._wire.paused:  # a server that stops reading counts too
                    await self._wire.drain()
                reply = await pending.future
        except TimeoutError:
            lost = ConnectionLost(
                f"{self.uri}: the server did not finish NBD {command.name} of {length} bytes at "
                f"offset {offset} within {self._request_timeout} s (or did not take it); the "
                "connection was closed")
            self._abort(lost)  # later replies could not be trusted: everything in flight fails
            raise lost from None
        if reply.error:
            raise RequestFailed(
                f"NBD {command.name} of {length} bytes at offset {offset} failed on {self.uri}: "
                f"{_errno_name(reply.error)}" + (f" ({reply.message})" if reply.message else ""),
                errno=reply.error, server_message=reply.message, command=command.name)
        return pending.statuses

    def _schedule_flush(self) -> None:
        """Send what is queued once this turn of the event loop is over, so that requests made
        together go out in one write."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        transport = self._wire.transport
        if transport is None or self._error is not None:
            return
        buffers = self._conn.buffers_to_send()
        if self._session is not None and self._session.handshake_done:
            self._session.write_plaintext(b"".join(buffers))
            buffers = [self._session.ciphertext_to_send()]
        if len(buffers) == 1:
            transport.write(buffers[0])
        elif buffers:
            transport.writelines(buffers)

    # ------------------------------------------------------------------ replies (callbacks)

    def _received(self, nbytes: int) -> None:
        if self._error is not None:
            return
        self._conn.buffer_updated(nbytes)
        self._dispatch()

    def _dispatch(self) -> None:
        conn = self._conn
        try:
            while (event := conn.next_event()) is not NEED_DATA:
                if isinstance(event, ReplyDone):
                    self._done(event)
                elif isinstance(event, ReadChunk | ReplyChunk):
                    continue
                elif isinstance(event, BlockStatus):
                    pending = self._pending.get(event.cookie)
                    if pending is not None:
                        pending.statuses.append(event)
                elif isinstance(event, Ready):
                    if not self._ready.done():
                        self._ready.set_result(event)
                    self._flush()
                elif isinstance(event, Disconnect):
                    return
                elif isinstance(event, StartTls):
                    self._start_tls()
                    return
                else:
                    raise RemoteProtocolError(f"unexpected {type(event).__name__} in the "
                                              "negotiation")
        except NbdError as exc:
            self._abort(exc)
            return
        if self._info is None:
            self._flush()  # negotiation: the client's flags and options

    def _start_tls(self) -> None:
        """The server acknowledged STARTTLS: from now on bytes go through a TLS session."""
        if self._tls is None:
            raise RemoteProtocolError("STARTTLS acknowledged, but no TLS was asked for")
        endpoint = self.uri.endpoint
        self._session = self._tls.session(endpoint.host)  # None (unix): the chain is checked
        self._session.do_handshake()
        self._send_ciphertext()

    def _received_ciphertext(self, data: bytes) -> None:
        session = self._session
        if self._error is not None or session is None:
            return
        try:
            session.receive_ciphertext(data)
            if not session.handshake_done:
                done = session.do_handshake()
                self._send_ciphertext()
                if not done:
                    return
                self._conn.tls_established()
            while plain := session.read_plaintext():
                self._conn.receive_data(plain)
            if plain == b"":
                self._conn.receive_data(b"")
            self._send_ciphertext()  # TLS's own records, a key update say
        except NbdError as exc:
            self._send_ciphertext()  # the alert that tells the server why
            self._abort(exc)
            return
        self._dispatch()

    def _send_ciphertext(self) -> None:
        assert self._session is not None
        out = self._session.ciphertext_to_send()
        if out and self._wire.transport is not None and not self._wire.transport.is_closing():
            self._wire.transport.write(out)

    def _done(self, reply: ReplyDone) -> None:
        pending = self._pending.pop(reply.cookie, None)
        if pending is None:
            return
        self._budget.release(pending.nbytes)
        if reply.error == Errno.ESHUTDOWN:
            self._shutdown_seen = True
        if not pending.future.done():
            pending.future.set_result(reply)

    def _eof(self) -> None:
        if self._error is not None:
            return
        if self._info is None:
            self._abort(ConnectionLost(f"the NBD server at {self.uri.endpoint} closed the "
                                       "connection during the handshake"))
        elif self._pending:
            self._abort(ConnectionLost(f"{self.uri}: the server closed the connection with "
                                       f"{len(self._pending)} requests in flight"))
        else:
            self._conn.receive_data(b"")
            self._dispatch()

    def _lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else ""
        self._abort(ConnectionLost(f"{self.uri}: the connection was lost{reason}"))

    def _abort(self, error: NbdError | None) -> None:
        """The connection is over: fail everything still waiting with ``error``."""
        if self._error is None:
            self._error = error or ConnectionLost(f"{self.uri}: the connection was closed")
        error = self._error
        if not self._ready.done():
            self._ready.set_exception(type(error)(error.message))
            self._ready.exception()  # retrieved: connect may have stopped waiting for it
        pending, self._pending = self._pending, {}
        for item in pending.values():
            self._budget.release(item.nbytes)
            if not item.future.done():
                item.future.set_exception(type(error)(error.message))
        if self._wire.transport is not None and not self._wire.transport.is_closing():
            self._wire.transport.abort()


def tls_config(tls: TlsParameters) -> TlsConfig:
    """The credentials an nbds:// URI names (libnbd's query parameters)."""
    if tls.psk_file is not None:
        return TlsConfig.psk(tls.psk_file, username=tls.username or getpass.getuser())
    if tls.certificates is not None:
        return TlsConfig.x509(tls.certificates)
    raise InvalidArgument("TLS needs credentials: tls-certificates=DIR (x509, QEMU's client "
                          "layout) or tls-psk-file=FILE (PSK, with tls-username=NAME)")


def _clip(descriptors: tuple[Descriptor, ...], length: int) -> list[Descriptor]:
    """The descriptors up to ``length`` bytes (the last one may reach past the request)."""
    out: list[Descriptor] = []
    covered = 0
    for size, flags in descriptors:
        if covered + size >= length:
            out.append((length - covered, flags))
            break
        out.append((size, flags))
        covered += size
    return out


def _errno_name(error: int) -> str:
    try:
        return Errno(error).name
    except ValueError:
        return f"error {error}"
