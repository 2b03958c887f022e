"""`blocktrail disk create|info|import`."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import click

from blocktrail.cli.output import emit, human, parse_size
from blocktrail.cli.target import call, host_option, on_disk, with_host
from blocktrail.names import check_disk_name

if TYPE_CHECKING:
    from blocktrail.disk import Disk

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def disk_info(d: Disk) -> dict[str, Any]:
    from blocktrail.host.fill import restore_status

    return {
        "name": os.path.basename(os.path.normpath(d.path)),
        "path": d.path,
        "disk_id": d.disk_id,
        "size_bytes": d.size_bytes,
        "granularity": d.granularity,
        "current_change_id": d.current_change_id,
        "snapshots": [s.to_json() for s in d.snapshots],
        "epochs": [e.to_json() for e in d.tracker.epochs],
        "restore": restore_status(d),
    }


def _describe(info: dict[str, Any]) -> str:
    lines = [
        f"disk {info.get('path', info['name'])}",
        f"  id            {info['disk_id']}",
        f"  size          {human(info['size_bytes'])} ({info['size_bytes']} bytes)",
        f"  granularity   {info['granularity']}",
        f"  change ID     {info['current_change_id']}",
        f"  snapshots     {len(info['snapshots'])}",
    ]
    lines += [f"    {s['name']}  {s['change_id']}  {s['created_at']}" for s in info["snapshots"]]
    last = info["epochs"][-1]
    lines.append(f"  epoch since   {last['created_at']} ({last['reason']})")
    restore = info.get("restore")
    if restore:
        if restore.get("point"):
            lines.append(f"  base          {restore['summary']} (from restore point "
                         f"{restore['point']} in {restore['repository']})")
        else:
            lines.append(f"  base          {restore['summary']}")
        if restore.get("last_error"):
            lines.append(f"  last error    {restore['last_error_at']}: {restore['last_error']}")
    return "\n".join(lines)


@click.group()
def disk() -> None:
    """Create and inspect tracked disks."""


@disk.command("create")
@click.argument("disk_path", metavar="DISK")
@click.option("--size", required=True, help="Size, e.g. 64G.")
@click.option("--granularity", default="64K", show_default=True, help="Tracking granularity.")
@click.option("--cluster-size", default="64K", show_default=True, help="Delta cluster size.")
@host_option
@json_option
def create(disk_path: str, size: str, granularity: str, cluster_size: str, host: str | None,
           as_json: bool) -> None:
    """Create an empty disk: the directory DISK, or the disk named DISK on a host."""
    if host is not None:
        body = {"name": check_disk_name(disk_path), "size_bytes": parse_size(size),
                "granularity": parse_size(granularity)}
        info = with_host(host, call("POST", "disks", json=body))
    else:
        from blocktrail.disk import Disk
        with Disk.create(disk_path, parse_size(size), parse_size(granularity),
                         cluster_size=parse_size(cluster_size)) as d:
            info = disk_info(d)
    emit(as_json, info, _describe(info))


@disk.command("info")
@click.argument("disk_path", metavar="DISK")
@host_option
@json_option
def info(disk_path: str, host: str | None, as_json: bool) -> None:
    """Show a disk's size, change ID, snapshots and tracking epoch."""
    data = on_disk(disk_path, host, disk_info, call("GET", "disks", disk_path))
    emit(as_json, data, _describe(data))


@disk.command("import")
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.argument("disk_path", metavar="DISK")
@click.option("--granularity", default="64K", show_default=True)
@host_option
@json_option
def import_(source: str, disk_path: str, granularity: str, host: str | None,
            as_json: bool) -> None:
    """Bring the raw image SOURCE under tracking as DISK (its data counts as changed)."""
    if host is not None:
        body = {"name": check_disk_name(disk_path), "source_path": os.path.abspath(source),
                "granularity": parse_size(granularity)}
        from blocktrail.cli.progress import spinner
        with spinner("import", as_json):
            data = with_host(host, call("POST", "disks", "import", json=body))
    else:
        from blocktrail.cli.progress import progress_bar
        from blocktrail.disk.importer import import_raw
        with progress_bar("import", as_json) as progress, \
                import_raw(source, disk_path, parse_size(granularity), progress=progress) as d:
            data = disk_info(d)
    emit(as_json, data, _describe(data))
