"""`blocktrail host`: run the daemon."""

from __future__ import annotations

import asyncio
import contextlib

import click

from blocktrail.host.daemon import Endpoint, HostConfig, serve


@click.command("host")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Directory holding the disks (DATA/NAME is the disk NAME).")
@click.option("--api", "api", required=True, metavar="unix:PATH|http://HOST:PORT",
              help="Where the control API listens (TCP requires a token: DATA/api-token).")
@click.option("--nbd", "nbd", default=None, metavar="unix:PATH|tcp:HOST:PORT",
              help="Serve the disks over NBD: NAME read-write, NAME@SNAPSHOT read-only.")
@click.option("--token", default=None, envvar="BLOCKTRAIL_TOKEN",
              help="API token for TCP (default: generated into DATA/api-token).")
def host(data_dir: str, api: str, nbd: str | None, token: str | None) -> None:
    """Own the disks under --data; serve the control API (and NBD) until interrupted."""
    config = HostConfig(data_dir, Endpoint.parse(api), token,
                        Endpoint.parse(nbd) if nbd else None)
    click.echo(f"blocktrail host: disks in {data_dir}, API on {config.api}"
               + (f", NBD on {config.nbd}" if config.nbd else ""), err=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config, handle_signals=True))
