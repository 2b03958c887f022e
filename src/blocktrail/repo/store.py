"""The store of a repository on top of its backend: config, packs, index files and the chunk
index, quarantine records, manifests and verify records, and the leases of its writers.

Everything is an object of the backend (repo/backend.py), named in one place (repo/layout.py);
writing a restore point (writer.py, sink.py), restoring (restore.py), check, repair, forget and
prune build on this and on nothing above it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, NoReturn, TypeVar

from blake3 import blake3

from blocktrail.errors import InvalidArgument, UnsupportedFormat, is_no_space
from blocktrail.pipeline import read_ahead
from blocktrail.repo import index as index_file
from blocktrail.repo import layout, quarantine
from blocktrail.repo.backend import (
    Backend,
    BackendError,
    InvalidObjectName,
    ObjectExists,
    ObjectNotFound,
)
from blocktrail.repo.errors import (
    AUTH_FAILED,
    AuthenticationFailed,
    ChunkCorrupt,
    ConditionalWritesUnsupported,
    DowngradeRefused,
    IndexAuthenticationFailed,
    LeaseLost,
    ManifestAuthenticationFailed,
    ManifestCorrupt,
    ObjectAuthenticationFailed,
    ObjectMissing,
    PointNotFound,
    RepositoryError,
    RepositoryExists,
    RepositoryNoSpace,
    RepositoryNotFound,
)
from blocktrail.repo.index import ChunkIndex
from blocktrail.repo.leases import DEFAULT_TIMING, Lease, Timing, boot_clock
from blocktrail.repo.manifest import VERIFY_STATES, RestorePoint
from blocktrail.repo.objects import (
    KIND_CHUNK,
    KIND_INDEX,
    KIND_MANIFEST,
    KIND_PAGE,
    KIND_TABLE,
    KIND_VERIFY,
    ZERO_DIGEST,
    Codec,
    PlainCodec,
)
from blocktrail.repo.packs import Location, read_trailer, trailer_length
from blocktrail.repo.quarantine import KIND_NAMES, CopyKey, DamagedCopy
from blocktrail.repo.runs import Run, place, ranged_runs, read_run

FORMAT = "blocktrail-repository"
VERSION = 2  # 2: leases, verify records, garbage collection beside writers (1 still opens)
VERSION_ENCRYPTED = 3  # 3: encrypted (a blocktrail that knows only 2 refuses it)
CHUNK_SIZE = 64 * 1024
PAGE_CHUNKS = 1024
VERIFY_FORMAT = "blocktrail-verify"
PAGES_KEPT = 256  # pages and tables read, kept in memory (32 KiB each: 8 MiB)
LOCAL_READ_SLICE = 64  # small files read in turn by one task of the I/O threads (`read_all`)
_T = TypeVar("_T")
_R = TypeVar("_R")
_LOST_ADVICE = ("The next backup of the disk stores that content again if the disk still "
                "has it; `blocktrail verify POINT --against SOURCE --heal` stores it again from "
                "the source of a restore point")


def stamp() -> str:
    """A name part that sorts by time: ``<UTC to the millisecond>Z-<8 random hex>``."""
    now = datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}Z-{secrets.token_hex(4)}"


def new_index_name() -> str:
    return f"{secrets.token_hex(16)}.idx"


class Store:
    """A repository's objects, on one backend. Safe for concurrent writers (processes or
    threads, on any number of machines)."""

    def __init__(self, backend: Backend, config: dict[str, Any],
                 timing: Timing = DEFAULT_TIMING, codec: Codec | None = None,
                 key_id: str | None = None) -> None:
        self.backend = backend
        self.config = config
        self.codec: Codec = codec if codec is not None else PlainCodec()
        self.key_id = key_id  # the key file that opened it (encrypted)
        self.location = backend.url
        self.timing = timing
        self.chunk_size = int(config["chunk_size"])
        self.page_chunks = int(config["page_chunks"])
        self.repo_id = str(config["repo_id"])
        self._index: ChunkIndex | None = None
        self._index_lock = threading.Lock()
        cpus = max(2, os.cpu_count() or 2)
        self.pool = ThreadPoolExecutor(max_workers=cpus, thread_name_prefix="blocktrail-repo")
        # Sealing a new point's chunks (hash, compress, encrypt) leaves one core to the thread
        # that reads the disk and packs what is sealed, and to the pack writer: on two cores,
        # two sealing threads beside them take more CPU and more time than one
        # (docs/operations.md).
        self.seal_pool = ThreadPoolExecutor(max_workers=cpus - 1,
                                            thread_name_prefix="blocktrail-seal")
        self.io_pool = ThreadPoolExecutor(max_workers=16 if backend.remote else cpus,
                                          thread_name_prefix="blocktrail-io")
        self._quarantine_lock = threading.Lock()  # restore threads may find the same copy
        self._pages: OrderedDict[tuple[bytes, int], bytes] = OrderedDict()  # read, checked
        self._pages_lock = threading.Lock()
        self._set_aside: set[CopyKey] = set()  # damaged copies whose record failed

    # ------------------------------------------------------------------ config

    @staticmethod
    def new_config(encrypted: bool) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION_ENCRYPTED if encrypted else VERSION,
                "repo_id": uuid.uuid4().hex, "chunk_size": CHUNK_SIZE,
                "page_chunks": PAGE_CHUNKS, "created_at": datetime.now(UTC).isoformat(),
                **({} if encrypted else {"encryption": "none"})}

    @staticmethod
    def create_config(backend: Backend, config: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write config.json (create-only): it is what makes the repository exist."""
        config = config if config is not None else Store.new_config(False)
        try:
            backend.create(layout.CONFIG, (json.dumps(config, indent=1) + "\n").encode())
        except ObjectExists:
            raise RepositoryExists(f"{backend.url} already holds a repository") from None
        return config

    @staticmethod
    def load_config(backend: Backend) -> dict[str, Any]:
        try:
            data = backend.load(layout.CONFIG)
        except ObjectNotFound:
            raise RepositoryNotFound(f"{backend.url} is not a blocktrail repository (no "
                                     "config.json)") from None
        try:
            config = json.loads(data)
        except ValueError as exc:
            raise RepositoryError(f"{backend.url}/config.json: damaged ({exc})") from exc
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise UnsupportedFormat(f"{backend.url}: not a blocktrail repository")
        if not isinstance(config.get("version"), int) or config["version"] > VERSION_ENCRYPTED:
            raise UnsupportedFormat(f"{backend.url}: repository version {config.get('version')}"
                                    f" is newer than this blocktrail ({VERSION_ENCRYPTED})")
        repo_id = config.get("repo_id")
        if not isinstance(repo_id, str) or not repo_id:
            raise RepositoryError(f"{backend.url}/config.json is damaged: its repository ID "
                                  f"(repo_id) is {'missing' if repo_id is None else repr(repo_id)}"
                                  "; put back the config from a copy of the repository")
        for field in ("chunk_size", "page_chunks"):
            value = config.get(field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise RepositoryError(f"{backend.url}/config.json is damaged: {field} is "
                                      f"{value!r}; put back the config from a copy of the "
                                      "repository")
        return config

    @staticmethod
    def probe_conditional_writes(backend: Backend) -> None:
        """Write one probe object twice: the second create must be refused. A store that
        overwrites instead cannot keep a repository safe (create-only objects and leases)."""
        name = layout.probe(secrets.token_hex(8))
        first = secrets.token_bytes(16)
        backend.create(name, first)
        try:
            backend.create(name, secrets.token_bytes(16))
        except ObjectExists:
            return
        finally:
            with contextlib.suppress(BackendError, OSError):
                backend.delete(name)
        raise ConditionalWritesUnsupported(
            f"{backend.url}: the object store does not enforce conditional writes (a PUT with "
            "If-None-Match: * replaced an existing object): blocktrail needs them so that no "
            "object is ever overwritten and leases exclude each other; use a store that "
            "supports them (AWS S3, MinIO, Ceph RGW, SeaweedFS) or a proxy that passes the "
            "header through")

    def read_all(self, read: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
        """``read(item)`` for each of ``items`` (small files: manifests, index files, verify
        records), the results in order, on the I/O threads: a task each on object storage (a
        request each, waiting for the network), slices of `LOCAL_READ_SLICE` in a local
        directory. There such a read is mostly Python work under the GIL, which a task (a
        future) each makes slower than reading them in turn: 2,068 index files, warm, on two
        cores took 0.33 s a task each, 0.19-0.26 s in slices, 0.16-0.18 s in turn; slices
        still overlap reads that wait for the disk."""
        if self.backend.remote:
            return list(self.io_pool.map(read, items))
        slices = [items[i : i + LOCAL_READ_SLICE] for i in range(0, len(items), LOCAL_READ_SLICE)]
        return [result for part in self.io_pool.map(lambda part: [read(item) for item in part],
                                                      slices)
                for result in part]

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.seal_pool.shutdown(wait=True)
        self.io_pool.shutdown(wait=True)
        self.backend.close()

    # ------------------------------------------------------------------ writing

    @contextlib.contextmanager
    def writing(self, what: str, consequence: str = "nothing was published") -> Iterator[None]:
        """A full file system (or quota) while writing becomes `RepositoryNoSpace`."""
        try:
            yield
        except OSError as exc:
            if not is_no_space(exc):
                raise
            raise RepositoryNoSpace(
                f"the file system of repository {self.location} is full ({what}: "
                f"{exc.strerror or exc}): free space, e.g. `blocktrail forget {self.location} "
                f"--keep-last N --prune`, and retry; {consequence}") from exc

    def write_pack(self, pack_id: str, data: bytes | bytearray | memoryview,
                   consequence: str = "nothing was published") -> None:
        with self.writing(f"writing pack {pack_id}", consequence):
            self.backend.create(layout.pack(pack_id), data)

    def delete_pack(self, pack_id: str) -> int:
        """Delete a pack if it exists; -> the bytes it held."""
        name = layout.pack(pack_id)
        try:
            size = self.backend.info(name).size
        except ObjectNotFound:
            return 0
        self.backend.delete(name)
        return size

    def pack_sizes(self) -> dict[str, int]:
        """Every pack there is (one listing), with its size."""
        return self._pack_listing()[0]

    def pack_ids(self) -> set[str]:
        return set(self.pack_sizes())

    def _pack_listing(self) -> tuple[dict[str, int], dict[str, str]]:
        """-> (every pack there is, with its size; pack ID -> object name of each pack file
        in another folder than its own, which is not a pack until it is moved back)."""
        sizes: dict[str, int] = {}
        misplaced: dict[str, str] = {}
        for info in self.backend.list(layout.PACKS):
            if (pid := layout.pack_id_of(info.name)) is not None:
                sizes[pid] = info.size
            elif (pid := layout.misplaced_pack_id_of(info.name)) is not None:
                misplaced[pid] = info.name
        return sizes, misplaced

    def read_range(self, pack_id: str, offset: int, length: int, label: str) -> bytes:
        try:
            return self.backend.load(layout.pack(pack_id), offset, length)
        except ObjectNotFound:
            raise ObjectMissing(f"{label}: pack {pack_id} is missing") from None

    def read_pack(self, pack_id: str) -> bytes:
        return self.read_range(pack_id, 0, self.backend.info(layout.pack(pack_id)).size,
                               f"pack {pack_id}")

    def index_files(self) -> list[str]:
        return [f for info in self.backend.list(layout.INDEX)
                if (f := layout.index_filename_of(info.name)) is not None]

    def write_index(self, filename: str, data: bytes,
                    consequence: str = "nothing was published") -> None:
        name = layout.index_file(filename)
        sealed = self.codec.seal_file(KIND_INDEX, name, data)
        with self.writing(f"writing index file {filename}", consequence):
            self.backend.create(name, sealed)

    def index_file_exists(self, filename: str) -> bool:
        try:
            self.backend.info(layout.index_file(filename))
        except ObjectNotFound:
            return False
        return True

    def delete_index(self, filename: str) -> None:
        self.backend.delete(layout.index_file(filename))

    def temp_files(self) -> list[str]:
        """What interrupted writes left behind (a local directory's ``*.tmp``)."""
        return self.backend.leftovers()

    def delete_temp_files(self) -> int:
        return self.backend.delete_leftovers()

    # ------------------------------------------------------------------ the chunk index

    @property
    def index(self) -> ChunkIndex:
        with self._index_lock:
            if self._index is None:
                self._index = self._load_index()
            return self._index

    def reload_index(self) -> ChunkIndex:
        """Forget the chunk index read so far (another process may have changed it)."""
        with self._index_lock:
            self._index = None
        return self.index

    def _load_index(self) -> ChunkIndex:
        """Read order: the index files are listed first, then the packs, the quarantine and
        the condemned packs. A writer stores a pack before the index file that names it, so
        every pack an index file listed here names was stored before the pack listing: an
        entry whose pack that listing lacks has lost its pack (a prune that finds it so drops
        the entry). Listed the other way round, a backup publishing in between would have its
        new pack missing from the listing, and its index file dropped by the prune that read
        it. An index file that vanishes between listing and reading (a prune replaced it)
        makes the whole load start again, so that no entry it held is missed."""
        for _ in range(5):
            names = self.index_files()
            packs, quarantined, condemned = (self.io_pool.submit(self._pack_listing),
                                             self.io_pool.submit(self.quarantined),
                                             self.io_pool.submit(self.condemned_packs))
            sizes, misplaced = packs.result()
            loaded = ChunkIndex(set(sizes), quarantined.result(), condemned.result())
            loaded.misplaced = misplaced
            results = self.read_all(self._read_index_file, names)
            if any(r is None for r in results):
                continue
            loaded.files = names
            for name, result in zip(names, results, strict=True):
                if isinstance(result, DowngradeRefused):
                    raise result  # not a damaged file: the repository is not what it says
                if isinstance(result, RepositoryError):
                    loaded.damaged_files.append((name, result.message))
                    if isinstance(result, AuthenticationFailed):
                        loaded.unauthentic_files.add(name)
                elif result is not None:
                    loaded.add_file(result)
            return loaded
        raise RepositoryError(f"{self.location}: the index files keep changing while they are "
                              "read; try again")

    def _read_index_file(self, name: str) -> dict[bytes, bytes] | RepositoryError | None:
        try:
            data = self.backend.load(layout.index_file(name))
        except ObjectNotFound:
            return None
        try:
            where = layout.index_file(name)
            return index_file.decode(self.codec.open_file(KIND_INDEX, where, data, where), where)
        except RepositoryError as exc:
            return exc

    def condemned_packs(self) -> frozenset[str]:
        """Packs a garbage collection has condemned: never referred to by a new point."""
        packs: set[str] = set()
        for info in self.backend.list(layout.GC):
            run = layout.gc_run_of(info.name)
            if run is None or run[1] != "condemned":
                continue
            try:
                packs.update(condemned_list(self.backend.load(info.name)))
            except ObjectNotFound:
                continue  # finished meanwhile
            except ValueError:
                continue  # damaged: the prune that owns it deletes it
        return frozenset(packs)

    def has_chunk(self, name: bytes) -> bool:
        """A new restore point may refer to ``name`` (deduplicate against it)."""
        return self.index.referenceable(name)

    def add_locations(self, locations: dict[bytes, Location]) -> None:
        self.index.add(locations)

    def lost_objects(self) -> frozenset[bytes]:
        """Objects an index file names that a new point may not refer to: no usable copy is
        left (damaged, quarantined, their pack gone), or only in condemned packs. A backup
        stores them again when its source still has them."""
        return self.index.lost() | self.index.unreferenceable()

    # ------------------------------------------------------------------ quarantine

    def quarantined(self) -> set[CopyKey]:
        keys = (quarantine.parse_record_name(info.name.removeprefix(layout.QUARANTINE))
                for info in self.backend.list(layout.QUARANTINE))
        return {key for key in keys if key is not None} | self._set_aside

    def quarantine(self, copy: DamagedCopy) -> str | None:
        """Record ``copy`` as damaged, durably and create-only; -> None, or why the record
        could not be written (the copy is set aside in memory all the same)."""
        name = layout.quarantine_record(quarantine.record_name(copy.key))
        try:
            with self._quarantine_lock:
                self.backend.create(name, quarantine.record_bytes(copy))
        except ObjectExists:
            return None
        except (OSError, BackendError) as exc:
            self._set_aside.add(copy.key)
            return f"recording it in {layout.QUARANTINE} failed: {exc}"
        return None

    def release_quarantine(self, key: CopyKey) -> None:
        self.backend.delete(layout.quarantine_record(quarantine.record_name(key)))

    def set_aside(self, copy: DamagedCopy) -> DamagedCopy | None:
        """Stop using a damaged copy, now and durably; -> the copy, with `not_recorded` saying
        why when its quarantine record could not be written. -> None when the copy is intact
        and the index entry that located it is what is damaged (`misindexed`): that entry
        alone is no longer used, and nothing is put in quarantine."""
        if self.misindexed(copy) is not None:
            return None
        failure = self.quarantine(copy)
        self.index.drop(copy.digest, copy.pack_id, copy.offset,
                        f"its only copy (pack {copy.pack_id}, offset {copy.offset}) is damaged "
                        "and in quarantine")
        return copy if failure is None else dataclasses.replace(copy, not_recorded=failure)

    def misindexed(self, copy: DamagedCopy) -> str | None:
        """When the pack's trailer lists ``copy``'s object at its offset with another length
        than the index entry, and the object read at that length is intact: the index entry
        is damaged, not the copy (quarantining the copy, whose key has no length, would
        condemn the intact object). That entry is dropped from the chunk index
        (`ChunkIndex.damaged_entries`, reported by `check`; `repo repair` rewrites the index).
        -> what to say, or None (the copy is what is damaged, or it cannot be told)."""
        label = f"{KIND_NAMES.get(copy.kind, 'object')} {copy.digest.hex()} in pack {copy.pack_id}"
        try:
            listed = {(n, o): ln for n, o, ln in self.pack_trailer(copy.pack_id)}
            length = listed.get((copy.digest, copy.offset))
            if length is None or length == copy.length:
                return None
            data = self.read_range(copy.pack_id, copy.offset, length, label)
            self.codec.open(data, copy.kind, copy.digest, label)
        except (ChunkCorrupt, ObjectMissing, ObjectNotFound):
            return None
        why = (f"an index entry names {label} at offset {copy.offset} with {copy.length} bytes, "
               f"but the object there is intact and {length} bytes long: the index entry is "
               "damaged, not the object (nothing was put in quarantine); `blocktrail repo "
               "repair` rewrites the index from the packs")
        self.index.drop_entry(copy.digest, copy.pack_id, copy.offset, copy.length, why)
        return why

    def pack_trailer(self, pack_id: str) -> list[tuple[bytes, int, int]]:
        """The (digest, offset, length) entries of a pack's trailer, read from its end;
        `ChunkCorrupt` if it is damaged."""
        where = f"pack {pack_id}"
        size = self.backend.info(layout.pack(pack_id)).size
        end = self.read_range(pack_id, max(0, size - 8), min(8, size), where).rjust(8, b"\0")
        tail_length = min(size, trailer_length(end))
        tail = self.read_range(pack_id, size - tail_length, tail_length, where)
        return read_trailer(tail, where, pack_size=size, pack_id=pack_id,
                            trailer_key=self.codec.trailer_key)

    # ------------------------------------------------------------------ reading objects

    def read_object(self, name: bytes, kind: int, label: str,
                    found: list[DamagedCopy] | None = None) -> bytes:
        """An object's plain bytes, checked against its name. A damaged copy is put in
        quarantine (and appended to ``found``), and the next intact copy is read instead;
        with none left, `ChunkCorrupt`."""
        damage: list[str] = []
        while True:
            loc = self.index.get(name)
            if loc is None:
                if damage:
                    error = ObjectAuthenticationFailed if self.codec.encrypted else ChunkCorrupt
                    raise error(f"{'; '.join(damage)}; no intact copy is left. {_LOST_ADVICE}")
                unauthentic = sorted(self.index.unauthentic_files)
                if unauthentic and not self.index.is_known(name):
                    raise IndexAuthenticationFailed(
                        f"{label}: {self.index.why_missing(name)}, and index file "
                        f"{', '.join(unauthentic)} fails authentication (it may be the one "
                        f"that names it): {AUTH_FAILED}")
                raise ObjectMissing(f"{label}: {self.index.why_missing(name)}")
            data = self.read_range(loc.pack_id, loc.offset, loc.length, label)
            try:
                return self.codec.open(data, kind, name, f"{label} in pack {loc.pack_id}")
            except ChunkCorrupt as exc:
                damage.append(self.damaged(name, kind, loc, exc, found))

    def damaged(self, name: bytes, kind: int, loc: Location, exc: ChunkCorrupt,
                found: list[DamagedCopy] | None) -> str:
        """Put a copy found damaged in quarantine; -> what to say about it."""
        copy = self.set_aside(DamagedCopy(name, kind, loc.pack_id, loc.offset, loc.length,
                                          exc.message))
        if copy is None:
            return f"{exc.message}: {self.index.damaged_entries[-1][1]}"
        if found is not None:
            found.append(copy)
        failure = copy.not_recorded
        return (f"{exc.message} (at offset {loc.offset}; "
                + (f"not put in quarantine: {failure})" if failure else "put in quarantine)"))

    def copy_damage(self, name: bytes, loc: Location,
                    envelope: bytes | memoryview | None = None) -> DamagedCopy | None:
        """The copy of ``name`` at ``loc`` read whole (or its ``envelope``, read already) and
        rehashed: None if it is intact, else what is wrong with it (not yet set aside). Its
        kind is what its header says (a damaged header: a chunk)."""
        if envelope is None:
            envelope = self.read_range(loc.pack_id, loc.offset, loc.length,
                                       f"object {name.hex()}")
        kind = envelope[5] if len(envelope) > 5 and envelope[5] in KIND_NAMES else KIND_CHUNK
        try:
            self.codec.open(envelope, kind, name,
                            f"{KIND_NAMES[kind]} {name.hex()} in pack {loc.pack_id}")
        except ChunkCorrupt as exc:
            return DamagedCopy(name, kind, loc.pack_id, loc.offset, loc.length, exc.message)
        return None

    def read_chunk(self, name: bytes, where: str = "",
                   found: list[DamagedCopy] | None = None) -> bytes:
        """A chunk's plain bytes, checked against its digest."""
        label = f"chunk {name.hex()}" + (f" ({where})" if where else "")
        return self.read_object(name, KIND_CHUNK, label, found)

    def read_page(self, hexname: str, point_id: str = "", kind: int = KIND_PAGE) -> bytes:
        """A page (or page table) of a restore point, checked against its name. The last
        pages read are kept: an object never changes (its name is its hash), so a backup that
        reads its base's pages several times fetches each once."""
        key = (bytes.fromhex(hexname), kind)
        with self._pages_lock:
            if key in self._pages:
                self._pages.move_to_end(key)
                return self._pages[key]
        label = "page" if kind == KIND_PAGE else "page table"
        where = f"{label} {hexname}" + (f" of restore point {point_id}" if point_id else "")
        plain = self.read_object(key[0], kind, where)
        self._keep_page(key, plain)
        return plain

    def _keep_page(self, key: tuple[bytes, int], plain: bytes) -> None:
        with self._pages_lock:
            self._pages[key] = plain
            while len(self._pages) > PAGES_KEPT:
                self._pages.popitem(last=False)

    def pages_of(self, point: RestorePoint) -> list[str]:
        """The point's page digests, read from its page tables (each must list as many as
        its share of the disk needs)."""
        pages: list[str] = []
        for table_no, hexname in enumerate(point.tables):
            plain = self.read_page(hexname, point.id, KIND_TABLE)
            _check_width(plain, point.table_width(table_no), f"page table {hexname}", "pages",
                         point)
            pages += [plain[i : i + 32].hex() for i in range(0, len(plain), 32)]
        return pages

    def point_page(self, point: RestorePoint, page_no: int,
                   pages: list[str] | None = None) -> bytes:
        """Page ``page_no`` of ``point`` (``pages``: its page digests, if read already),
        checked to list the chunk digests its part of the disk needs: a page of another width
        would put digests in the wrong places, or none where a chunk is."""
        hexname = (self.pages_of(point) if pages is None else pages)[page_no]
        plain = self.read_page(hexname, point.id)
        _check_width(plain, point.page_width(page_no), f"page {hexname}", "chunks", point)
        return plain

    def point_pages(self, point: RestorePoint, page_nos: Iterable[int]
                    ) -> Iterator[tuple[int, bytes]]:
        """(page number, page) of pages ``page_nos`` of ``point`` in ascending order
        (`point_page`), a bounded number held. On object storage each read is a round trip:
        pages that lie together in a pack (a backup stores its new pages one after the other)
        are read together, the others several at once."""
        pages = self.pages_of(point)
        wanted = sorted(set(page_nos))
        window = 16 if self.backend.remote else 2
        for start in range(0, len(wanted), PAGES_KEPT // 2):
            batch = wanted[start : start + PAGES_KEPT // 2]
            self._read_pages_together([pages[n] for n in batch])
            reads = read_ahead(batch, lambda n: self.point_page(point, n, pages), window=window,
                               executor=self.io_pool)
            yield from zip(batch, reads, strict=True)

    def _read_pages_together(self, hexnames: list[str]) -> None:
        """Keep the pages named that lie together in a pack, each run of them read at once.
        Only a speed-up: a page that fails to read or open here is left to `read_page`, which
        reads it alone and says what is wrong with it."""
        names = {bytes.fromhex(h) for h in hexnames}
        with self._pages_lock:
            names -= {name for name, kind in self._pages if kind == KIND_PAGE}
        placed = sorted(names, key=lambda name: place(self, name))
        runs = [run for run in ranged_runs(self, ((0, name) for name in placed)) if len(run) > 1]
        for _ in self.io_pool.map(self._read_page_run, runs):
            pass

    def _read_page_run(self, run: Run) -> None:
        try:
            envelopes = list(read_run(self, run, "pages"))
        except (RepositoryError, BackendError):
            return
        for _, name, _, envelope in envelopes:
            try:
                plain = self.codec.open(envelope, KIND_PAGE, name, f"page {name.hex()}")
            except RepositoryError:
                continue
            self._keep_page((name, KIND_PAGE), plain)

    def page_entries(self, point: RestorePoint) -> Iterator[tuple[int, bytes]]:
        """(chunk index, digest) for every chunk of the point; ZERO_DIGEST for holes."""
        chunks = -(-point.size_bytes // point.chunk_size)
        for page_no, plain in self.point_pages(point, range(-(-chunks // point.page_chunks))):
            base = page_no * point.page_chunks
            for slot in range(min(point.page_chunks, chunks - base)):
                yield base + slot, plain[slot * 32 : slot * 32 + 32]

    def chunk_digests(self, point_id: str, indexes: Iterable[int]) -> dict[int, bytes | None]:
        """The digests of chunks ``indexes`` of a point (None: a hole)."""
        point = self.point(point_id)
        wanted = set(indexes)
        by_page: dict[int, list[int]] = {}
        for index in wanted:
            by_page.setdefault(index // point.page_chunks, []).append(index)
        out: dict[int, bytes | None] = {}
        for page_no, plain in self.point_pages(point, by_page):
            for index in by_page[page_no]:
                slot = index % point.page_chunks
                name = plain[slot * 32 : slot * 32 + 32]
                out[index] = None if name == ZERO_DIGEST else name
        return out

    # ------------------------------------------------------------------ manifests

    def manifest_files(self) -> list[str]:
        """``<point-id>.json`` of every manifest."""
        return [info.name.removeprefix(layout.POINTS) for info in self.backend.list(
            layout.POINTS) if layout.point_id_of(info.name) is not None]

    def load_manifest(self, filename: str) -> RestorePoint:
        """The manifest ``points/<filename>``, checked; `ManifestCorrupt` if it is not.
        (A manifest that is gone: FileNotFoundError, as before there was a backend.)"""
        name = layout.POINTS + filename
        try:
            data = self.backend.load(name)
        except ObjectNotFound:
            raise FileNotFoundError(name) from None
        data = self.codec.open_file(KIND_MANIFEST, name, data, name,
                                    ManifestAuthenticationFailed)
        point = RestorePoint.from_bytes(data, name, filename.removesuffix(".json"))
        if (point.chunk_size, point.page_chunks) != (self.chunk_size, self.page_chunks):
            raise ManifestCorrupt(
                f"{name}: manifest is damaged: its chunk size {point.chunk_size} and "
                f"{point.page_chunks} chunks a page are not the repository's "
                f"({self.chunk_size}, {self.page_chunks})")
        return point

    def write_manifest(self, point: RestorePoint, lease: Lease | None = None,
                       consequence: str = "nothing was published") -> None:
        """Publish a manifest (create-only). With ``lease``: only while it is valid, and a
        manifest that reached the store too late to be covered by it is deleted again."""
        name = layout.manifest(point.id)
        if lease is not None:
            lease.check(f"publish restore point {point.id}")
        sent = boot_clock()
        with self.writing(f"writing the manifest of {point.id}", consequence):
            self.backend.create(name, self.codec.seal_file(KIND_MANIFEST, name,
                                                           point.to_bytes()))
        if lease is not None and not lease.deadline_ok(sent):
            with contextlib.suppress(BackendError, OSError):
                self.backend.delete(name)
            lease.check(f"publish restore point {point.id}")
            raise LeaseLost(f"restore point {point.id} reached the repository too late to be "
                            "covered by this process's lease, and was withdrawn; nothing was "
                            "published")

    def delete_manifest(self, point_id: str) -> None:
        self.backend.delete(layout.manifest(point_id))

    def scan_points(self) -> tuple[list[RestorePoint], list[tuple[str, str]]]:
        """-> (intact restore points oldest first, with their newest verify state;
        [(file name, what is wrong)])."""
        good, damaged = self.scan_points_detailed()
        return good, [(filename, exc.message) for filename, exc in damaged]

    def scan_points_detailed(self) -> tuple[list[RestorePoint],
                                            list[tuple[str, ManifestCorrupt]]]:
        """`scan_points`, with the error of each damaged manifest."""
        files = sorted(self.manifest_files())
        states = self.verify_states()
        good: list[RestorePoint] = []
        damaged: list[tuple[str, ManifestCorrupt]] = []
        for filename, result in zip(files, self.read_all(self._load_or_error, files),
                                    strict=True):
            if isinstance(result, RestorePoint):
                good.append(_with_state(result, states.get(result.id)))
            elif isinstance(result, ManifestCorrupt):
                damaged.append((filename, result))
        return good, damaged

    def read_point(self, filename: str, verify_records: Mapping[str, list[str]]
                   ) -> RestorePoint | ManifestCorrupt | None:
        """The manifest ``points/<filename>``, checked, with the state of its newest verify
        record named in ``verify_records`` (as `verify_records` gives them); the error that
        says it is damaged; or None: it was forgotten since it was listed."""
        result = self._load_or_error(filename)
        if not isinstance(result, RestorePoint):
            return result
        names = verify_records.get(result.id)
        return _with_state(result, self._read_verify(result.id, names[-1]) if names else None)

    def _load_or_error(self, filename: str) -> RestorePoint | ManifestCorrupt | None:
        try:
            return self.load_manifest(filename)
        except ManifestCorrupt as exc:
            return exc
        except FileNotFoundError:
            return None  # forgotten since the listing

    def points(self, disk_id: str | None = None) -> list[RestorePoint]:
        """Restore points whose manifests are intact, oldest first (`check` reports the
        others)."""
        return [p for p in self.scan_points()[0] if disk_id is None or p.disk_id == disk_id]

    def point(self, point_id: str) -> RestorePoint:
        """A restore point, its manifest checked (checksum, ID = name), with its newest
        verify state."""
        try:
            name = layout.manifest(point_id)
            if layout.point_id_of(name) is None:
                _bad_point_id(point_id)
            self.backend.info(name)
        except InvalidObjectName:
            _bad_point_id(point_id)
        except ObjectNotFound:
            raise PointNotFound(f"no restore point {point_id!r} in {self.location}") from None
        point = self.load_manifest(f"{point_id}.json")
        return _with_state(point, self.verify_state(point_id))

    # ------------------------------------------------------------------ leases

    def disk_lease(self, disk_id: str) -> Lease:
        """The lease of a backup of ``disk_id``: `RepositoryBusy` while another process
        backs it up."""
        named = self.codec.lease_name(disk_id)  # encrypted: a keyed hash of the disk ID
        return self._lease(layout.disk_lease(named), "backup", named,
                           f"back up disk {disk_id}")

    def writer_lease(self, what: str) -> Lease:
        """The lease of a writer that backs up no disk (chunks stored again by a heal)."""
        return self._lease(layout.writer_lease(secrets.token_hex(8)), "writer", None, what)

    def record_base(self, lease: Lease, point_id: str) -> None:
        """Name the base point of a running incremental in its lease: no forget removes it."""
        with self.writing(f"recording the base {point_id} in the lease {lease.name}"):
            lease.renew(base=point_id)

    def _lease(self, name: str, purpose: str, disk_id: str | None, what: str) -> Lease:
        host = None
        if self.backend.host_locks:  # a prune that runs with no writer at all excludes us
            host = self.backend.host_lock(exclusive=False, wait=True)
        try:
            with self.writing(f"taking the lease {name}"):
                lease = Lease.acquire(self.backend, name, purpose=purpose, timing=self.timing,
                                      disk_id=disk_id, what=what)
        except BaseException:
            if host is not None:
                host.release()
            raise
        if host is not None:
            lease.on_release(host.release)
        return lease

    # ------------------------------------------------------------------ verify records

    def record_verify(self, point_id: str, state: str) -> None:
        """Record a verify state: a new create-only record; the newest one counts."""
        if state not in VERIFY_STATES:
            raise InvalidArgument(f"verify state {state!r}")
        body: dict[str, Any] = {"format": VERIFY_FORMAT, "version": 1, "point": point_id,
                                "state": state, "recorded_at": datetime.now(UTC).isoformat()}
        body["checksum"] = _checksum(body)
        name = layout.verify_record(point_id, stamp())
        data = self.codec.seal_file(KIND_VERIFY, name, (json.dumps(body, indent=1) + "\n")
                                    .encode())
        with self.writing(f"recording the verify state of {point_id}",
                          f"the verify state of {point_id} was not recorded"):
            self.backend.create(name, data)

    def verify_records(self) -> dict[str, list[str]]:
        """point id -> its verify records' names, oldest first."""
        out: dict[str, list[str]] = {}
        for info in self.backend.list(layout.VERIFY):
            parsed = layout.verify_record_of(info.name)
            if parsed is not None:
                out.setdefault(parsed[0], []).append(info.name)
        return out

    def verify_states(self) -> dict[str, str]:
        """point id -> the state its newest verify record gives."""
        newest = {pid: names[-1] for pid, names in self.verify_records().items()}
        states = self.read_all(lambda item: self._read_verify(*item), list(newest.items()))
        return dict(zip(newest, states, strict=True))

    def verify_state(self, point_id: str) -> str | None:
        names = [info.name for info in self.backend.list(f"{layout.VERIFY}{point_id}/")
                 if layout.verify_record_of(info.name) is not None]
        return self._read_verify(point_id, names[-1]) if names else None

    def _read_verify(self, point_id: str, name: str) -> str:
        """A record that does not decode, or names another point, counts as "failed": never
        a base until a new verify says otherwise (`check` reports it)."""
        try:
            body = self._verify_body(name)
            stored = body.pop("checksum")
            if stored != _checksum(body) or body["point"] != point_id \
                    or body["state"] not in VERIFY_STATES:
                return "failed"
            return str(body["state"])
        except ObjectNotFound:
            return "unverified"
        except (ValueError, KeyError, TypeError, AttributeError, AuthenticationFailed):
            return "failed"

    def _verify_body(self, name: str) -> Any:
        data = self.backend.load(name)
        return json.loads(self.codec.open_file(KIND_VERIFY, name, data, name))

    def damaged_verify_records(self) -> list[str]:
        bad = []
        for point_id, names in self.verify_records().items():
            name = names[-1]
            try:
                body = self._verify_body(name)
                stored = body.pop("checksum")
                if stored != _checksum(body) or body["point"] != point_id \
                        or body["state"] not in VERIFY_STATES:
                    bad.append(name)
            except ObjectNotFound:
                continue
            except (ValueError, KeyError, TypeError, AttributeError, AuthenticationFailed):
                bad.append(name)
        return bad


def _check_width(plain: bytes, width: int, what: str, unit: str, point: RestorePoint) -> None:
    """A page table or page of ``point`` lists the ``width`` digests its part of the disk
    needs: one of another size is the object of another point (the manifest names the wrong
    one), and restoring from it would leave part of the disk zeros."""
    if len(plain) != 32 * width:
        raise ManifestCorrupt(
            f"{what} of restore point {point.id} lists {len(plain) // 32} {unit}, but its part "
            f"of a disk of {point.size_bytes} bytes needs {width}: the manifest names the "
            "wrong object, so the point cannot be restored")


def condemned_list(data: bytes) -> frozenset[str]:
    """The packs a ``gc/<run>.condemned.json`` names; ValueError if it is damaged (not JSON,
    or ``packs`` is not a list of pack IDs)."""
    body = json.loads(data)
    packs = body.get("packs") if isinstance(body, dict) else None
    if type(packs) is not list or not all(layout.is_pack_id(p) for p in packs):
        raise ValueError("not a list of pack IDs")
    return frozenset(packs)


def writers_list(data: bytes) -> tuple[tuple[str, str], ...]:
    """The (lease name, owner) pairs a ``gc/<run>.writers.json`` names; ValueError if it is
    damaged."""
    body = json.loads(data)
    writers = body.get("writers") if isinstance(body, dict) else None
    if type(writers) is not list or not all(
            type(w) is list and len(w) == 2 and layout.is_lease_name(w[0])
            and type(w[1]) is str for w in writers):
        raise ValueError("not a list of writers")
    return tuple((name, owner) for name, owner in writers)


def _checksum(body: dict[str, Any]) -> str:
    return blake3(json.dumps(body, sort_keys=True, separators=(",", ":"),
                             ensure_ascii=True).encode()).hexdigest()


def _with_state(point: RestorePoint, state: str | None) -> RestorePoint:
    return point if state is None or state == point.verify_state else \
        point.with_verify_state(state)


def _bad_point_id(point_id: str) -> NoReturn:
    raise InvalidArgument(f"invalid restore point id {point_id!r}")

