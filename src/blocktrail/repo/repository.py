"""The repository: a local directory of packs, index files, pages and manifests.

All file I/O goes through a `FileIO` (blocktrail.fileio), so tests can fail any operation.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from blocktrail.errors import InvalidArgument, UnsupportedFormat
from blocktrail.fileio import FileHandle, FileIO, OsFileIO, start_writeback
from blocktrail.pipeline import read_ahead
from blocktrail.repo import index as index_file
from blocktrail.repo.errors import (
    ChunkCorrupt,
    ManifestCorrupt,
    ObjectMissing,
    PointNotFound,
    RepositoryError,
    RepositoryExists,
    RepositoryNotFound,
)
from blocktrail.repo.locks import RepoLock
from blocktrail.repo.manifest import RestorePoint
from blocktrail.repo.objects import (
    KIND_CHUNK,
    KIND_PAGE,
    KIND_TABLE,
    ZERO_DIGEST,
    open_envelope,
)
from blocktrail.repo.packs import Location, read_trailer
from blocktrail.repo.retention import RetentionPolicy, points_to_keep
from blocktrail.repo.writer import PointWriter

FORMAT = "blocktrail-repository"
VERSION = 1
CHUNK_SIZE = 64 * 1024
PAGE_CHUNKS = 1024
WRITEBACK_BYTES = 64 << 20
Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class Problem:
    """One damaged thing, and the restore points it makes unrestorable."""

    kind: str  # "manifest" | "page" | "chunk" | "pack" | "index"
    name: str
    detail: str
    affected_points: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "detail": self.detail,
                "affected_points": list(self.affected_points)}


@dataclass(frozen=True, slots=True)
class CheckReport:
    points: int
    chunks_referenced: int
    chunks_read: int
    problems: tuple[Problem, ...]
    unreferenced_files: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def affected_points(self) -> set[str]:
        return {p for problem in self.problems for p in problem.affected_points}


@dataclass
class PruneReport:
    packs_deleted: int = 0
    index_files_replaced: int = 0
    bytes_freed: int = 0
    kept_partly_used_packs: int = 0


class Repository:
    """A repository of restore points. Safe for concurrent writers (processes or threads);
    `prune` waits for none and refuses while any writer is active."""

    def __init__(self, path: str, fileio: FileIO, config: dict[str, Any]) -> None:
        self.path = path
        self._fio = fileio
        self.chunk_size = int(config["chunk_size"])
        self.page_chunks = int(config["page_chunks"])
        self.repo_id = str(config["repo_id"])
        self._index: dict[bytes, Location] | None = None
        self._pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2),
                                        thread_name_prefix="blocktrail-repo")
        self._handles: dict[str, FileHandle] = {}
        self._handles_lock = threading.Lock()

    # ------------------------------------------------------------------ open / init

    @classmethod
    def init(cls, path: str | os.PathLike[str], fileio: FileIO | None = None) -> Repository:
        path, fio = os.fspath(path), fileio or OsFileIO()
        if fio.exists(os.path.join(path, "config.json")):
            raise RepositoryExists(f"{path} already holds a repository")
        for sub in ("packs", "index", "points", "locks"):
            fio.makedirs(os.path.join(path, sub))
        config = {"format": FORMAT, "version": VERSION, "repo_id": uuid.uuid4().hex,
                  "chunk_size": CHUNK_SIZE, "page_chunks": PAGE_CHUNKS,
                  "created_at": datetime.now(UTC).isoformat()}
        fio.replace_atomic(os.path.join(path, "config.json"),
                           (json.dumps(config, indent=1) + "\n").encode())
        fio.fsync_dir(os.path.dirname(os.path.abspath(path)))
        return cls(path, fio, config)

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
        if config.get("format") != FORMAT:
            raise UnsupportedFormat(f"{path}: not a blocktrail repository")
        if not isinstance(config.get("version"), int) or config["version"] > VERSION:
            raise UnsupportedFormat(f"{path}: repository version {config.get('version')} is "
                                    f"newer than this blocktrail ({VERSION})")
        return cls(path, fio, config)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ paths and raw files

    def _p(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def _pack_path(self, pack_id: str) -> str:
        return self._p("packs", pack_id[:2], f"{pack_id}.pack")

    def _list(self, sub: str, suffix: str) -> list[str]:
        root = self._p(sub)
        if not self._fio.exists(root):
            return []
        names = self._fio.listdir(root)
        if sub == "packs":
            return sorted(os.path.join(d, n) for d in names if len(d) == 2
                          for n in self._fio.listdir(os.path.join(root, d)) if n.endswith(suffix))
        return [n for n in names if n.endswith(suffix)]

    def write_pack(self, pack_id: str, data: bytes | bytearray) -> None:
        path = self._pack_path(pack_id)
        self._fio.makedirs(os.path.dirname(path))
        self._fio.replace_atomic(path, data)

    def write_index(self, name: str, data: bytes) -> None:
        self._fio.replace_atomic(self._p("index", name), data)

    def write_manifest(self, point: RestorePoint) -> None:
        self._fio.replace_atomic(self._p("points", f"{point.id}.json"), point.to_bytes())

    # ------------------------------------------------------------------ the chunk index

    @property
    def index(self) -> dict[bytes, Location]:
        if self._index is None:
            merged: dict[bytes, Location] = {}
            for name in self._list("index", ".idx"):
                merged.update(index_file.decode(self._fio.read_file(self._p("index", name)),
                                                name))
            self._index = merged
        return self._index

    def has_chunk(self, name: bytes) -> bool:
        return name in self.index

    def add_locations(self, locations: dict[bytes, Location]) -> None:
        self.index.update(locations)

    # ------------------------------------------------------------------ reading

    def points(self, disk_id: str | None = None) -> list[RestorePoint]:
        """Restore points whose manifests decode, oldest first (`check` reports the others)."""
        out = []
        for name in sorted(self._list("points", ".json")):
            try:
                point = self._load_point(name)
            except (ManifestCorrupt, OSError):
                continue
            if disk_id is None or point.disk_id == disk_id:
                out.append(point)
        return out

    def _load_point(self, filename: str) -> RestorePoint:
        return RestorePoint.from_bytes(self._fio.read_file(self._p("points", filename)),
                                       filename)

    def point(self, point_id: str) -> RestorePoint:
        if "/" in point_id or not point_id:
            raise InvalidArgument(f"invalid restore point id {point_id!r}")
        filename = f"{point_id}.json"
        if not self._fio.exists(self._p("points", filename)):
            raise PointNotFound(f"no restore point {point_id!r} in {self.path}")
        return self._load_point(filename)

    def read_page(self, hexname: str, point_id: str = "", kind: int = KIND_PAGE) -> bytes:
        """A page (or page table) of a restore point, checked against its name."""
        label = "page" if kind == KIND_PAGE else "page table"
        where = f"{label} {hexname}" + (f" of restore point {point_id}" if point_id else "")
        return self._read_object(bytes.fromhex(hexname), kind, where)

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

    def read_chunk(self, name: bytes, where: str = "") -> bytes:
        """A chunk's plain bytes, checked against its digest."""
        label = f"chunk {name.hex()}" + (f" ({where})" if where else "")
        return self._read_object(name, KIND_CHUNK, label)

    def _read_object(self, name: bytes, kind: int, label: str) -> bytes:
        loc = self.index.get(name)
        if loc is None:
            raise ObjectMissing(f"{label} is in no index file")
        with self._handles_lock:  # reads run on several threads
            handle = self._handles.get(loc.pack_id)
            if handle is None:
                try:
                    handle = self._fio.open(self._pack_path(loc.pack_id))
                except FileNotFoundError:
                    raise ObjectMissing(f"{label}: pack {loc.pack_id} is missing") from None
                self._handles[loc.pack_id] = handle
        data = handle.pread(loc.length, loc.offset)
        return open_envelope(data, kind, name, f"{label} in pack {loc.pack_id}")

    # ------------------------------------------------------------------ writing points

    def begin(self, disk_id: str, size_bytes: int, parent: str | None) -> PointWriter:
        """Start a restore point (an incremental when ``parent`` is given)."""
        lock = RepoLock(self._p("locks", "repo.lock"), exclusive=False, what="back up")
        self._index = None  # a prune may have run since it was read: dedup against the truth
        try:
            parent_point = self.point(parent) if parent else None
        except BaseException:
            lock.release()
            raise
        return PointWriter(self, disk_id, size_bytes, parent_point, lock, self._pool)

    def set_verify_state(self, point_id: str, state: str) -> RestorePoint:
        point = self.point(point_id).with_verify_state(state)
        self.write_manifest(point)
        return point

    # ------------------------------------------------------------------ restore

    def restore(self, point_id: str, target: str, progress: Progress | None = None) -> int:
        """Write the point's disk image to ``target`` (sparse). Every chunk is checked; on
        any damage nothing is left at ``target``. -> bytes of data written."""
        point = self.point(point_id)
        partial = f"{target}.partial-{secrets.token_hex(4)}"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        written = 0
        try:
            os.ftruncate(fd, point.size_bytes)
            entries = [(i, n) for i, n in self.page_entries(point) if n != ZERO_DIGEST]
            where = f"restore point {point.id}"
            chunk_reads = read_ahead(entries, lambda e: (e[0], self.read_chunk(e[1], where)),
                                     window=64, executor=self._pool)
            flushed = 0
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
        except BaseException:
            os.close(fd)
            os.unlink(partial)
            raise
        os.close(fd)
        os.replace(partial, target)
        return written

    # ------------------------------------------------------------------ check

    def check(self, *, read_data: bool = False, read_data_subset_pct: float | None = None,
              seed: int | None = None) -> CheckReport:
        problems: list[Problem] = []
        try:
            index = self.index
        except RepositoryError as exc:
            problems.append(Problem("index", "index/", exc.message, ()))
            index = {}
        users: dict[bytes, set[str]] = {}
        page_users: dict[str, set[str]] = {}
        good_points = []
        for filename in sorted(self._list("points", ".json")):
            try:
                point = self._load_point(filename)
            except ManifestCorrupt as exc:
                point_id = filename.removesuffix(".json")
                problems.append(Problem("manifest", filename, exc.message, (point_id,)))
                continue
            try:
                pages = self.pages_of(point)
            except RepositoryError as exc:
                problems.append(Problem("table", point.id, exc.message, (point.id,)))
                continue
            good_points.append(point)
            for hexname in pages:
                page_users.setdefault(hexname, set()).add(point.id)
        for hexname, pids in sorted(page_users.items()):
            try:
                plain = self.read_page(hexname)
            except RepositoryError as exc:
                problems.append(Problem("page", hexname, exc.message, tuple(sorted(pids))))
                continue
            for slot in range(0, len(plain), 32):
                name = plain[slot : slot + 32]
                if name != ZERO_DIGEST:
                    users.setdefault(name, set()).update(pids)
        by_pack: dict[str, list[bytes]] = {}
        for name, pids in users.items():
            loc = index.get(name)
            if loc is None:
                problems.append(Problem("chunk", name.hex(), "in no index file",
                                        tuple(sorted(pids))))
            else:
                by_pack.setdefault(loc.pack_id, []).append(name)
        packs_to_read = set(by_pack)
        if not read_data:
            packs_to_read = set()
            if read_data_subset_pct:
                rng = random.Random(seed)
                count = max(1, round(len(by_pack) * read_data_subset_pct / 100))
                packs_to_read = set(rng.sample(sorted(by_pack), min(count, len(by_pack))))
        chunks_read = 0
        for pack_id, names in sorted(by_pack.items()):
            affected = tuple(sorted({p for n in names for p in users[n]}))
            problem = self._check_pack(pack_id, names, index)
            if problem is not None:
                problems.append(Problem("pack", pack_id, problem, affected))
            elif pack_id in packs_to_read:
                chunks_read += len(names)
            if pack_id in packs_to_read:
                for name in names:
                    try:
                        self.read_chunk(name)
                    except RepositoryError as exc:
                        problems.append(Problem("chunk", name.hex(), exc.message,
                                                tuple(sorted(users[name]))))
        referenced_packs = {loc.pack_id for loc in index.values()}
        stray = sum(1 for p in self._list("packs", ".pack")
                    if os.path.basename(p).removesuffix(".pack") not in referenced_packs)
        return CheckReport(len(good_points), len(users), chunks_read, tuple(problems), stray)

    def _check_pack(self, pack_id: str, names: list[bytes],
                    index: dict[bytes, Location]) -> str | None:
        path = self._pack_path(pack_id)
        if not self._fio.exists(path):
            return "pack file is missing"
        try:
            entries = read_trailer(self._fio.read_file(path), pack_id)
        except ChunkCorrupt as exc:
            return exc.message
        listed = {n: (o, ln) for n, o, ln in entries}
        for name in names:
            loc = index[name]
            if listed.get(name) != (loc.offset, loc.length):
                return f"pack does not hold chunk {name.hex()} where the index says"
        return None

    # ------------------------------------------------------------------ forget and prune

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
            for point in gone:
                self._fio.unlink(self._p("points", f"{point.id}.json"))
            if gone:
                self._fio.fsync_dir(self._p("points"))
        return gone

    def prune(self) -> PruneReport:
        """Delete what no manifest references. Takes the repository lock exclusively."""
        lock = RepoLock(self._p("locks", "repo.lock"), exclusive=True, what="prune")
        try:
            return self._prune_locked()
        finally:
            lock.release()

    def _prune_locked(self) -> PruneReport:
        report = PruneReport()
        self._index = None  # re-read: other processes may have added index files
        live_chunks: set[bytes] = set()
        live_pages: set[str] = set()
        live_tables: set[str] = set()
        for filename in self._list("points", ".json"):
            try:
                point = self._load_point(filename)
            except ManifestCorrupt as exc:
                raise RepositoryError(f"cannot prune: {exc.message}; run check first") from exc
            live_tables.update(point.tables)
            live_pages.update(self.pages_of(point))
        for hexname in live_pages:
            plain = self.read_page(hexname)
            live_chunks.update(plain[i : i + 32] for i in range(0, len(plain), 32))
        live_chunks.discard(ZERO_DIGEST)
        live_chunks.update(bytes.fromhex(h) for h in live_pages | live_tables)
        index = self.index
        pack_live: dict[str, bool] = {}
        for name, loc in index.items():
            pack_live[loc.pack_id] = pack_live.get(loc.pack_id, False) or name in live_chunks
        keep = {n: loc for n, loc in index.items() if pack_live[loc.pack_id]}
        report.kept_partly_used_packs = len(
            {loc.pack_id for n, loc in keep.items() if n not in live_chunks})
        old_index_files = self._list("index", ".idx")
        new_name = f"{secrets.token_hex(16)}.idx"
        self.write_index(new_name, index_file.encode(keep))
        for old in old_index_files:
            self._fio.unlink(self._p("index", old))
        report.index_files_replaced = len(old_index_files)
        live_packs = {loc.pack_id for loc in keep.values()}
        for rel in self._list("packs", ".pack"):
            if os.path.basename(rel).removesuffix(".pack") not in live_packs:
                path = self._p("packs", rel)
                report.bytes_freed += self._fio.seal(path)[0]
                self._fio.unlink(path)
                report.packs_deleted += 1
        self._index = keep
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
        return report
