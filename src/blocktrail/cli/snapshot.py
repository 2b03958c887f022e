"""`blocktrail snapshot create|list|remove|revert`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from blocktrail.cli.disk import json_option
from blocktrail.cli.output import emit
from blocktrail.cli.target import call, host_option, on_disk
from blocktrail.names import check_snapshot_name

if TYPE_CHECKING:
    from blocktrail.disk import Disk


@click.group()
def snapshot() -> None:
    """Snapshots: frozen points of a disk."""


@snapshot.command("create")
@click.argument("disk")
@click.argument("name")
@host_option
@json_option
def create(disk: str, name: str, host: str | None, as_json: bool) -> None:
    """Freeze DISK as snapshot NAME."""
    check_snapshot_name(name)
    snap = on_disk(disk, host, lambda d: d.create_snapshot(name).to_json(),
                   call("POST", "disks", disk, "snapshots", json={"name": name}))
    emit(as_json, snap, f"snapshot {snap['name']} at change ID {snap['change_id']}")


@snapshot.command("list")
@click.argument("disk")
@host_option
@json_option
def list_(disk: str, host: str | None, as_json: bool) -> None:
    """List the disk's snapshots, oldest first."""
    snaps: list[dict[str, Any]] = on_disk(
        disk, host, lambda d: [s.to_json() for s in d.snapshots],
        call("GET", "disks", disk, "snapshots"))
    from blocktrail.cli.tables import snapshots_table
    emit(as_json, snaps, "" if as_json else snapshots_table(snaps, disk))


@snapshot.command("remove")
@click.argument("disk")
@click.argument("name")
@host_option
@json_option
def remove(disk: str, name: str, host: str | None, as_json: bool) -> None:
    """Remove snapshot NAME, consolidating its layer (online on a host)."""
    check_snapshot_name(name)
    on_disk(disk, host, lambda d: d.remove_snapshot(name),
            call("DELETE", "disks", disk, "snapshots", name))
    emit(as_json, {"removed": name}, f"removed snapshot {name}")


@snapshot.command("revert")
@click.argument("disk")
@click.argument("name")
@host_option
@json_option
def revert(disk: str, name: str, host: str | None, as_json: bool) -> None:
    """Make DISK's content that of snapshot NAME again (newer snapshots are discarded)."""
    check_snapshot_name(name)
    before = [s["name"] for s in on_disk(
        disk, host, lambda d: [s.to_json() for s in d.snapshots],
        call("GET", "disks", disk, "snapshots"))]

    def local(d: Disk) -> str:
        d.revert_to_snapshot(name)
        return d.current_change_id

    revert_call = call("POST", "disks", disk, "snapshots", name, "revert")
    change_id = on_disk(disk, host, local,
                        lambda c: str(revert_call(c)["current_change_id"]))
    newer = before[before.index(name) + 1 :] if name in before else []
    emit(as_json, {"reverted_to": name, "discarded_snapshots": newer, "change_id": change_id},
         f"reverted to {name}" + (f"; discarded {', '.join(newer)}" if newer else "")
         + f"; change ID now {change_id}")
