"""`check`: is every restore point restorable, and is every file what it claims to be?

Structure: every manifest (checksum, ID, base link), every page table and page a manifest
names (read whole and rehashed), every chunk has a usable copy, every pack trailer agrees with
the index. ``read_data``: every object in every pack is read and rehashed too. A damaged copy
found on the way is put in quarantine, so nothing is restored from it or deduplicated against it
again. Every problem names the damaged thing and the restore points it makes unrestorable.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from blocktrail.pipeline import read_ahead
from blocktrail.repo import layout
from blocktrail.repo.errors import (
    AuthenticationFailed,
    ChunkCorrupt,
    ObjectMissing,
    RepositoryError,
)
from blocktrail.repo.keys import scan_key_files
from blocktrail.repo.manifest import TABLE_PAGES, RestorePoint, link_problems
from blocktrail.repo.objects import (
    KIND_CHUNK,
    KIND_PAGE,
    KIND_TABLE,
    ZERO_DIGEST,
)
from blocktrail.repo.packs import Location, read_trailer, trailer_length
from blocktrail.repo.quarantine import KIND_NAMES, CopyKey, DamagedCopy
from blocktrail.repo.store import Store

_KIND_PROBLEM = {KIND_CHUNK: "chunk", KIND_PAGE: "page", KIND_TABLE: "table"}
_GONE = "missing"


@dataclass(frozen=True, slots=True)
class Problem:
    """One damaged thing, and the restore points it makes unrestorable."""

    kind: str  # "manifest" | "link" | "table" | "page" | "chunk" | "pack" | "index" | "verify"
    # | "key" (a key file that does not decode)
    name: str
    detail: str
    affected_points: tuple[str, ...]
    authentication: bool = False  # an encrypted repository's object failed authentication

    @property
    def cause(self) -> str:
        """``authentication`` (altered, moved, or another key), ``damage`` or ``missing``."""
        if self.authentication:
            return "authentication"
        return "missing" if "missing" in self.detail or "no index file" in self.detail \
            else "damage"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "detail": self.detail,
                "cause": self.cause, "affected_points": list(self.affected_points)}


@dataclass(frozen=True, slots=True)
class CheckReport:
    points: int
    chunks_referenced: int
    chunks_read: int
    problems: tuple[Problem, ...]
    unreferenced_files: int = 0  # packs holding nothing a point uses: reclaimable, not damage
    temp_files: int = 0  # left by writes that did not finish: reclaimable, not damage
    quarantined: tuple[DamagedCopy, ...] = ()  # damaged copies this check put in quarantine
    quarantined_before: int = 0  # quarantine records that were there already

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def affected_points(self) -> set[str]:
        return {p for problem in self.problems for p in problem.affected_points}

    @property
    def authentication_failures(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.authentication)


@dataclass
class _Walk:
    """What the manifests reference: object -> (kind, restore points)."""

    problems: list[Problem] = field(default_factory=list)
    users: dict[bytes, set[str]] = field(default_factory=dict)
    kinds: dict[bytes, int] = field(default_factory=dict)
    found: list[DamagedCopy] = field(default_factory=list)

    def use(self, name: bytes, kind: int, points: set[str]) -> None:
        self.users.setdefault(name, set()).update(points)
        self.kinds[name] = kind


def check_repository(repo: Store, *, read_data: bool = False,
                     read_data_subset_pct: float | None = None,
                     seed: int | None = None) -> CheckReport:
    walk = _Walk()
    points = _check_manifests(repo, walk)  # first: the index then has all they name
    index = repo.reload_index()
    quarantined_before = len(repo.quarantined())
    _walk_objects(repo, points, walk)
    _locate(repo, walk)
    chunks_read = _check_packs(repo, walk, read_data, read_data_subset_pct, seed)
    unindexed = {p for name, pids in walk.users.items() if not index.is_known(name)
                 for p in pids}
    for digest, message in index.damaged_entries:
        walk.problems.append(Problem(
            "index", digest.hex(), message, () if digest in index else tuple(sorted(
                walk.users.get(digest, ())))))
    for name, message in index.damaged_files:
        walk.problems.append(Problem(
            "index", layout.index_file(name), f"{message}; the objects it names are unknown until "
            "`blocktrail repo repair` rebuilds the index from the packs", tuple(sorted(unindexed)),
            name in index.unauthentic_files))
    for name in repo.damaged_verify_records():
        walk.problems.append(Problem(
            "verify", name, f"{name}: the newest verify record of its restore point does not "
            + ("authenticate" if repo.codec.encrypted else "decode")
            + "; the point counts as failed verification (never a base) until `blocktrail "
            "verify` records its state again", (), repo.codec.encrypted))
    if repo.codec.encrypted:
        for key in scan_key_files(repo.backend).damaged:
            walk.problems.append(Problem(
                "key", key.name, f"{key.reason}: it opens nothing; if it was the key file of "
                "a password still in use, add that password again (`blocktrail repo key add`, "
                "opened with another one), then remove it (`blocktrail repo key remove "
                f"{layout.key_id_of(key.name)}`)", ()))
    used_packs = {loc.pack_id for name in walk.users if (loc := index.get(name)) is not None}
    return CheckReport(
        points=len(points), chunks_referenced=sum(
            1 for kind in walk.kinds.values() if kind == KIND_CHUNK),
        chunks_read=chunks_read, problems=tuple(_gone_meanwhile(repo, walk.problems)),
        unreferenced_files=len(repo.pack_ids() - used_packs), temp_files=len(repo.temp_files()),
        quarantined=tuple(walk.found), quarantined_before=quarantined_before)


def _gone_meanwhile(repo: Store, problems: list[Problem]) -> list[Problem]:
    """Without what a forget and prune beside this check made look missing: an object or a
    pack whose restore points are all gone by now (forgotten after the manifests were read),
    or a pack no point used that no index file names any more (deleted by a prune as dead,
    which also takes it out of the index).
    The manifests and the index are listed and read again to tell; what a point that is still
    there misses stays a problem."""
    if not any(p.cause == "missing" for p in problems):
        return problems
    now = {layout.point_id_of(info.name) for info in repo.backend.list(layout.POINTS)}
    named = repo.reload_index().named_packs()  # a pack deleted by hand stays named
    return [p for p in problems if p.cause != "missing" or set(p.affected_points) & now
            or (not p.affected_points and (p.kind != "pack" or p.name in named))]


def _check_manifests(repo: Store, walk: _Walk) -> list[RestorePoint]:
    points, damaged = repo.scan_points_detailed()
    for filename, exc in damaged:
        walk.problems.append(Problem("manifest", f"points/{filename}", exc.message,
                                     (filename.removesuffix(".json"),),
                                     isinstance(exc, AuthenticationFailed)))
    by_id = {p.id: p for p in points}
    for point in points:
        parent = by_id.get(point.parent) if point.parent else None
        for text in link_problems(point, parent):
            walk.problems.append(Problem("link", f"points/{point.id}.json",
                                         f"restore point {point.id}: {text}", (point.id,)))
    return points


def _walk_objects(repo: Store, points: list[RestorePoint], walk: _Walk) -> None:
    """Read every page table and page (whole, rehashed); collect the chunks they name. Each
    must list as many digests as its part of each point's disk needs."""
    table_users: dict[str, set[str]] = {}
    table_places: dict[str, list[tuple[RestorePoint, int]]] = {}  # (point, table number)
    for point in points:
        for table_no, table in enumerate(point.tables):
            table_users.setdefault(table, set()).add(point.id)
            table_places.setdefault(table, []).append((point, table_no))
    page_users: dict[str, set[str]] = {}
    page_widths: dict[str, dict[str, int]] = {}  # page -> point id -> digests it must list
    for table, pids in sorted(table_users.items()):
        walk.use(bytes.fromhex(table), KIND_TABLE, pids)
        plain = _read(repo, walk, bytes.fromhex(table), KIND_TABLE, pids)
        places = table_places[table]
        if plain and _wrong_width(walk, "table", table, plain, "pages",
                                  {p.id: p.table_width(n) for p, n in places}):
            continue
        for i in range(0, len(plain), 32):
            page = plain[i : i + 32].hex()
            page_users.setdefault(page, set()).update(pids)
            page_widths.setdefault(page, {}).update(
                (p.id, p.page_width(n * TABLE_PAGES + i // 32)) for p, n in places)
    for page, pids in sorted(page_users.items()):
        walk.use(bytes.fromhex(page), KIND_PAGE, pids)
        plain = _read(repo, walk, bytes.fromhex(page), KIND_PAGE, pids)
        if plain and _wrong_width(walk, "page", page, plain, "chunks", page_widths[page]):
            continue
        for i in range(0, len(plain), 32):
            name = plain[i : i + 32]
            if name != ZERO_DIGEST:
                walk.use(name, KIND_CHUNK, pids)


def _wrong_width(walk: _Walk, kind: str, name: str, plain: bytes, unit: str,
                 widths: dict[str, int]) -> bool:
    """A page table or page listing another number of digests than a point needs (its
    manifest names another point's object): a problem of the points it does not fit."""
    wrong = sorted(pid for pid, width in widths.items() if len(plain) != 32 * width)
    if wrong:
        walk.problems.append(Problem(kind, name, (
            f"{'page table' if kind == 'table' else 'page'} {name} lists {len(plain) // 32} "
            f"{unit}, not the {sorted({widths[p] for p in wrong})} the disk of restore point "
            f"{', '.join(wrong)} needs: the manifest names the wrong object"), tuple(wrong)))
    return bool(wrong)


def _read(repo: Store, walk: _Walk, name: bytes, kind: int, pids: set[str]) -> bytes:
    """The object's plain bytes; b"" (and a problem) when it cannot be read."""
    label = f"{KIND_NAMES[kind]} {name.hex()}"
    try:
        return repo.read_object(name, kind, label, walk.found)
    except RepositoryError as exc:
        walk.problems.append(Problem(_KIND_PROBLEM[kind], name.hex(), exc.message,
                                     tuple(sorted(pids)), _authentication(repo, exc)))
        return b""


def _locate(repo: Store, walk: _Walk) -> None:
    """Every referenced chunk has a usable copy (tables and pages were read already); the
    objects of a missing pack are reported once, as the pack."""
    by_missing_pack: dict[str, set[str]] = {}
    for name, kind in walk.kinds.items():
        if kind != KIND_CHUNK or name in repo.index:
            continue
        pack_id = repo.index.missing_pack(name)
        if pack_id is not None:
            by_missing_pack.setdefault(pack_id, set()).update(walk.users[name])
            continue
        walk.problems.append(Problem("chunk", name.hex(),
                                     f"chunk {name.hex()}: {repo.index.why_missing(name)}",
                                     tuple(sorted(walk.users[name]))))
    misplaced = repo.index.misplaced
    for pack_id, pids in sorted(by_missing_pack.items()):
        hint = "" if pack_id not in misplaced else (
            f" ({misplaced[pack_id]} is in another folder: move it to "
            f"{layout.pack(pack_id)})")
        walk.problems.append(Problem("pack", pack_id, f"pack {pack_id} is missing: an index "
                                     f"file names chunks in it{hint}", tuple(sorted(pids))))


def _check_packs(repo: Store, walk: _Walk, read_data: bool, subset_pct: float | None,
                 seed: int | None) -> int:
    """The trailer of every pack; with ``read_data`` (or a subset) every object in the packs
    the index uses. -> referenced chunks read and rehashed."""
    by_pack: dict[str, list[tuple[bytes, Location]]] = {}
    for name, loc in repo.index.items():
        by_pack.setdefault(loc.pack_id, []).append((name, loc))
    to_read = set(by_pack) if read_data else set()
    if not read_data and subset_pct:
        count = max(1, round(len(by_pack) * subset_pct / 100))
        to_read = set(random.Random(seed).sample(sorted(by_pack), min(count, len(by_pack))))
    sizes = repo.pack_sizes()
    packs = sorted(set(sizes) | set(by_pack))  # every trailer: they are small
    quarantined = repo.quarantined()
    results = read_ahead(packs, lambda p: _check_pack(repo, p, sizes.get(p),
                                                      by_pack.get(p, []), p in to_read,
                                                      quarantined),
                         window=16 if repo.backend.remote else 4, executor=repo.io_pool)
    chunks_read = 0
    damaged: list[DamagedCopy] = []
    for pack_id, (trailer_problem, found, verified) in zip(packs, results, strict=True):
        damaged += found
        chunks_read += sum(1 for n in verified if walk.kinds.get(n) == KIND_CHUNK)
        users = {p for n, _ in by_pack.get(pack_id, []) for p in walk.users.get(n, ())}
        if trailer_problem == _GONE:  # deleted after the index was read
            walk.problems.append(Problem("pack", pack_id, f"pack {pack_id} is missing",
                                         tuple(sorted(users))))
        elif trailer_problem is not None:
            walk.problems.append(Problem(
                "pack", pack_id, f"{trailer_problem}; its objects check themselves on every "
                "read, so that alone makes no restore point unrestorable (objects of "
                f"{len(users)} are in it); `blocktrail repo repair` copies them to a new pack",
                (), repo.codec.encrypted))
    for copy in damaged:
        walk.found.append(copy)
        _report_damaged_copy(repo, walk, copy)
    return chunks_read


def _check_pack(repo: Store, pack_id: str, size: int | None,
                entries: list[tuple[bytes, Location]], read_all: bool,
                quarantined: set[CopyKey]) -> tuple[str | None, list[DamagedCopy], list[bytes]]:
    """-> (what is wrong with the trailer, damaged copies set aside, objects verified)."""
    where = f"pack {pack_id}"
    if size is None:
        return _GONE, [], []
    try:
        end = repo.read_range(pack_id, max(0, size - 8), min(8, size), where)
        end = end.rjust(8, b"\0")
        tail_length = min(size, trailer_length(end))
        tail = repo.read_range(pack_id, size - tail_length, tail_length, where)
        problem: str | None = None
        try:
            trailer = read_trailer(tail, where, pack_size=size, pack_id=pack_id,
                                   trailer_key=repo.codec.trailer_key)
        except ChunkCorrupt as exc:
            problem, trailer, read_all = exc.message, [], True  # find out which objects suffer
        listed = {(n, o): ln for n, o, ln in trailer}
        for name, loc in entries:
            length = listed.get((name, loc.offset))
            if length is not None and length != loc.length:
                read_all = True  # the index entry's length is wrong: its read shows it
            elif problem is None and length is None:
                problem = (f"{where}: the trailer does not list object {name.hex()} where the "
                           "index says")
                read_all = True
        if not read_all:
            return problem, [], []
        data = repo.read_range(pack_id, 0, size, where)
    except ObjectMissing:
        return _GONE, [], []  # deleted since the listing
    damaged, verified = _check_objects(repo, pack_id, data, entries)
    known_bad = quarantined | {copy.key for copy in damaged}
    for name, offset, length in trailer:  # each entry names the envelope that is there
        if problem is not None or (name, pack_id, offset) in known_bad:
            continue  # a copy in quarantine may have a damaged header: that is known
        header = repo.codec.envelope_at(data, offset)
        if header is None or header[1:] != (length, name):
            problem = f"{where}: the trailer's entry at offset {offset} does not match the pack"
    return problem, damaged, verified


def _check_objects(repo: Store, pack_id: str, data: bytes,
                   entries: list[tuple[bytes, Location]]) -> tuple[list[DamagedCopy],
                                                                   list[bytes]]:
    """Every object the index locates in this pack, read whole and rehashed; a damaged one is
    put in quarantine. -> (damaged copies, objects verified)."""
    damaged, verified = [], []
    for name, loc in entries:
        copy = repo.copy_damage(name, loc, data[loc.offset : loc.offset + loc.length])
        if copy is None:
            verified.append(name)
        elif (set_aside := repo.set_aside(copy)) is not None:
            damaged.append(set_aside)  # else the index entry was wrong: reported as such
    return damaged, verified


def _authentication(repo: Store, exc: RepositoryError) -> bool:
    """Did ``exc`` come from authentication (or, reading a copy, did all damage)? In an
    encrypted repository every damaged copy is found by its authentication failing."""
    return isinstance(exc, AuthenticationFailed) or (
        repo.codec.encrypted and isinstance(exc, ChunkCorrupt))


def _report_damaged_copy(repo: Store, walk: _Walk, copy: DamagedCopy) -> None:
    """A damaged copy was set aside: is another copy there, and who needed it?"""
    users = walk.users.get(copy.digest, set())
    kind = _KIND_PROBLEM.get(copy.kind, "chunk")
    detail = f"{copy.reason}; " + ("this copy is now in quarantine" if copy.not_recorded is None
                                   else f"set aside by this check only: {copy.not_recorded}")
    auth = repo.codec.encrypted  # every damaged copy there failed its authentication
    if not users:
        walk.problems.append(Problem(kind, copy.digest.hex(), f"{detail} (no restore point "
                                     "uses it, and no backup will deduplicate against it)", (),
                                     auth))
        return
    try:
        repo.read_object(copy.digest, copy.kind, f"{KIND_NAMES.get(copy.kind)} "
                         f"{copy.digest.hex()}", walk.found)
    except ChunkCorrupt as exc:  # another copy, damaged too
        walk.problems.append(Problem(kind, copy.digest.hex(), f"{detail}; {exc.message}",
                                     tuple(sorted(users)), auth))
        return
    except RepositoryError:
        walk.problems.append(Problem(kind, copy.digest.hex(), f"{detail}, and no intact copy "
                                     "is left", tuple(sorted(users)), auth))
        return
    walk.problems.append(Problem(kind, copy.digest.hex(), f"{detail}; an intact copy is used "
                                 "instead", (), auth))
