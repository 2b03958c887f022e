"""NbdClient's verbs as blocking calls, for code that runs on threads (the backup engine).

    with BlockingNbdClient.connect(uri, contexts=["base:allocation"]) as nbd:
        data = nbd.pread(4 << 20, 0)          # from any thread; calls overlap on the wire

The asyncio client runs on a private event loop in a background thread; each call hands a
coroutine to that loop and waits for its result, so calls from many threads are in flight
together on the connection. With ``connections=N`` and a server that allows it
(NBD_FLAG_CAN_MULTI_CONN), N connections share the calls; they must all have been told the same
about the export (size, transmission flags, meta contexts, block sizes), or connecting fails
with `ConnectionsDisagree` rather than rotate calls over exports that differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import Coroutine, Sequence
from types import TracebackType
from typing import TypeVar

from blocktrail.nbd.client import DEFAULT_REQUEST_TIMEOUT, DEFAULT_TIMEOUT, Descriptor, NbdClient
from blocktrail.nbd.proto.errors import ConnectionsDisagree, LocalProtocolError
from blocktrail.nbd.proto.events import BlockSize
from blocktrail.nbd.uri import NbdUri

T = TypeVar("T")
REUSED_BUFFER_BYTES = 16 << 20  # each calling thread keeps a read buffer up to this size


class BlockingNbdClient:
    """One export over one or more connections; close it (or use ``with``) to stop its
    thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread,
                 clients: list[NbdClient]) -> None:
        self._loop = loop
        self._thread = thread
        self._clients = clients
        self._next = itertools.cycle(clients)
        self._buffers = threading.local()
        self._closed = False

    @classmethod
    def connect(cls, target: str | NbdUri, *, contexts: Sequence[str] = (),
                connections: int = 1,
                timeout: float | None = DEFAULT_TIMEOUT,
                request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT) -> BlockingNbdClient:
        """Connect to the NBD URI ``target``; more than one of ``connections`` only when the
        server advertises multi-conn. ``timeout`` bounds the connection and handshake,
        ``request_timeout`` each request (see `NbdClient`)."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="nbd-client", daemon=True)
        thread.start()
        try:
            clients = asyncio.run_coroutine_threadsafe(
                _open(target, contexts, connections, timeout, request_timeout), loop).result()
        except BaseException:
            _stop(loop, thread)
            raise
        return cls(loop, thread, clients)

    def _run(self, coroutine: Coroutine[object, object, T]) -> T:
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise LocalProtocolError("a blocking NBD call from the client's own event loop")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _client(self) -> NbdClient:
        return next(self._next)

    # ------------------------------------------------------------------ what was negotiated

    @property
    def uri(self) -> NbdUri:
        return self._clients[0].uri

    @property
    def size_bytes(self) -> int:
        return self._clients[0].size_bytes

    @property
    def contexts(self) -> tuple[str, ...]:
        return self._clients[0].contexts

    @property
    def block_size(self) -> BlockSize:
        return self._clients[0].block_size

    @property
    def connections(self) -> int:
        return len(self._clients)

    def is_read_only(self) -> bool:
        return self._clients[0].is_read_only()

    def can_flush(self) -> bool:
        return self._clients[0].can_flush()

    def can_fua(self) -> bool:
        return self._clients[0].can_fua()

    def can_trim(self) -> bool:
        return self._clients[0].can_trim()

    def can_zero(self) -> bool:
        return self._clients[0].can_zero()

    def can_multi_conn(self) -> bool:
        return self._clients[0].can_multi_conn()

    def can_meta_context(self, name: str) -> bool:
        return self._clients[0].can_meta_context(name)

    # ------------------------------------------------------------------ the verbs

    def pread(self, count: int, offset: int) -> bytes:
        """``count`` bytes at ``offset``. The data is received into a buffer this thread
        reuses, then copied once into the bytes returned."""
        buffer: bytearray | None = getattr(self._buffers, "buffer", None)
        if buffer is None or len(buffer) < count:
            buffer = bytearray(count)
            if count <= REUSED_BUFFER_BYTES:
                self._buffers.buffer = buffer
        with memoryview(buffer) as view, view[:count] as target:
            try:
                self._run(self._client().pread_into(target, offset))
            except BaseException:
                self._buffers.buffer = None  # parts of the read may still land in it
                raise
            return bytes(target)

    def pread_into(self, buffer: bytearray | memoryview, offset: int) -> None:
        self._run(self._client().pread_into(buffer, offset))

    def pwrite(self, buffer: bytes | bytearray | memoryview, offset: int, *,
               fua: bool = False) -> None:
        self._run(self._client().pwrite(buffer, offset, fua=fua))

    def zero(self, count: int, offset: int, *, fua: bool = False, punch_hole: bool = True,
             fast: bool = False) -> None:
        self._run(self._client().zero(count, offset, fua=fua, punch_hole=punch_hole, fast=fast))

    def trim(self, count: int, offset: int, *, fua: bool = False) -> None:
        self._run(self._client().trim(count, offset, fua=fua))

    def flush(self) -> None:
        """Flush every connection (with multi-conn, one flush covers all; all is simpler)."""
        for client in self._clients:
            self._run(client.flush())

    def block_status(self, count: int, offset: int, context: str) -> list[Descriptor]:
        return self._run(self._client().block_status(count, offset, context))

    def extents(self, context: str, offset: int = 0,
                length: int | None = None) -> list[tuple[int, int, int]]:
        return self._run(self._client().extents(context, offset, length))

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Disconnect every connection (NBD_CMD_DISC) and stop the event loop's thread."""
        if self._closed:
            return
        self._closed = True
        try:
            self._run(_close_all(self._clients))
        finally:
            _stop(self._loop, self._thread)

    def __enter__(self) -> BlockingNbdClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


async def _open(target: str | NbdUri, contexts: Sequence[str], connections: int,
                timeout: float | None, request_timeout: float | None) -> list[NbdClient]:
    first = await NbdClient.connect(target, contexts=contexts, timeout=timeout,
                                    request_timeout=request_timeout)
    if connections <= 1 or not first.can_multi_conn():
        return [first]
    results = await asyncio.gather(
        *(NbdClient.connect(target, contexts=contexts, timeout=timeout,
                            request_timeout=request_timeout)
          for _ in range(connections - 1)), return_exceptions=True)
    clients = [first] + [r for r in results if isinstance(r, NbdClient)]
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        await _close_all(clients)
        raise failed[0]
    for client in clients[1:]:
        difference = _difference(first, client)
        if difference:
            await _close_all(clients)
            raise ConnectionsDisagree(
                f"the connections to {first.uri} disagree about the export ({difference}): "
                f"the server advertises multi-conn but does not show every connection the "
                f"same export; fix the server, or have it not advertise multi-conn")
    return clients


def _difference(first: NbdClient, other: NbdClient) -> str:
    """What ``other`` was told about the export that ``first`` was not ("" if nothing)."""
    facts = [
        ("size", first.size_bytes, other.size_bytes),
        ("transmission flags", hex(first.transmission_flags), hex(other.transmission_flags)),
        ("meta contexts", sorted(first.contexts), sorted(other.contexts)),
        ("block size", first.block_size, other.block_size),
        ("structured replies", first.structured_replies, other.structured_replies),
    ]
    return "; ".join(f"{what} {a!r} and {b!r}" for what, a, b in facts if a != b)


async def _close_all(clients: list[NbdClient]) -> None:
    await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)


def _stop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    with contextlib.suppress(RuntimeError):  # already closed
        loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()
