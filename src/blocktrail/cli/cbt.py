"""`blocktrail cbt query|reset`."""

from __future__ import annotations

from typing import Any

import click

from blocktrail.cli.disk import json_option
from blocktrail.cli.output import emit, human, parse_size
from blocktrail.cli.target import call, host_option, on_disk
from blocktrail.names import check_snapshot_name
from blocktrail.tracking import ALL_ALLOCATED, ChangeId


@click.group()
def cbt() -> None:
    """Changed block tracking: what changed since a change ID."""


@cbt.command("query")
@click.argument("disk")
@click.option("--since", "since", required=True, help="A change ID, or '*' for all allocated.")
@click.option("--snapshot", default=None, help="End the interval at this snapshot's point.")
@click.option("--start", default="0", show_default=True, help="Start offset (paging).")
@host_option
@json_option
def query(disk: str, since: str, snapshot: str | None, start: str, host: str | None,
          as_json: bool) -> None:
    """Areas changed after --since up to --snapshot (or now), QueryChangedDiskAreas-style.

    The answer may cover a prefix: continue with --start START+LENGTH until the disk's size."""
    start_offset = parse_size(start)
    if since != ALL_ALLOCATED:
        ChangeId.parse(since)
    params: dict[str, Any] = {"since": since, "start_offset": start_offset}
    if snapshot is not None:
        params["snapshot"] = check_snapshot_name(snapshot)
    info: dict[str, Any] = on_disk(
        disk, host, lambda d: d.query_changed_areas(since, start_offset, snapshot).to_json(),
        call("GET", "disks", disk, "changed-areas", params=params))
    areas = info["changed_areas"]
    lines = [f"{a['offset']}\t{a['length']}" for a in areas]
    end = info["start_offset"] + info["length"]
    lines.append(f"# {len(areas)} areas, {human(sum(a['length'] for a in areas))} changed in "
                 f"[{info['start_offset']}, {end})")
    emit(as_json, info, "\n".join(lines))


@cbt.command("reset")
@click.argument("disk")
@host_option
@json_option
def reset(disk: str, host: str | None, as_json: bool) -> None:
    """Start a new tracking epoch: every earlier change ID is refused from now on."""
    reset_call = call("POST", "disks", disk, "tracking", "reset")
    change_id = on_disk(disk, host, lambda d: d.reset_tracking(),
                        lambda c: str(reset_call(c)["change_id"]))
    emit(as_json, {"change_id": change_id}, f"tracking reset; change ID now {change_id}")
