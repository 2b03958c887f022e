"""Restore points as read-only NBD exports (`blocktrail serve`): the export interface of
`blocktrail.nbd.export` (a `Catalog` of `Export`s) over `RepositoryChunkSource`s.

The export name is the point's id. A read is answered from the chunks it touches: holes as
zeros (NBD hole replies), chunks from the source's cache at once, others fetched (in parallel,
checked) on a worker thread of the server; a read that goes on from the last one starts fetching
the chunks after it into the cache (read-ahead). ``base:allocation`` comes from the manifest:
a chunk the point holds only zeros for is a hole (flags 3), every other chunk data (0). WRITE,
TRIM and WRITE_ZEROES fail with EPERM; FLUSH does nothing; CACHE fetches into the cache. A chunk
that cannot be had fails its read with EIO, the message naming it: never zeros in its place.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from blocktrail.backup.chunksource import RepositoryChunkSource
from blocktrail.disk.readmap import MappedRead, ReadSegment
from blocktrail.disk.restoring import ChunkUnavailable
from blocktrail.errors import InvalidArgument
from blocktrail.fileio import is_zeros
from blocktrail.nbd.limits import ServerLimits
from blocktrail.nbd.proto import Command, CommandFlag, Errno, ExportInfo, Request
from blocktrail.nbd.proto.constants import BASE_ALLOCATION, STATE_HOLE, STATE_ZERO
from blocktrail.nbd.proto.errors import RequestFailed
from blocktrail.nbd.server import NbdServer
from blocktrail.passwords import NO_SOURCES, PasswordSources
from blocktrail.repo.objects import ZERO_DIGEST


class Endpoint(Protocol):
    """Where to listen (the shape of `blocktrail.host.endpoint.Endpoint`, which the layers
    keep this module from importing)."""

    @property
    def unix_path(self) -> str | None: ...

    @property
    def host(self) -> str | None: ...

    @property
    def port(self) -> int | None: ...


READ_AHEAD_CHUNKS = 32
STATUS_CHUNKS = 16384  # chunks one block-status reply covers at most (the client goes on)
_HOLE = STATE_HOLE | STATE_ZERO


class PointExport:
    """One restore point as a connection uses it (the server's `Export`)."""

    def __init__(self, source: RepositoryChunkSource) -> None:
        self._source = source
        self._cs = source.chunk_size
        self._size = source.size_bytes
        self._last_end = -1
        self._lock = threading.Lock()

    @property
    def size_bytes(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return True

    def map_read(self, count: int, offset: int, *, wait: bool) -> MappedRead | None:
        self._check_range(Command.READ, offset, count)
        cs = self._cs
        first, last = offset // cs, (offset + count - 1) // cs
        indexes = list(range(first, last + 1))
        try:
            chunks = self._source.cached(indexes, open_repository=wait)
            if chunks is None:
                if not wait:
                    return None  # the server asks again from a worker thread
                chunks = dict(self._source.fetch(indexes))
        except ChunkUnavailable as exc:
            raise RequestFailed(exc.message, errno=Errno.EIO) from exc
        with self._lock:
            sequential = offset == self._last_end
            self._last_end = offset + count
        if sequential:
            self._source.prefetch(range(last + 1, last + 1 + READ_AHEAD_CHUNKS))
        segments: list[ReadSegment] = []
        for index in indexes:
            lo = max(offset, index * cs)
            hi = min(offset + count, (index + 1) * cs)
            data = chunks[index]
            if is_zeros(data):  # a hole (or zeros): a hole reply, no bytes
                if segments and segments[-1].is_zero:
                    segments[-1] = ReadSegment(segments[-1].offset, segments[-1].length + hi - lo)
                else:
                    segments.append(ReadSegment(lo, hi - lo))
                continue
            segments.append(ReadSegment(lo, hi - lo, data=data[lo - index * cs : hi - index * cs]))
        return MappedRead(offset, count, segments, [])

    def perform(self, request: Request) -> None:
        command = request.command
        if command in (Command.WRITE, Command.TRIM, Command.WRITE_ZEROES):
            raise RequestFailed(f"restore point {self._source.point_id} is read-only",
                                errno=Errno.EPERM)
        if command is Command.CACHE:
            self._check_range(command, request.offset, request.length)
            cs = self._cs
            first, last = request.offset // cs, (request.offset + request.length - 1) // cs
            try:
                for _ in self._source.fetch(list(range(first, last + 1))):
                    pass
            except ChunkUnavailable as exc:
                raise RequestFailed(exc.message, errno=Errno.EIO) from exc
        # FLUSH: nothing is ever written

    def perform_now(self, request: Request) -> bool:
        """Nothing here is done on the event loop (a write is refused on a worker thread)."""
        return False

    def block_status_now(self, request: Request,
                         contexts: dict[int, str]) -> list[tuple[int, bytes]] | None:
        """Answered on a worker thread (the allocation map may read the repository)."""
        return None

    def block_status(self, request: Request, contexts: dict[int, str]) -> list[tuple[int, bytes]]:
        if not contexts:
            raise RequestFailed("no meta context was negotiated", errno=Errno.EINVAL)
        self._check_range(Command.BLOCK_STATUS, request.offset, request.length)
        one = bool(request.flags & CommandFlag.REQ_ONE)
        out = []
        for context_id, name in sorted(contexts.items()):
            if name != BASE_ALLOCATION:
                raise RequestFailed(f"unknown meta context {name}", errno=Errno.EINVAL)
            out.append((context_id, self._allocation(request.offset, request.length, one=one)))
        return out

    def _allocation(self, offset: int, length: int, *, one: bool) -> bytes:
        """Descriptors of ``[offset, offset + length)``, at most `STATUS_CHUNKS` chunks."""
        cs = self._cs
        first = offset // cs
        last = min((offset + length - 1) // cs, first + STATUS_CHUNKS - 1)
        try:
            digests = self._source.digests(first, last - first + 1)
        except ChunkUnavailable as exc:
            raise RequestFailed(exc.message, errno=Errno.EIO) from exc
        runs: list[list[int]] = []  # [length, flags]
        end = min(offset + length, (last + 1) * cs)
        for index, digest in enumerate(digests, first):
            lo, hi = max(offset, index * cs), min(end, (index + 1) * cs)
            flags = _HOLE if digest == ZERO_DIGEST else 0
            if runs and runs[-1][1] == flags:
                runs[-1][0] += hi - lo
            else:
                runs.append([hi - lo, flags])
            if one and len(runs) > 1:
                runs.pop()
                break
        return b"".join(n.to_bytes(4, "big") + f.to_bytes(4, "big") for n, f in runs)

    def _check_range(self, command: Command, offset: int, length: int) -> None:
        if length == 0:
            raise RequestFailed(f"{command.name} of 0 bytes", errno=Errno.EINVAL)
        if offset > self._size or length > self._size - offset:
            raise RequestFailed(f"request {offset}+{length} is outside the export "
                                f"({self._size} bytes)", errno=Errno.EINVAL)


@dataclass
class PointCatalog:
    """The restore points served, by id (the server's `Catalog`)."""

    sources: dict[str, RepositoryChunkSource]

    def lookup(self, name: str) -> ExportInfo | None:
        source = self.sources.get(name)
        if source is None:
            return None
        return ExportInfo(name, source.size_bytes, True,
                          f"blocktrail restore point {name} (read-only)",
                          (BASE_ALLOCATION,), min_block=1, preferred_block=4096,
                          multi_conn=True)  # nothing is written: every connection agrees

    def names(self) -> list[str]:
        return sorted(self.sources)

    def open(self, export: ExportInfo) -> PointExport | None:
        source = self.sources.get(export.name)
        return None if source is None else PointExport(source)

    def close(self) -> None:
        for source in self.sources.values():
            source.close()


def open_points(location: str, point_ids: list[str],
                password: PasswordSources = NO_SOURCES) -> PointCatalog:
    """A catalog of the points (each checked now: a point that does not exist, or a
    repository that is not there, is its own error)."""
    sources: dict[str, RepositoryChunkSource] = {}
    try:
        for point_id in point_ids:
            if point_id not in sources:
                sources[point_id] = RepositoryChunkSource(location, point_id,
                                                          password=password)
    except BaseException:
        for source in sources.values():
            source.close()
        raise
    return PointCatalog(sources)


def uri(endpoint: Endpoint, export: str) -> str:
    if endpoint.unix_path is not None:
        return f"nbd+unix:///{export}?socket={endpoint.unix_path}"
    host = endpoint.host or "localhost"
    host = f"[{host}]" if ":" in host else host
    return f"nbd://{host}:{endpoint.port}/{export}"


def listen_socket(endpoint: Endpoint) -> socket.socket:
    """A bound, listening, non-blocking socket; a unix socket is 0600 before it listens, and
    a stale one nobody listens on is replaced."""
    try:
        if endpoint.unix_path is not None:
            path = endpoint.unix_path
            with contextlib.suppress(FileNotFoundError):
                if not stat.S_ISSOCK(os.lstat(path).st_mode):
                    raise InvalidArgument(f"cannot listen on unix:{path}: it exists and is not "
                                          "a socket")
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    probe.connect(path)
                except OSError:
                    os.unlink(path)
                else:
                    raise InvalidArgument(f"cannot listen on unix:{path}: another process "
                                          "listens there")
                finally:
                    probe.close()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(path)
            os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
        else:
            family = socket.AF_INET6 if ":" in (endpoint.host or "") else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((endpoint.host or "127.0.0.1", endpoint.port or 0))
    except OSError as exc:
        raise InvalidArgument(f"cannot listen on {endpoint}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def serve_catalog(catalog: PointCatalog, endpoint: Endpoint, *,
                limits: ServerLimits | None = None,
                started: Callable[[], None] | None = None) -> None:
    """Serve the catalog on ``endpoint`` until SIGTERM or SIGINT (or cancelled)."""
    sock = listen_socket(endpoint)
    server = NbdServer(catalog, limits)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        server.listen(sock)
        if started is not None:
            started()
        await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await server.close()
        sock.close()
        if endpoint.unix_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(endpoint.unix_path)
