"""`blocktrail vm define|list|snapshot|remove-snapshot`: VMs of a host (a name for a set of its
disks, snapshotted together: one snapshot of every disk at one instant, or none)."""

from __future__ import annotations

from typing import Any

import click

from blocktrail.cli.disk import json_option
from blocktrail.cli.output import emit
from blocktrail.cli.target import call, with_host
from blocktrail.errors import InvalidArgument
from blocktrail.names import check_disk_name, check_snapshot_name, check_vm_name


def _host(host: str | None) -> str:
    if host is None:
        raise InvalidArgument("VMs live on a host: give --host (or BLOCKTRAIL_HOST)")
    return host


host_required = click.option(
    "--host", "host", envvar="BLOCKTRAIL_HOST", default=None, metavar="URL",
    help="The host (its --api value, e.g. unix:/run/bt.sock). Also BLOCKTRAIL_HOST.")


@click.group()
def vm() -> None:
    """VMs on a host: disks snapshotted together."""


@vm.command("define")
@click.argument("name")
@click.argument("disks", nargs=-1, required=True)
@host_required
@json_option
def define(name: str, disks: tuple[str, ...], host: str | None, as_json: bool) -> None:
    """Define VM NAME as the host's DISKS (each a disk on the host)."""
    check_vm_name(name)
    for disk in disks:
        check_disk_name(disk)
    out = with_host(_host(host), call("POST", "vms", json={"name": name,
                                                            "disks": list(disks)}))
    emit(as_json, out, f"VM {out['name']}: {' '.join(out['disks'])}")


@vm.command("list")
@host_required
@json_option
def list_(host: str | None, as_json: bool) -> None:
    """List the host's VMs and their disks."""
    vms: list[dict[str, Any]] = with_host(_host(host), call("GET", "vms"))
    text = "\n".join(f"{v['name']}\t{' '.join(v['disks'])}" for v in vms) or "(no VMs)"
    emit(as_json, vms, text)


@vm.command("snapshot")
@click.argument("name")
@click.argument("snapshot")
@host_required
@json_option
def snapshot(name: str, snapshot: str, host: str | None, as_json: bool) -> None:
    """Take SNAPSHOT of every disk of VM NAME at one instant (all of them, or none)."""
    check_vm_name(name)
    check_snapshot_name(snapshot)
    out = with_host(_host(host), call("POST", "vms", name, "snapshots",
                                      json={"name": snapshot}))
    lines = [f"{disk}@{snap['name']} at change ID {snap['change_id']}"
             for disk, snap in out["snapshots"].items()]
    emit(as_json, out, "\n".join(lines))


@vm.command("remove-snapshot")
@click.argument("name")
@click.argument("snapshot")
@host_required
@json_option
def remove_snapshot(name: str, snapshot: str, host: str | None, as_json: bool) -> None:
    """Remove SNAPSHOT from every disk of VM NAME (each consolidated online)."""
    check_vm_name(name)
    check_snapshot_name(snapshot)
    with_host(_host(host), call("DELETE", "vms", name, "snapshots", snapshot))
    emit(as_json, {"removed": snapshot}, f"removed snapshot {snapshot} of VM {name}")
