"""The repository: a local directory of packs, index files, pages and manifests.

All file I/O goes through a `FileIO` (blocktrail.fileio), so tests can fail any operation.
Checking, repairing and pruning live in their own modules (check.py, repair.py, prune.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from blocktrail.errors import InvalidArgument, NoSpace, UnsupportedFormat, is_no_space
from blocktrail.fileio import FileHandle, FileIO, OsFileIO, start_writeback
from blocktrail.pipeline import read_ahead
from blocktrail.repo import index as index_file
from blocktrail.repo import quarantine
from blocktrail.repo.errors import (
    ChunkCorrupt,
    ManifestCorrupt,
    ObjectMissing,
    PointNotFound,
    RepositoryError,
    RepositoryExists,
    RepositoryNoSpace,
    RepositoryNotFound,
)
from blocktrail.repo.index import ChunkIndex
from blocktrail.repo.locks import RepoLock
from blocktrail.repo.manifest import RestorePoint
from blocktrail.repo.objects import (
    KIND_CHUNK,
    KIND_PAGE,
    KIND_TABLE,
    ZERO_DIGEST,
    open_envelope,
    seal,
)
from blocktrail.repo.packs import Location
from blocktrail.repo.quarantine import CopyKey, DamagedCopy
from blocktrail.repo.retention import RetentionPolicy, points_to_keep
from blocktrail.repo.sink import PackSink
from blocktrail.repo.writer import PointWriter

if TYPE_CHECKING:
    from blocktrail.repo.check import CheckReport
    from blocktrail.repo.prune import PruneReport
    from blocktrail.repo.repair import RepairReport

FORMAT = "blocktrail-repository"
VERSION = 1
CHUNK_SIZE = 64 * 1024
PAGE_CHUNKS = 1024
WRITEBACK_BYTES = 64 << 20
SUBDIRECTORIES = ("packs", "index", "points", "locks", quarantine.DIRECTORY)
Progress = Callable[[int, int], None]


class Repository:
    """A repository of restore points. Safe for concurrent writers (processes or threads);
    `prune` and `repair` wait for none and refuse while any writer is active."""

    def __init__(self, path: str, fileio: FileIO, config: dict[str, Any]) -> None:
        self.path = path
        self.fio = fileio
        self.chunk_size = int(config["chunk_size"])
        self.page_chunks = int(config["page_chunks"])
        self.repo_id = str(config["repo_id"])
        self._index: ChunkIndex | None = None
        self._index_lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2),
                                       thread_name_prefix="blocktrail-repo")
        self._handles: dict[str, FileHandle] = {}
        self._handles_lock = threading.Lock()
        self._quarantine_lock = threading.Lock()  # restore threads may find the same copy

    # ------------------------------------------------------------------ open / init

    @classmethod
    def init(cls, path: str | os.PathLike[str], fileio: FileIO | None = None) -> Repository:
        path, fio = os.fspath(path), fileio or OsFileIO()
        if fio.exists(os.path.join(path, "config.json")):
            raise RepositoryExists(f"{path} already holds a repository")
        config = {"format": FORMAT, "version": VERSION, "repo_id": uuid.uuid4().hex,
                  "chunk_size": CHUNK_SIZE, "page_chunks": PAGE_CHUNKS,
                  "created_at": datetime.now(UTC).isoformat()}
        repo = cls(path, fio, config)
        with repo.writing("creating it", "no repository was created"):
            for sub in SUBDIRECTORIES:
                fio.makedirs(os.path.join(path, sub))
            repo.lock(exclusive=False, what="initialise").release()  # the lock file exists
            fio.replace_atomic(os.path.join(path, "config.json"),
                               (json.dumps(config, indent=1) + "\n").encode())
            fio.fsync_dir(os.path.dirname(os.path.abspath(path)))
        return repo

    @classmethod
    def open(cls, path: str | os.PathLike[str], fileio: FileIO | None = None) -> Repository:
        path, fio = os.fspath(path), fileio or OsFileIO()
        config_path = os.path.join(path, "config.json")
        if not fio.exists(config_path):
            raise RepositoryNotFound(f"{path} is not a blocktrail repository (no config.json)")
        try:
            config = json.loads(fio.read_file(config_path))
        except ValueError as exc:
            raise RepositoryError(f"{config_path}: damaged ({exc})") from exc
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise UnsupportedFormat(f"{path}: not a blocktrail repository")
        if not isinstance(config.get("version"), int) or config["version"] > VERSION:
            raise UnsupportedFormat(f"{path}: repository version {config.get('version')} is "
                                    f"newer than this blocktrail ({VERSION})")
        return cls(path, fio, config)

    def close(self) -> None:
        self.close_handles()
        self.pool.shutdown(wait=True)

    def close_handles(self) -> None:
        with self._handles_lock:
            for handle in self._handles.values():
                handle.close()
            self._handles.clear()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lock(self, *, exclusive: bool, what: str) -> RepoLock:
        """The repository lock: shared by writers, exclusive for prune and repair."""
        return RepoLock(self.join("locks", "repo.lock"), exclusive=exclusive, what=what)

    # ------------------------------------------------------------------ paths and raw files

    def join(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def pack_path(self, pack_id: str) -> str:
        return self.join("packs", pack_id[:2], f"{pack_id}.pack")

    def list_files(self, sub: str, suffix: str) -> list[str]:
        """Names in ``sub`` ending in ``suffix``; for packs, ``<pp>/<pack-id>.pack``."""
        root = self.join(sub)
        if not self.fio.exists(root):
            return []
        names = self.fio.listdir(root)
        if sub == "packs":
            return sorted(os.path.join(d, n) for d in names if len(d) == 2
                          for n in self.fio.listdir(os.path.join(root, d)) if n.endswith(suffix))
        return [n for n in names if n.endswith(suffix)]

    def pack_ids(self) -> set[str]:
        """Every pack file there is (one listing of the pack directories)."""
        return {os.path.basename(p).removesuffix(".pack") for p in self.list_files("packs",
                                                                                     ".pack")}

    def temp_files(self) -> list[str]:
        """Left-over temporary files (``*.tmp``) of writes that did not finish, relative to
        the repository. Only a holder of the exclusive lock may delete them."""
        found = [os.path.join("packs", p) for p in self.list_files("packs", ".tmp")]
        for sub in ("index", "points", quarantine.DIRECTORY):
            found += [os.path.join(sub, n) for n in self.list_files(sub, ".tmp")]
        return found + (["config.json.tmp"] if self.fio.exists(self.join("config.json.tmp"))
                        else [])

    def delete_temp_files(self) -> int:
        """Delete the temporary files of writes that never finished (a killed backup's half
        pack). Only under the exclusive lock: then nobody is still writing one. -> how many."""
        deleted = 0
        for rel in self.temp_files():
            with contextlib.suppress(FileNotFoundError):
                self.fio.unlink(self.join(rel))
                deleted += 1
        return deleted

    @contextlib.contextmanager
    def writing(self, what: str, consequence: str = "nothing was published") -> Iterator[None]:
        """A full file system (or quota) while writing becomes `RepositoryNoSpace`."""
        try:
            yield
        except OSError as exc:
            if not is_no_space(exc):
                raise
            raise RepositoryNoSpace(
                f"the file system of repository {self.path} is full ({what}: "
                f"{exc.strerror or exc}): free space, e.g. `blocktrail forget {self.path} "
                f"--keep-last N --prune`, and retry; {consequence}") from exc

    def write_pack(self, pack_id: str, data: bytes | bytearray,
                   consequence: str = "nothing was published") -> None:
        path = self.pack_path(pack_id)
        with self.writing(f"writing pack {pack_id}", consequence):
            self.fio.makedirs(os.path.dirname(path))
            self.fio.replace_atomic(path, data)

    def delete_pack(self, pack_id: str) -> int:
        """Delete a pack file if it exists; -> the bytes it held."""
        path = self.pack_path(pack_id)
        try:
            size = self.fio.seal(path)[0]
        except FileNotFoundError:
            return 0
        self.fio.unlink(path)
        return size

    def write_index(self, name: str, data: bytes,
                    consequence: str = "nothing was published") -> None:
        with self.writing(f"writing index file {name}", consequence):
            self.fio.replace_atomic(self.join("index", name), data)

    def index_file_exists(self, name: str) -> bool:
        return self.fio.exists(self.join("index", name))

    def write_manifest(self, point: RestorePoint,
                       consequence: str = "nothing was published") -> None:
        with self.writing(f"writing the manifest of {point.id}", consequence):
            self.fio.replace_atomic(self.join("points", f"{point.id}.json"), point.to_bytes())

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
        """Read order: the pack listing and the quarantine first, then the index files, so
        an index entry is used only when its pack was seen to exist."""
        loaded = ChunkIndex(self.pack_ids(), self.quarantined())
        for name in self.list_files("index", ".idx"):
            try:
                data = self.fio.read_file(self.join("index", name))
            except FileNotFoundError:
                continue  # replaced by a prune or repair since the listing
            try:
                loaded.add_file(index_file.decode(data, f"index/{name}"))
            except RepositoryError as exc:
                loaded.damaged_files.append((name, exc.message))
        return loaded

    def has_chunk(self, name: bytes) -> bool:
        return name in self.index

    def add_locations(self, locations: dict[bytes, Location]) -> None:
        self.index.add(locations)

    def lost_objects(self) -> frozenset[bytes]:
        """Objects an index file names of which no usable copy is left (damaged, quarantined
        or their pack gone): a backup stores them again when its source still has them."""
        return self.index.lost()

    # ------------------------------------------------------------------ quarantine

    def quarantined(self) -> set[CopyKey]:
        keys = (quarantine.parse_record_name(n)
                for n in self.list_files(quarantine.DIRECTORY, ".json"))
        return {key for key in keys if key is not None}

    def quarantine(self, copy: DamagedCopy) -> str | None:
        """Record ``copy`` as damaged, durably and create-only; -> None, or why the record
        could not be written (the copy is set aside in memory all the same)."""
        path = self.join(quarantine.DIRECTORY, quarantine.record_name(copy.key))
        try:
            with self._quarantine_lock:
                if not self.fio.exists(path):
                    self.fio.makedirs(self.join(quarantine.DIRECTORY))
                    self.fio.replace_atomic(path, quarantine.record_bytes(copy))
        except OSError as exc:
            return f"recording it in {quarantine.DIRECTORY}/ failed: {exc}"
        return None

    def release_quarantine(self, key: CopyKey) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fio.unlink(self.join(quarantine.DIRECTORY, quarantine.record_name(key)))

    # ------------------------------------------------------------------ reading

    def points(self, disk_id: str | None = None) -> list[RestorePoint]:
        """Restore points whose manifests are intact, oldest first (`check` reports the
        others; `damaged_manifests` names them)."""
        return [p for p in self.scan_points()[0] if disk_id is None or p.disk_id == disk_id]

    def scan_points(self) -> tuple[list[RestorePoint], list[tuple[str, str]]]:
        """-> (intact restore points oldest first, [(file name, what is wrong)])."""
        good: list[RestorePoint] = []
        damaged: list[tuple[str, str]] = []
        for name in sorted(self.list_files("points", ".json")):
            try:
                good.append(self.load_manifest(name))
            except ManifestCorrupt as exc:
                damaged.append((name, exc.message))
            except FileNotFoundError:
                continue  # forgotten since the listing
        return good, damaged

    def load_manifest(self, filename: str) -> RestorePoint:
        """The manifest ``points/<filename>``, checked; `ManifestCorrupt` if it is not."""
        return RestorePoint.from_bytes(self.fio.read_file(self.join("points", filename)),
                                       f"points/{filename}", filename.removesuffix(".json"))

    def point(self, point_id: str) -> RestorePoint:
        """A restore point, its manifest checked (checksum, ID = file name)."""
        if "/" in point_id or not point_id or point_id.startswith("."):
            raise InvalidArgument(f"invalid restore point id {point_id!r}")
        filename = f"{point_id}.json"
        if not self.fio.exists(self.join("points", filename)):
            raise PointNotFound(f"no restore point {point_id!r} in {self.path}")
        return self.load_manifest(filename)

    def read_page(self, hexname: str, point_id: str = "", kind: int = KIND_PAGE) -> bytes:
        """A page (or page table) of a restore point, checked against its name."""
        label = "page" if kind == KIND_PAGE else "page table"
        where = f"{label} {hexname}" + (f" of restore point {point_id}" if point_id else "")
        return self.read_object(bytes.fromhex(hexname), kind, where)

    def pages_of(self, point: RestorePoint) -> list[str]:
        """The point's page digests, read from its page tables."""
        pages: list[str] = []
        for hexname in point.tables:
            plain = self.read_page(hexname, point.id, KIND_TABLE)
            pages += [plain[i : i + 32].hex() for i in range(0, len(plain), 32)]
        return pages

    def page_entries(self, point: RestorePoint) -> Iterator[tuple[int, bytes]]:
        """(chunk index, digest) for every chunk of the point; ZERO_DIGEST for holes."""
        chunks = -(-point.size_bytes // point.chunk_size)
        for page_no, hexname in enumerate(self.pages_of(point)):
            plain = self.read_page(hexname, point.id)
            base = page_no * point.page_chunks
            for slot in range(min(point.page_chunks, chunks - base)):
                yield base + slot, plain[slot * 32 : slot * 32 + 32]

    def chunk_digests(self, point_id: str, indexes: Iterable[int]) -> dict[int, bytes | None]:
        point = self.point(point_id)
        wanted = set(indexes)
        out: dict[int, bytes | None] = {}
        pages = self.pages_of(point)
        for page_no in sorted({i // point.page_chunks for i in wanted}):
            plain = self.read_page(pages[page_no], point.id)
            for index in [i for i in wanted if i // point.page_chunks == page_no]:
                slot = index % point.page_chunks
                name = plain[slot * 32 : slot * 32 + 32]
                out[index] = None if name == ZERO_DIGEST else name
        return out

    def read_chunk(self, name: bytes, where: str = "",
                   found: list[DamagedCopy] | None = None) -> bytes:
        """A chunk's plain bytes, checked against its digest."""
        label = f"chunk {name.hex()}" + (f" ({where})" if where else "")
        return self.read_object(name, KIND_CHUNK, label, found)

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
                    raise ChunkCorrupt(f"{'; '.join(damage)}; no intact copy is left. "
                                       f"{_LOST_ADVICE}")
                raise ObjectMissing(f"{label}: {self.index.why_missing(name)}")
            data = self._pread(loc, label)
            try:
                return open_envelope(data, kind, name, f"{label} in pack {loc.pack_id}")
            except ChunkCorrupt as exc:
                copy = DamagedCopy(name, kind, loc.pack_id, loc.offset, loc.length, exc.message)
                failure = self.set_aside(copy)
                if found is not None:
                    found.append(copy)
                damage.append(f"{exc.message} (at offset {loc.offset}; put in quarantine"
                              + (f", but {failure})" if failure else ")"))

    def set_aside(self, copy: DamagedCopy) -> str | None:
        """Stop using a damaged copy, now and durably; -> None, or why the record failed."""
        failure = self.quarantine(copy)
        self.index.drop(copy.digest, copy.pack_id, copy.offset,
                        f"its only copy (pack {copy.pack_id}, offset {copy.offset}) is damaged "
                        "and in quarantine")
        return failure

    def _pread(self, loc: Location, label: str) -> bytes:
        with self._handles_lock:  # reads run on several threads
            handle = self._handles.get(loc.pack_id)
            if handle is None:
                try:
                    handle = self.fio.open(self.pack_path(loc.pack_id))
                except FileNotFoundError:
                    raise ObjectMissing(f"{label}: pack {loc.pack_id} is missing") from None
                self._handles[loc.pack_id] = handle
        return handle.pread(loc.length, loc.offset)

    # ------------------------------------------------------------------ writing

    def begin(self, disk_id: str, size_bytes: int, parent: str | None) -> PointWriter:
        """Start a restore point (an incremental when ``parent`` is given)."""
        lock = self.lock(exclusive=False, what="back up")
        try:
            self.reload_index()  # a prune may have run since it was read: dedup against the truth
            parent_point = self.point(parent) if parent else None
        except BaseException:
            lock.release()
            raise
        return PointWriter(self, disk_id, size_bytes, parent_point, lock, self.pool)

    def store_chunks(self, chunks: Iterable[bytes]) -> int:
        """Store chunks again whose stored copies were lost (damaged, in quarantine): a pack
        and an index file, no restore point. -> bytes stored."""
        lock = self.lock(exclusive=False, what="store chunks")
        try:
            self.reload_index()
            sink = PackSink(self, self.has_chunk, consequence="nothing was stored again")
            try:
                for data in chunks:
                    if data.count(0) != len(data):
                        name, envelope = seal(KIND_CHUNK, data)
                        sink.add(name, envelope, len(data))
                sink.publish()
            finally:
                sink.close()
            return sink.bytes_stored
        finally:
            lock.release()

    def set_verify_state(self, point_id: str, state: str) -> RestorePoint:
        point = self.point(point_id).with_verify_state(state)
        self.write_manifest(point, f"the verify state of {point_id} was not recorded")
        return point

    # ------------------------------------------------------------------ restore

    def restore(self, point_id: str, target: str, progress: Progress | None = None) -> int:
        """Write the point's disk image to ``target`` (sparse). Every chunk is checked; on
        any damage nothing is left at ``target``. -> bytes of data written."""
        point = self.point(point_id)
        partial = f"{target}.partial-{secrets.token_hex(4)}"
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if is_no_space(exc):
                raise _target_full(target, exc) from exc
            raise
        try:
            written = self._restore_into(fd, point, progress)
        except BaseException as exc:
            os.close(fd)
            os.unlink(partial)
            if isinstance(exc, OSError) and is_no_space(exc):
                raise _target_full(target, exc) from exc
            raise
        os.close(fd)
        os.replace(partial, target)
        return written

    def _restore_into(self, fd: int, point: RestorePoint, progress: Progress | None) -> int:
        os.ftruncate(fd, point.size_bytes)
        entries = [(i, n) for i, n in self.page_entries(point) if n != ZERO_DIGEST]
        where = f"restore point {point.id}"
        chunk_reads = read_ahead(entries, lambda e: (e[0], self.read_chunk(e[1], where)),
                                 window=64, executor=self.pool)
        written = flushed = 0
        for done, (index, data) in enumerate(chunk_reads, 1):
            expected = min(point.chunk_size, point.size_bytes - index * point.chunk_size)
            if len(data) != expected:
                raise ChunkCorrupt(f"chunk {index} of {where} has {len(data)} bytes, "
                                   f"not {expected}")
            os.pwrite(fd, data, index * point.chunk_size)
            written += len(data)
            if written - flushed >= WRITEBACK_BYTES:  # start writing back as we go, so the
                start_writeback(fd)                   # final fsync finds little left
                flushed = written
            if progress is not None:
                progress(done, len(entries))
        os.fsync(fd)
        return written

    # ------------------------------------------------------------------ check, repair, prune

    def check(self, *, read_data: bool = False, read_data_subset_pct: float | None = None,
              seed: int | None = None) -> CheckReport:
        from blocktrail.repo.check import check_repository

        return check_repository(self, read_data=read_data,
                                read_data_subset_pct=read_data_subset_pct, seed=seed)

    def repair(self) -> RepairReport:
        from blocktrail.repo.repair import repair_repository

        return repair_repository(self)

    def forget(self, policy: RetentionPolicy, disk_id: str | None = None,
               dry_run: bool = False) -> list[RestorePoint]:
        """Delete the manifests the policy does not keep (per disk). -> the forgotten."""
        points = self.points(disk_id)
        gone: list[RestorePoint] = []
        for disk in sorted({p.disk_id for p in points}):
            mine = [p for p in points if p.disk_id == disk]
            keep = points_to_keep(mine, policy)
            gone += [p for p in mine if p.id not in keep]
        if not dry_run:
            with self.writing("forgetting restore points", "some restore points may not be "
                              "forgotten yet; run forget again"):
                for point in gone:
                    self.fio.unlink(self.join("points", f"{point.id}.json"))
                if gone:
                    self.fio.fsync_dir(self.join("points"))
        return gone

    def prune(self) -> PruneReport:
        """Delete what no manifest references. Takes the repository lock exclusively."""
        from blocktrail.repo.prune import prune_repository

        return prune_repository(self)


_LOST_ADVICE = ("The next backup of the disk stores that content again if the disk still "
                "has it; `blocktrail verify POINT --against SOURCE --heal` stores it again from "
                "the source of a restore point")


def _target_full(target: str, exc: OSError) -> NoSpace:
    return NoSpace(f"the file system of the restore target {target} is full "
                   f"({exc.strerror or exc}): free space there, or restore elsewhere, and "
                   "retry; nothing was left at the target")
