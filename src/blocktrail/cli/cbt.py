"""`blocktrail cbt query|reset`."""

from __future__ import annotations

import click

from blocktrail.cli.disk import json_option
from blocktrail.cli.output import emit, human, parse_size
from blocktrail.disk import Disk


@click.group()
def cbt() -> None:
    """Changed block tracking: what changed since a change ID."""


@cbt.command("query")
@click.argument("path", type=click.Path())
@click.option("--since", "since", required=True, help="A change ID, or '*' for all allocated.")
@click.option("--snapshot", default=None, help="End the interval at this snapshot's point.")
@click.option("--start", default="0", show_default=True, help="Start offset (paging).")
@json_option
def query(path: str, since: str, snapshot: str | None, start: str, as_json: bool) -> None:
    """Areas changed after --since up to --snapshot (or now), QueryChangedDiskAreas-style.

    The answer may cover a prefix: continue with --start START+LENGTH until the disk's size."""
    with Disk.open(path) as d:
        info = d.query_changed_areas(since, parse_size(start), snapshot)
    changed = sum(e.length for e in info.changed_areas)
    lines = [f"{e.offset}\t{e.length}" for e in info.changed_areas]
    lines.append(f"# {len(info.changed_areas)} areas, {human(changed)} changed in "
                 f"[{info.start_offset}, {info.end})")
    emit(as_json, info.to_json(), "\n".join(lines))


@cbt.command("reset")
@click.argument("path", type=click.Path())
@json_option
def reset(path: str, as_json: bool) -> None:
    """Start a new tracking epoch: every earlier change ID is refused from now on."""
    with Disk.open(path) as d:
        change_id = d.reset_tracking()
    emit(as_json, {"change_id": change_id}, f"tracking reset; change ID now {change_id}")
