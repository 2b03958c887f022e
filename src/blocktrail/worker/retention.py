"""Retention per disk, applied after each successful backup of it.

The policy keeps the newest ``last`` points and the newest point of each of the newest
``hourly``/``daily``/``weekly``/``monthly`` buckets (restic's rule, in the worker's time zone).
Whatever the policy says, these points of a disk are never forgotten:

- the newest point: the base the next incremental backup reads against (every point is a full
  index, so forgetting any other breaks nothing, but this one keeps the chain incremental);
- the newest point whose verify state is ``ok``: the last one known to equal its source;
- the base of a backup of the disk that is running (named in its lease; the caller names
  others to protect);
- a point that taints (`RestorePoint.taint` says why), while a point kept has it in its parent
  chain (and the points between): it tells the next backup that the kept point is no base
  (`forget` keeps it so too, repo/retention.py).

Otherwise a point whose verify state is ``failed`` counts like any other.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, tzinfo

from blocktrail.repo import Repository, RestorePoint
from blocktrail.repo.forget import delete_points, running_bases
from blocktrail.repo.retention import bucketed, kept_for_taint
from blocktrail.worker.config import Retention


def points_to_keep(points: list[RestorePoint], keep: Retention, *, tz: tzinfo | None = None,
                   protected: Iterable[str] = ()) -> set[str]:
    """The IDs to keep among one disk's points (an empty policy keeps them all)."""
    kept = _kept_by_policy(points, keep, tz=tz, protected=protected)
    return kept | kept_for_taint(points, kept)


def _kept_by_policy(points: list[RestorePoint], keep: Retention, *, tz: tzinfo | None,
                    protected: Iterable[str]) -> set[str]:
    """What the policy, the newest, the newest verified and the protected points keep: all
    but the points kept only for a failed point in a kept point's chain."""
    if keep.empty or not points:
        return {p.id for p in points}
    newest_first = sorted(points, key=lambda p: (p.created, p.id), reverse=True)

    def local(t: datetime) -> datetime:
        return t.astimezone(tz) if tz is not None else t.astimezone()

    kept = {p.id for p in newest_first[: keep.last]}
    kept |= bucketed(newest_first, keep.hourly, lambda t: local(t).strftime("%Y-%m-%d %H"))
    kept |= bucketed(newest_first, keep.daily, lambda t: local(t).date())
    kept |= bucketed(newest_first, keep.weekly, lambda t: local(t).isocalendar()[:2])
    kept |= bucketed(newest_first, keep.monthly, lambda t: (local(t).year, local(t).month))
    kept.add(newest_first[0].id)
    verified = next((p for p in newest_first if p.verify_state == "ok"), None)
    if verified is not None:
        kept.add(verified.id)
    return kept | (set(protected) & {p.id for p in points})


@dataclass(frozen=True, slots=True)
class Retained:
    """What retention did to one disk's points."""

    forgotten: list[RestorePoint]
    kept_for_taint: list[str]  # beyond the policy: a kept point builds on them, and they
    #                            taint (oldest first; they go once no kept point builds on them)


def apply_retention(repo: Repository, disk_id: str, keep: Retention, *, tz: tzinfo | None = None,
                    protected: Iterable[str] = ()) -> Retained:
    """Forget the disk's points the policy does not keep.

    Deletes their manifests and verify records the way `Repository.forget` does (the data goes
    with the next prune); a point that the lease of a running backup names as its base is kept
    too, as `forget` keeps it."""
    points = repo.points(disk_id)
    by_policy = _kept_by_policy(points, keep, tz=tz,
                                protected={*protected, *running_bases(repo)})
    for_taint = kept_for_taint(points, by_policy)
    gone = [p for p in points if p.id not in by_policy | for_taint]
    put_back = delete_points(repo, gone, "some restore points may not be forgotten yet; the "
                                         "next run forgets them")
    return Retained([p for p in gone if p.id not in put_back],
                    [p.id for p in sorted(points, key=lambda p: (p.created, p.id))
                     if p.id in for_taint])
