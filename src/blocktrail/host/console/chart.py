"""A chart of the bytes each backup stored, over time: an inline SVG drawn on the server (no
script, no library), one bar per restore point, a full backup in another colour than an
incremental; each bar's title says what it is."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from blocktrail.repo import RestorePoint

WIDTH, HEIGHT, PAD = 640, 160, 28


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def stored_bytes_chart(points: Sequence[RestorePoint], title: str) -> str:
    """The SVG markup (empty text when there are no points)."""
    if not points:
        return ""
    ordered = sorted(points, key=lambda p: p.created)
    first, last = ordered[0].created.timestamp(), ordered[-1].created.timestamp()
    span = max(last - first, 1.0)
    stored = [int(p.stats.get("bytes_stored", 0)) for p in ordered]
    top = max(max(stored), 1)
    inner_w, inner_h = WIDTH - 2 * PAD, HEIGHT - 2 * PAD
    bar = max(2.0, min(24.0, inner_w / (2 * len(ordered))))
    parts = [f'<svg class="chart" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" '
             f'width="{WIDTH}" height="{HEIGHT}" aria-label="{escape(title)}">',
             f"<title>{escape(title)}</title>",
             f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}" '
             'class="axis"/>',
             f'<text x="{PAD}" y="{PAD - 10}" class="label">{escape(_human(top))}</text>',
             f'<text x="{PAD}" y="{HEIGHT - 8}" class="label">'
             f"{escape(ordered[0].created.strftime('%Y-%m-%d %H:%M'))}</text>",
             f'<text x="{WIDTH - PAD}" y="{HEIGHT - 8}" class="label" text-anchor="end">'
             f"{escape(ordered[-1].created.strftime('%Y-%m-%d %H:%M'))}</text>"]
    for point, size in zip(ordered, stored, strict=True):
        x = PAD + (point.created.timestamp() - first) / span * (inner_w - bar)
        h = max(1.0, size / top * inner_h)
        kind = "full" if point.kind == "full" else "incremental"
        parts.append(f'<rect class="bar {kind}" x="{x:.1f}" y="{HEIGHT - PAD - h:.1f}" '
                     f'width="{bar:.1f}" height="{h:.1f}"><title>{escape(point.id)}: '
                     f"{escape(point.kind)}, stored {escape(_human(size))}</title></rect>")
    parts.append("</svg>")
    return "".join(parts)
