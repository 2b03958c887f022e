"""Which restore points `forget` keeps (restic-style policies, per disk).

Whatever the policy says, a point that taints (`RestorePoint.taint`) is kept while a kept point
has it in its parent chain, with the points between them: that point inherited its wrong
chunks, and only the chain tells a backup that it is no base (backup/base.py). Forgotten, it
would leave the child looking whole, and the next backup incremental on it, silently wrong.
Once no kept point builds on it, it goes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from blocktrail.repo.manifest import RestorePoint, parent_chain


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    keep_last: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0

    @property
    def empty(self) -> bool:
        return not (self.keep_last or self.keep_daily or self.keep_weekly or self.keep_monthly)


def bucketed(points: list[RestorePoint], count: int,
              bucket: Callable[[datetime], object]) -> set[str]:
    """The newest point of each of the ``count`` newest buckets."""
    kept: set[str] = set()
    seen: set[object] = set()
    for point in points:  # newest first
        key = bucket(point.created)
        if key not in seen and len(seen) < count:
            seen.add(key)
            kept.add(point.id)
    return kept


def points_to_keep(points: list[RestorePoint], policy: RetentionPolicy) -> set[str]:
    """Ids to keep among one disk's points. An empty policy keeps everything."""
    if policy.empty:
        return {p.id for p in points}
    newest_first = sorted(points, key=lambda p: p.id, reverse=True)
    keep = {p.id for p in newest_first[: policy.keep_last]}
    keep |= bucketed(newest_first, policy.keep_daily, lambda t: t.date())
    keep |= bucketed(newest_first, policy.keep_weekly, lambda t: t.isocalendar()[:2])
    keep |= bucketed(newest_first, policy.keep_monthly, lambda t: (t.year, t.month))
    return keep


def kept_for_taint(points: list[RestorePoint], kept: set[str]) -> set[str]:
    """The points outside ``kept`` to keep as well: for each kept point whose parent chain holds
    a point that taints, the chain up to the last such point (the points between keep the
    chain linked). ``points``: one disk's, or any that hold the chains."""
    by_id = {p.id: p for p in points}
    more: set[str] = set()
    for point_id in kept:
        if point_id not in by_id:
            continue
        chain = parent_chain(by_id[point_id], by_id)
        last = max((n for n, link in enumerate(chain) if link.taint is not None), default=-1)
        more.update(link.id for link in chain[: last + 1])
    return more - kept
