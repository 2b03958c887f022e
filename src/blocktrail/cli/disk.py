"""`blocktrail disk create|info|import`."""

from __future__ import annotations

from typing import Any

import click

from blocktrail.cli.output import emit, human, parse_size
from blocktrail.disk import Disk
from blocktrail.disk.importer import import_raw

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def disk_info(d: Disk) -> dict[str, Any]:
    return {
        "path": d.path,
        "disk_id": d.disk_id,
        "size_bytes": d.size_bytes,
        "granularity": d.granularity,
        "cluster_size": d.cluster_size,
        "current_change_id": d.current_change_id,
        "snapshots": [s.to_json() for s in d.snapshots],
        "epochs": [e.to_json() for e in d.tracker.epochs],
    }


def _describe(info: dict[str, Any]) -> str:
    lines = [
        f"disk {info['path']}",
        f"  id            {info['disk_id']}",
        f"  size          {human(info['size_bytes'])} ({info['size_bytes']} bytes)",
        f"  granularity   {info['granularity']}",
        f"  change ID     {info['current_change_id']}",
        f"  snapshots     {len(info['snapshots'])}",
    ]
    lines += [f"    {s['name']}  {s['change_id']}  {s['created_at']}" for s in info["snapshots"]]
    last = info["epochs"][-1]
    lines.append(f"  epoch since   {last['created_at']} ({last['reason']})")
    return "\n".join(lines)


@click.group()
def disk() -> None:
    """Create and inspect tracked disks."""


@disk.command("create")
@click.argument("path", type=click.Path())
@click.option("--size", required=True, help="Size, e.g. 64G.")
@click.option("--granularity", default="64K", show_default=True, help="Tracking granularity.")
@click.option("--cluster-size", default="64K", show_default=True, help="Delta cluster size.")
@json_option
def create(path: str, size: str, granularity: str, cluster_size: str, as_json: bool) -> None:
    """Create an empty disk in the directory PATH."""
    with Disk.create(path, parse_size(size), parse_size(granularity),
                     cluster_size=parse_size(cluster_size)) as d:
        info = disk_info(d)
    emit(as_json, info, _describe(info))


@disk.command("info")
@click.argument("path", type=click.Path())
@json_option
def info(path: str, as_json: bool) -> None:
    """Show a disk's size, change ID, snapshots and tracking epoch."""
    with Disk.open(path) as d:
        data = disk_info(d)
    emit(as_json, data, _describe(data))


@disk.command("import")
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.argument("path", type=click.Path())
@click.option("--granularity", default="64K", show_default=True)
@json_option
def import_(source: str, path: str, granularity: str, as_json: bool) -> None:
    """Bring the raw image SOURCE under tracking as the disk PATH (data counts as changed)."""
    with import_raw(source, path, parse_size(granularity)) as d:
        data = disk_info(d)
    emit(as_json, data, _describe(data))
