"""A restore point in a repository as a source of chunks: what the base layer of a disk restored
instantly fetches from (disk/restoring.py's `ChunkSource`), and what `blocktrail serve`
exports.

A chunk is fetched by its digest, which the point's pages give: the repository reads it from
its pack, checks it against its name and decompresses it (a damaged copy goes to quarantine
there, and the next intact copy is used). Fetches run in parallel on a pool of threads; fetches
made for background work (a fill: `background_fetches`) run on a smaller pool of their own, so
a guest's read never waits in a queue behind them, and read chunks that lie together in a pack
with one ranged read, as a restore does (a read that fails goes chunk by chunk, so the others
arrive and the one that cannot is named). An LRU cache keeps recently fetched chunks
(a chunk the point holds at several offsets is fetched once; a reader of `serve` that reads a
chunk in 4 KiB pieces fetches it once), and `prefetch` reads ahead into it.

Nothing is ever made up: a chunk that cannot be had (damaged with no intact copy, its pack
gone, the repository unreachable, a prune running) raises `ChunkUnavailable`, naming the chunk,
its offset, the point and the repository, and is recorded (`last_error`) and logged. After a
failure the next fetch opens the repository again (its index read afresh: a chunk stored again
meanwhile is found). A local repository whose ``config.json`` is gone (moved away, unmounted)
is unreachable until it is back; nothing is read from files it had open before.

The repository is a local directory or ``s3://BUCKET/PREFIX`` (reached with the process's own
S3 settings: AWS_ENDPOINT_URL, AWS_REGION, AWS_PROFILE, credentials where boto3 looks). While it
is open, the source holds a writer lease naming the point as its base (docs/storage.md,
"Leases"), as a running incremental does: no forget removes the point and no prune sweeps while
it is read. A repository the lease cannot be written to (read-only, no write permission) is
read without one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from typing import Any

from blocktrail.disk.restoring import ChunkUnavailable
from blocktrail.errors import BlocktrailError, CorruptMetadata
from blocktrail.passwords import NO_SOURCES, PasswordSources, password_source
from blocktrail.pipeline import background_priority
from blocktrail.repo import Repository, RestorePoint
from blocktrail.repo.leases import Lease
from blocktrail.repo.location import is_s3_url
from blocktrail.repo.objects import ZERO_DIGEST
from blocktrail.repo.restore import fetch_run
from blocktrail.repo.runs import Run, ranged_runs

log = logging.getLogger("blocktrail.restore")
CACHE_BYTES = 64 << 20  # recently fetched chunks (1024 of 64 KiB)
PAGE_CACHE = 64  # pages of digests (1024 chunks each)
FETCH_THREADS = 8
BACKGROUND_THREADS = 4
RANGED_MIN = 4  # a background fetch of at least this many chunks reads ranges of packs
REOPEN_AFTER_S = 1.0  # after a failure, the repository is opened again at most this often
LOG_AGAIN_S = 60.0  # the same failure is logged again after this long

_background = threading.local()


@contextlib.contextmanager
def background_fetches() -> Iterator[None]:
    """Fetches this thread makes meanwhile are background work (a fill): they run on the
    source's background pool, never ahead of a reader's."""
    before = getattr(_background, "on", False)
    _background.on = True
    try:
        yield
    finally:
        _background.on = before


def is_local_location(location: str) -> bool:
    """A repository named by a path (not a URL)."""
    return "://" not in location


def is_repository_location(location: str) -> bool:
    """A location a source can open: a path, or ``s3://``."""
    return is_local_location(location) or is_s3_url(location)


