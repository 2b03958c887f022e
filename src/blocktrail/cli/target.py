"""A disk named on the command line: a local directory, or NAME on a host (--host)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from blocktrail.disk import Disk
from blocktrail.host.client import HostClient

T = TypeVar("T")

host_option = click.option(
    "--host", "host", envvar="BLOCKTRAIL_HOST", default=None, metavar="URL",
    help="Act through a running host (its --api value, e.g. unix:/run/bt.sock); "
         "DISK is then the disk's name on the host. Also BLOCKTRAIL_HOST.")


def on_disk(disk: str, host: str | None, local: Callable[[Disk], T],
            remote: Callable[[HostClient], T]) -> T:
    """Run ``local`` on the opened disk directory, or ``remote`` against the host."""
    if host is None:
        with Disk.open(disk) as d:
            return local(d)
    client = HostClient.from_env(host)
    try:
        return remote(client)
    finally:
        client.close()


def call(method: str, path: str, **kwargs: Any) -> Callable[[HostClient], Any]:
    return lambda client: client.call(method, path, **kwargs)
