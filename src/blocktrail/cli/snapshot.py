"""`blocktrail snapshot create|list|remove|revert`."""

from __future__ import annotations

import click

from blocktrail.cli.disk import json_option
from blocktrail.cli.output import emit, human
from blocktrail.disk import Disk


@click.group()
def snapshot() -> None:
    """Snapshots: frozen points of a disk."""


@snapshot.command("create")
@click.argument("path", type=click.Path())
@click.argument("name")
@json_option
def create(path: str, name: str, as_json: bool) -> None:
    """Freeze the disk PATH as snapshot NAME."""
    with Disk.open(path) as d:
        snap = d.create_snapshot(name)
    emit(as_json, snap.to_json(), f"snapshot {snap.name} at change ID {snap.change_id}")


@snapshot.command("list")
@click.argument("path", type=click.Path())
@json_option
def list_(path: str, as_json: bool) -> None:
    """List the disk's snapshots, oldest first."""
    with Disk.open(path) as d:
        snaps = d.snapshots
    text = "\n".join(f"{s.name}\t{s.change_id}\t{s.created_at.isoformat()}\t{human(s.size_bytes)}"
                     for s in snaps) or "(no snapshots)"
    emit(as_json, [s.to_json() for s in snaps], text)


@snapshot.command("remove")
@click.argument("path", type=click.Path())
@click.argument("name")
@json_option
def remove(path: str, name: str, as_json: bool) -> None:
    """Remove snapshot NAME, consolidating its layer."""
    with Disk.open(path) as d:
        d.remove_snapshot(name)
    emit(as_json, {"removed": name}, f"removed snapshot {name}")


@snapshot.command("revert")
@click.argument("path", type=click.Path())
@click.argument("name")
@json_option
def revert(path: str, name: str, as_json: bool) -> None:
    """Make the disk's content that of snapshot NAME again (newer snapshots are discarded)."""
    with Disk.open(path) as d:
        newer = [s.name for s in d.snapshots]
        newer = newer[newer.index(name) + 1 :] if name in newer else []
        d.revert_to_snapshot(name)
        change_id = d.current_change_id
    emit(as_json, {"reverted_to": name, "discarded_snapshots": newer, "change_id": change_id},
         f"reverted to {name}" + (f"; discarded {', '.join(newer)}" if newer else "")
         + f"; change ID now {change_id}")