class _Connection:
    """The open repository, the point and its page names. Every reader holds it
    (`acquire`/`release`); once retired, the last reader closes it, so no file it had open is
    closed under a read."""

    def __init__(self, repo: Repository, point: RestorePoint, pages: list[str],
                 lease: Lease | None) -> None:
        self.repo, self.point, self.pages, self._lease = repo, point, pages, lease
        self.opened = time.monotonic()
        self._users = 0
        self._retired = False
        self._mutex = threading.Lock()

    @property
    def lease_lost(self) -> bool:
        """Its lease ran out (the machine slept, the store was away): the point is no longer
        kept from a forget and prune; a new lease is taken by opening again."""
        return self._lease is not None and self._lease.lost

    def acquire(self) -> None:
        with self._mutex:
            self._users += 1

    def release(self) -> None:
        with self._mutex:
            self._users -= 1
            close = self._retired and self._users == 0
        if close:
            self._close()

    def retire(self) -> None:
        with self._mutex:
            if self._retired:
                return
            self._retired = True
            close = self._users == 0
        if close:
            self._close()

    def _close(self) -> None:
        try:
            if self._lease is not None:
                self._lease.release()
        finally:
            self.repo.close()


class _ChunkCache:
    """Chunks by digest, least recently used out first, at most ``capacity`` bytes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._chunks: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0

    def get(self, digest: bytes) -> bytes | None:
        with self._lock:
            data = self._chunks.get(digest)
            if data is not None:
                self._chunks.move_to_end(digest)
                self.hits += 1
            return data

    def put(self, digest: bytes, data: bytes) -> None:
        if len(data) > self.capacity:
            return
        with self._lock:
            if digest in self._chunks:
                self._chunks.move_to_end(digest)
                return
            self._chunks[digest] = data
            self._bytes += len(data)
            while self._bytes > self.capacity:
                _, old = self._chunks.popitem(last=False)
                self._bytes -= len(old)


class RepositoryChunkSource:
    """The chunks of restore point ``point_id`` in the repository at ``location``.

    ``connect=False`` opens nothing now (a disk whose source this is opens, and reads what is
    local, while the repository is unreachable); then ``chunk_size`` must be given (what
    `describe` recorded). Thread-safe."""

    def __init__(self, location: str, point_id: str, *, chunk_size: int | None = None,
                 connect: bool = True, cache_bytes: int = CACHE_BYTES,
                 threads: int = FETCH_THREADS, background_threads: int = BACKGROUND_THREADS,
                 hold_lease: bool = True, password: PasswordSources = NO_SOURCES) -> None:
        self.location = location
        self._password = password  # an encrypted repository's: where to find it (never kept)
        self.point_id = point_id
        self._chunk_size = chunk_size
        self._size_bytes: int | None = None
        self._hold_lease = hold_lease
        self._conn: _Connection | None = None
        self._conn_lock = threading.Lock()
        self._reopen = False
        self._pages: OrderedDict[str, bytes] = OrderedDict()
        self._page_lock = threading.Lock()
        self.cache = _ChunkCache(cache_bytes)
        self._inflight: dict[bytes, Future[bytes]] = {}
        self._inflight_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="blocktrail-fetch")
        self._background_pool = ThreadPoolExecutor(background_threads,
                                                   thread_name_prefix="blocktrail-fetch-bg",
                                                   initializer=background_priority)
        self._closed = False
        self._stats_lock = threading.Lock()
        self.fetched_chunks = 0
        self.fetched_bytes = 0
        self.failures = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None  # time.time()
        self._logged: dict[str, float] = {}
        if connect:
            try:
                self._connection(typed=True).release()
            except BaseException:
                self.close()
                raise

    # ------------------------------------------------------------------ ChunkSource

    @property
    def chunk_size(self) -> int:
        if self._chunk_size is None:
            self._known()
        assert self._chunk_size is not None
        return self._chunk_size

    @property
    def size_bytes(self) -> int:
        if self._size_bytes is None:
            self._known()
        assert self._size_bytes is not None
        return self._size_bytes

    @property
    def chunks(self) -> int:
        return -(-self.size_bytes // self.chunk_size)

    @property
    def point(self) -> RestorePoint:
        conn = self._connection(typed=True)
        try:
            return conn.point
        finally:
            conn.release()

    def holes(self) -> list[bool]:
        """Per chunk: True where the point holds only zeros."""
        conn = self._connection(typed=True)
        try:
            out = [False] * self.chunks
            for page_no in range(len(conn.pages)):
                first = page_no * conn.point.page_chunks
                for slot, digest in enumerate(self._page_digests(conn, page_no)):
                    if first + slot < len(out):
                        out[first + slot] = digest == ZERO_DIGEST
            return out
        finally:
            conn.release()

    def digests(self, first: int, count: int) -> list[bytes]:
        """The digests of chunks ``first .. first + count - 1`` (`ZERO_DIGEST`: a hole);
        `ChunkUnavailable` when the pages cannot be read."""
        conn = self._fetch_connection(first)
        try:
            return self._digests(conn, range(first, first + count), first)
        finally:
            conn.release()

    def fetch(self, indexes: list[int]) -> Iterator[tuple[int, bytes]]:
        """The chunks' bytes, checked, as they arrive (fetched in parallel). Every chunk that
        can be had is yielded; then, if any could not, `ChunkUnavailable` names the first."""
        if not indexes:
            return
        background = getattr(_background, "on", False)
        conn = self._fetch_connection(indexes[0])
        try:
            digests = dict(zip(indexes, self._digests(conn, indexes, indexes[0]), strict=True))
            groups: dict[bytes, list[int]] = {}
            for index in indexes:
                groups.setdefault(digests[index], []).append(index)
            pending: dict[Future[bytes], tuple[bytes, list[int]]] = {}
            uncached: dict[bytes, list[int]] = {}
            for digest, group in groups.items():
                if digest == ZERO_DIGEST:
                    for index in group:
                        yield index, bytes(self._length(conn, index))
                    continue
                data = self.cache.get(digest)
                if data is None:
                    uncached[digest] = group
                    continue
                yield from self._checked(conn, digest, group, data)
            error: ChunkUnavailable | None = None
            if background and len(uncached) >= RANGED_MIN:
                for digest, data in self._fetch_ranged(conn, uncached, pending):
                    try:
                        yield from self._checked(conn, digest, uncached[digest], data)
                    except ChunkUnavailable as exc:
                        error = error or exc
            else:
                for digest, group in uncached.items():
                    pending[self._submit(conn, digest, group[0], background)] = (digest, group)
            for future in as_completed(pending):
                digest, group = pending[future]
                try:
                    data = future.result()
                except ChunkUnavailable as exc:
                    error = error or exc
                    continue
                try:
                    yield from self._checked(conn, digest, group, data)
                except ChunkUnavailable as exc:
                    error = error or exc
            if error is not None:
                raise error
        finally:
            conn.release()

    def _fetch_ranged(self, conn: _Connection, wanted: dict[bytes, list[int]],
                      fallback: dict[Future[bytes], tuple[bytes, list[int]]]
                      ) -> Iterator[tuple[bytes, bytes]]:
        """(digest, bytes) of the ``wanted`` chunks, read as a restore reads them: chunks that
        lie together in a pack with one ranged read, on the background pool. A read that fails
        goes chunk by chunk instead (futures added to ``fallback``), so every chunk that can
        be had arrives and the one that cannot is named."""
        entries = sorted((group[0], digest) for digest, group in wanted.items())
        runs: dict[Future[list[tuple[int, bytes]]], Run] = {}
        for run in ranged_runs(conn.repo, entries):
            conn.acquire()
            try:
                runs[self._background_pool.submit(self._read_run, conn, run)] = run
            except RuntimeError as exc:  # closed meanwhile
                conn.release()
                raise self._closed_error() from exc
            except BaseException:
                conn.release()
                raise
        for future in as_completed(runs):
            try:
                chunks = future.result()
            except (BlocktrailError, OSError):
                for index, digest, _ in runs[future]:
                    fallback[self._submit(conn, digest, index, True)] = (digest, wanted[digest])
                continue
            for (_, digest, _), (_, data) in zip(runs[future], chunks, strict=True):
                self.cache.put(digest, data)
                with self._stats_lock:
                    self.fetched_chunks += 1
                    self.fetched_bytes += len(data)
                yield digest, data

    def _read_run(self, conn: _Connection, run: Run) -> list[tuple[int, bytes]]:
        try:
            if self._closed:
                raise self._closed_error()
            return fetch_run(conn.repo, run, f"restore point {conn.point.id}")
        finally:
            conn.release()

    def describe(self) -> dict[str, Any]:
        return {"repository": self.location, "point": self.point_id,
                "chunk_size": self.chunk_size}

    def successor(self) -> RepositoryChunkSource:
        """A source of the same point that goes on with this one's open repository (its key
        derived, the point, its pages and the chunk index read: none of it again), as the base
        of a disk restored from this one takes over from the source that built it. This one
        opens the repository again if it is used after."""
        after = RepositoryChunkSource(self.location, self.point_id, chunk_size=self.chunk_size,
                                      connect=False, hold_lease=self._hold_lease,
                                      password=self._password)
        with self._conn_lock:
            conn = None if self._reopen else self._conn
            if conn is not None:
                self._conn = None
                after._conn, after._size_bytes = conn, self._size_bytes
        with self._page_lock:
            after._pages = OrderedDict(self._pages)
        return after

    def close(self) -> None:
        """Stop: fetches queued still run, each failing at once ("closed"), so that their
        readers learn it and the repository (and its lease) is closed by the last of them."""
        self._closed = True
        self._pool.shutdown(wait=False)
        self._background_pool.shutdown(wait=False)
        with self._conn_lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.retire()

    # ------------------------------------------------------------------ for readers

    def cached(self, indexes: Iterable[int], *,
               open_repository: bool = True) -> dict[int, bytes] | None:
        """The chunks' bytes if every one is a hole or in the cache now; else None (without
        waiting for anything but the pages; with ``open_repository=False``, None also when
        the repository would have to be opened first)."""
        indexes = list(indexes)
        if not indexes:
            return {}
        if not open_repository:
            live = self._live_connection()
            if live is None:
                return None
            conn = live
        else:
            conn = self._fetch_connection(indexes[0])
        try:
            out: dict[int, bytes] = {}
            for index, digest in zip(indexes, self._digests(conn, indexes, indexes[0]),
                                     strict=True):
                if digest == ZERO_DIGEST:
                    out[index] = bytes(self._length(conn, index))
                    continue
                data = self.cache.get(digest)
                if data is None or len(data) != self._length(conn, index):
                    return None
                out[index] = data
            return out
        finally:
            conn.release()

    def prefetch(self, indexes: Iterable[int]) -> None:
        """Start fetching the chunks into the cache (read-ahead), in the background; a failure
        here is left for the read that needs the chunk to report. It never waits (an event
        loop calls it): with no open repository at hand, nothing is read ahead."""
        conn = self._live_connection()
        if conn is None:
            return
        chunks = -(-conn.point.size_bytes // conn.point.chunk_size)
        indexes = [i for i in indexes if 0 <= i < chunks]
        if not indexes:
            conn.release()
            return
        try:
            for index, digest in zip(indexes, self._digests(conn, indexes, indexes[0]),
                                     strict=True):
                if digest != ZERO_DIGEST and self.cache.get(digest) is None:
                    future = self._submit(conn, digest, index, True)
                    future.add_done_callback(_ignore_failure)
        except (ChunkUnavailable, RuntimeError):  # RuntimeError: closed meanwhile
            pass
        finally:
            conn.release()

    # ------------------------------------------------------------------ internals

    def _live_connection(self) -> _Connection | None:
        """The open repository, acquired, if there is one to use now; None rather than wait
        (another thread opening it holds the lock for as long as that takes)."""
        if not self._conn_lock.acquire(blocking=False):
            return None
        try:
            live = self._conn
            if live is None or self._reopen or self._closed or live.lease_lost:
                return None
            live.acquire()
            return live
        finally:
            self._conn_lock.release()

    def _known(self) -> None:
        conn = self._connection(typed=True)
        conn.release()

    def _length(self, conn: _Connection, index: int) -> int:
        cs = conn.point.chunk_size
        return min(cs, conn.point.size_bytes - index * cs)

    def _checked(self, conn: _Connection, digest: bytes, group: list[int],
                 data: bytes) -> Iterator[tuple[int, bytes]]:
        for index in group:
            expected = self._length(conn, index)
            if len(data) != expected:
                raise self._failed(index, f"chunk {digest.hex()} has {len(data)} bytes, not "
                                          f"{expected}")
            yield index, data

    def _fetch_connection(self, index: int) -> _Connection:
        try:
            return self._connection(typed=False)
        except ChunkUnavailable as exc:
            raise self._failed(index, exc.message) from exc

    def _connection(self, *, typed: bool) -> _Connection:
        """The open repository, acquired (the caller releases it); opened now if need be.
        ``typed``: the repository's own errors as they are (a point that does not exist,
        ...); else a `ChunkUnavailable` saying why."""
        with self._conn_lock:
            if self._closed:
                raise self._closed_error()
            conn = self._conn
            reachable = not is_local_location(self.location) or os.path.isfile(
                os.path.join(self.location, "config.json"))
            if conn is not None and (not reachable or conn.lease_lost or (
                    self._reopen and time.monotonic() - conn.opened >= REOPEN_AFTER_S)):
                self._conn = None
                conn.retire()
                conn = None
            if conn is None:
                if not reachable and not typed:  # typed: Repository.open names what is wrong
                    raise ChunkUnavailable(
                        f"the repository {self.location} is unreachable (no config.json there "
                        "now: moved away or unmounted?)")
                try:
                    conn = self._open()
                except BlocktrailError as exc:
                    if typed:
                        raise
                    raise ChunkUnavailable(f"the repository {self.location} cannot be read: "
                                           f"{exc.message}") from exc
                except OSError as exc:
                    raise ChunkUnavailable(f"the repository {self.location} cannot be read: "
                                           f"{exc.strerror or exc}") from exc
                self._conn, self._reopen = conn, False
            conn.acquire()
            return conn

    def _open(self) -> _Connection:
        # It only reads; its lease (a name of its own, or none where none can be written)
        # keeps a prune from removing the point meanwhile.
        repo = Repository.open(self.location, password=password_source(self._password),
                               writes=False)
        lease: Lease | None = None
        try:
            point = repo.point(self.point_id)
            if self._hold_lease:
                lease = repo.reader_lease(point.id)
            if self._chunk_size is not None and point.chunk_size != self._chunk_size:
                raise CorruptMetadata(
                    f"restore point {point.id} has chunks of {point.chunk_size} bytes, not "
                    f"{self._chunk_size} as recorded: it is not the point this was made from")
            pages = repo.pages_of(point)
            if len(pages) * point.page_chunks < -(-point.size_bytes // point.chunk_size):
                raise CorruptMetadata(f"restore point {point.id} has too few pages for its "
                                      "size")
            repo.index  # noqa: B018  (read the chunk index once, now)
        except BaseException:
            with contextlib.suppress(OSError):
                repo.close()
            if lease is not None:
                lease.release()
            raise
        self._chunk_size, self._size_bytes = point.chunk_size, point.size_bytes
        return _Connection(repo, point, pages, lease)

    def _page_digests(self, conn: _Connection, page_no: int) -> list[bytes]:
        hexname = conn.pages[page_no]
        with self._page_lock:
            plain = self._pages.get(hexname)
            if plain is not None:
                self._pages.move_to_end(hexname)
        if plain is None:
            plain = conn.repo.point_page(conn.point, page_no, conn.pages)
            with self._page_lock:
                self._pages[hexname] = plain
                while len(self._pages) > PAGE_CACHE:
                    self._pages.popitem(last=False)
        return [plain[i : i + 32] for i in range(0, len(plain), 32)]

    def _digests(self, conn: _Connection, indexes: Iterable[int], first: int) -> list[bytes]:
        per_page = conn.point.page_chunks
        chunks = -(-conn.point.size_bytes // conn.point.chunk_size)
        pages: dict[int, list[bytes]] = {}
        out: list[bytes] = []
        try:
            for index in indexes:
                if not 0 <= index < chunks:
                    raise CorruptMetadata(f"chunk {index} is outside restore point "
                                          f"{conn.point.id} ({chunks} chunks)")
                page_no, slot = divmod(index, per_page)
                if page_no not in pages:
                    pages[page_no] = self._page_digests(conn, page_no)
                out.append(pages[page_no][slot])
        except BlocktrailError as exc:
            raise self._failed(first, exc.message) from exc
        except OSError as exc:
            raise self._failed(first, exc.strerror or str(exc)) from exc
        return out

    def _submit(self, conn: _Connection, digest: bytes, index: int,
                background: bool) -> Future[bytes]:
        with self._inflight_lock:
            future = self._inflight.get(digest)
            # a reader never waits for a background fetch that is still queued
            if future is not None and (background or future.running() or future.done()):
                return future
            conn.acquire()
            try:
                pool = self._background_pool if background else self._pool
                future = pool.submit(self._read, conn, digest, index)
            except RuntimeError as exc:  # closed meanwhile: the pool takes nothing more
                conn.release()
                raise self._closed_error() from exc
            except BaseException:
                conn.release()
                raise
            self._inflight[digest] = future

        def done(finished: Future[bytes]) -> None:
            with self._inflight_lock:
                if self._inflight.get(digest) is finished:
                    del self._inflight[digest]

        future.add_done_callback(done)
        return future

    def _read(self, conn: _Connection, digest: bytes, index: int) -> bytes:
        if self._closed:  # queued before the close: fail at once, and let the repository go
            conn.release()
            raise self._closed_error()
        try:
            data = conn.repo.read_chunk(digest, f"chunk {index} of restore point "
                                                f"{conn.point.id}")
        except BlocktrailError as exc:
            raise self._failed(index, exc.message) from exc
        except OSError as exc:
            raise self._failed(index, f"{exc.strerror or exc} ({exc.filename or 'a pack'})") \
                from exc
        finally:
            conn.release()
        self.cache.put(digest, data)
        with self._stats_lock:
            self.fetched_chunks += 1
            self.fetched_bytes += len(data)
        return data

    def _closed_error(self) -> ChunkUnavailable:
        return ChunkUnavailable(f"the source of restore point {self.point_id} is closed")

    def _failed(self, index: int, why: str) -> ChunkUnavailable:
        """The error for chunk ``index``, recorded and logged; the repository is opened again
        before the next fetch."""
        cs = self._chunk_size
        at = f" (offset {index * cs})" if cs else ""
        message = (f"chunk {index}{at} of restore point {self.point_id} in repository "
                   f"{self.location} cannot be read: {why}")
        now = time.time()
        with self._stats_lock:
            self.failures += 1
            self.last_error, self.last_error_at = message, now
            self._reopen = True
            logged = self._logged.get(message)
            if logged is None or now - logged >= LOG_AGAIN_S:
                self._logged[message] = now
                if len(self._logged) > 1000:
                    self._logged.clear()
                log.warning("%s", message)
        return ChunkUnavailable(message)


def _ignore_failure(future: Future[bytes]) -> None:
    if not future.cancelled():
        future.exception()  # read, so nothing reports it as never retrieved


def open_chunk_source(info: dict[str, Any],
                      password: PasswordSources = NO_SOURCES) -> RepositoryChunkSource:
    """The source a restoring disk's base recorded (`RepositoryChunkSource.describe`), opened
    lazily: the disk opens, and reads what is local, while the repository is unreachable."""
    try:
        location, point_id = str(info["repository"]), str(info["point"])
        chunk_size = int(info["chunk_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptMetadata(f"a restoring base records no repository source this blocktrail "
                              f"can open ({info!r})") from exc
    return RepositoryChunkSource(location, point_id, chunk_size=chunk_size, connect=False,
                                 password=password)
