"""Tables people read (`points`, `snapshot list`): a header, aligned columns, sizes and ages in
human units. ``--json`` output never goes through here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from blocktrail.cli.output import human

NOTE_WIDTH = 60


def table(headers: Sequence[str], rows: Sequence[Sequence[str]],
          right: frozenset[int] = frozenset()) -> str:
    """Columns as wide as their widest cell, two spaces apart; ``right``: the indexes of
    columns aligned right (numbers)."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([fmt(headers), "  ".join("-" * w for w in widths), *map(fmt, rows)])


def age(created_at: str, now: datetime | None = None) -> str:
    """``42s``, ``5m``, ``3h``, ``2d``, ``7w`` ago: the largest unit that fits."""
    try:
        then = datetime.fromisoformat(created_at)
    except ValueError:
        return "?"
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    seconds = max(0.0, ((now or datetime.now(UTC)) - then).total_seconds())
    for unit, size in (("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def short_disk_id(disk_id: str) -> str:
    """A host disk's UUID by its first 8 digits (as git shortens); any other ID whole."""
    parts = disk_id.split("-")
    if len(parts) == 5 and len(disk_id) == 36:
        return parts[0]
    return disk_id


def clip(text: str, width: int = NOTE_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def points_table(points: Sequence[Mapping[str, Any]], names: Mapping[str, str],
                 now: datetime | None = None) -> str:
    """Restore points (their `summary()` with ``stats``) as restic shows snapshots; ``names``:
    disk ID -> disk name, where known."""
    if not points:
        return "(no restore points)"
    rows = []
    for p in points:
        disk = names.get(p["disk_id"])
        shown = f"{disk} ({short_disk_id(p['disk_id'])})" if disk else p["disk_id"]
        stored = p.get("bytes_stored")
        note = p.get("fallback_reason") or ""
        if not p.get("tracker_trusted", True):
            note = "AUDIT MISMATCH: the tracker missed changes" + (f"; {note}" if note else "")
        rows.append([p["id"], shown, p["kind"], age(p["created_at"], now),
                     human(p["size_bytes"]), "-" if stored is None else human(int(stored)),
                     p["verify_state"], clip(note)])
    text = table(["ID", "DISK", "KIND", "AGE", "SIZE", "STORED", "VERIFY", "NOTE"], rows,
                 right=frozenset({4, 5}))
    return f"{text}\n{len(points)} restore points"


def snapshots_table(snapshots: Sequence[Mapping[str, Any]], disk: str,
                    now: datetime | None = None) -> str:
    if not snapshots:
        return f"(no snapshots of {disk})"
    rows = [[s["name"], age(s["created_at"], now), human(s["size_bytes"]), s["change_id"]]
            for s in snapshots]
    return (table(["SNAPSHOT", "AGE", "SIZE", "CHANGE ID"], rows, right=frozenset({2}))
            + f"\n{len(snapshots)} snapshots of {disk}")
