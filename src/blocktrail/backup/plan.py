"""Deciding what a backup reads: changed areas, or everything, and why."""

from __future__ import annotations

import random
from dataclasses import dataclass

from blocktrail.backup.source import Source, SourceSnapshot, all_pages
from blocktrail.errors import ChangeIdError
from blocktrail.extents import Extent


@dataclass(frozen=True, slots=True)
class BasePoint:
    """What the engine knows of the restore point an incremental builds on."""

    point_id: str
    change_id: str | None
    size_bytes: int
    chunk_size: int


@dataclass(frozen=True, slots=True)
class ReadPlan:
    kind: str  # "full" | "incremental"
    chunks: list[int]  # chunk indexes to read and store, ascending
    fallback_reason: str | None  # why a wanted incremental became a full


def chunk_indexes(areas: list[Extent], chunk_size: int, size_bytes: int) -> list[int]:
    """Indexes of the chunks touched by ``areas`` (clipped to the disk)."""
    out: set[int] = set()
    for area in areas:
        end = min(area.end, size_bytes)
        if area.offset < end:
            out.update(range(area.offset // chunk_size, (end - 1) // chunk_size + 1))
    return sorted(out)


def plan_read(source: Source, snapshot: SourceSnapshot, base: BasePoint | None, *,
              force_full: bool, chunk_size: int, no_base: str | None = None) -> ReadPlan:
    """Changed areas since ``base`` when they can be trusted, else all allocated areas.
    ``base`` is the base choice's (base.py: it rules out points the tracker may have lied
    about); ``no_base``: why there is none, when a restore point rules every one out."""
    reason: str | None = None
    if force_full:
        reason = "a full backup was requested"
    elif base is None:
        reason = no_base or "no earlier verified restore point of this disk"
    elif base.size_bytes != snapshot.size_bytes:
        reason = f"the disk size changed ({base.size_bytes} -> {snapshot.size_bytes} bytes)"
    elif base.chunk_size != chunk_size:
        reason = "the repository chunk size differs from the base restore point's"
    elif base.change_id is None or snapshot.change_id is None:
        reason = "the source has no change ID for the base restore point"
    if reason is None and base is not None and base.change_id is not None:
        change_id = base.change_id
        try:
            areas = all_pages(
                lambda start: source.query_changed_areas(change_id, start, snapshot.name),
                snapshot.size_bytes)
        except ChangeIdError as exc:
            reason = f"change ID {change_id} refused: {exc.message}"
        else:
            return ReadPlan("incremental", chunk_indexes(areas, chunk_size, snapshot.size_bytes),
                            None)
    allocated = source.allocated_areas(snapshot.name)
    return ReadPlan("full", chunk_indexes(allocated, chunk_size, snapshot.size_bytes), reason)


def audit_sample(plan: ReadPlan, size_bytes: int, chunk_size: int, *, percent: float,
                 minimum: int, rng: random.Random) -> list[int]:
    """A random sample of the chunks the tracker says are unchanged."""
    if plan.kind != "incremental" or percent <= 0:
        return []
    total = -(-size_bytes // chunk_size)
    changed = set(plan.chunks)
    unchanged = total - len(changed)
    want = min(unchanged, max(minimum, round(unchanged * percent / 100)))
    picked: set[int] = set()
    while len(picked) < want:  # rejection sampling: changed chunks are a small minority
        index = rng.randrange(total)
        if index not in changed:
            picked.add(index)
    return sorted(picked)


def stored_copy_sample(plan: ReadPlan, size_bytes: int, chunk_size: int, *, want: int,
                       run_chunks: int, rng: random.Random) -> list[int]:
    """About ``want`` chunks the tracker says are unchanged, whose stored copies the audit
    reads: the unchanged chunks of random aligned runs of ``run_chunks`` (each run one ranged
    read where its chunks lie together in a pack, as a full backup stores them, instead of
    one read per chunk). Each chunk is about as likely to be picked as in a scattered sample
    of ``want``; every one is picked when ``want`` is all of them."""
    if plan.kind != "incremental" or want <= 0:
        return []
    run_chunks = max(1, run_chunks)
    total = -(-size_bytes // chunk_size)
    changed = set(plan.chunks)
    runs = -(-total // run_chunks)
    unchanged = total - len(changed)
    picked = range(runs) if want >= unchanged else \
        sorted(rng.sample(range(runs), min(runs, -(-want // run_chunks))))
    return [index for run in picked
            for index in range(run * run_chunks, min(total, (run + 1) * run_chunks))
            if index not in changed]
