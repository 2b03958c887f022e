"""`blocktrail host`: run the daemon."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import click

from blocktrail.cli.output import parse_size, printable
from blocktrail.cli.password import password_options
from blocktrail.cli.password import sources as password_sources
from blocktrail.errors import InvalidArgument
from blocktrail.nbd.limits import ServerLimits

if TYPE_CHECKING:  # the server side is imported when the host starts, not for --help
    from blocktrail.host.daemon import HostConfig
    from blocktrail.nbd.tls import TlsConfig


@click.command("host")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="The host's data directory (DATA/disks/NAME is the disk NAME); one host "
                   "at a time.")
@click.option("--api", "api", required=True, metavar="unix:PATH|http://HOST:PORT",
              help="Where the control API listens (TCP requires a token: DATA/api-token).")
@click.option("--nbd", "nbd", default=None, metavar="unix:PATH|tcp:HOST:PORT",
              help="Serve the disks over NBD: NAME read-write, NAME@SNAPSHOT read-only.")
@click.option("--token", default=None, envvar="BLOCKTRAIL_TOKEN",
              help="API token for TCP (default: generated into DATA/api-token).")
@click.option("--tls", "tls_mode", type=click.Choice(["off", "allow", "require"]), default=None,
              help="NBD STARTTLS: require (refuse every option before STARTTLS, the default "
                   "with credentials), allow, or off (the default without).")
@click.option("--tls-creds", "tls_creds", default=None, type=click.Path(file_okay=False),
              help="x509 credentials directory (QEMU's layout: ca-cert.pem, server-cert.pem, "
                   "server-key.pem).")
@click.option("--tls-psk", "tls_psk", default=None, type=click.Path(),
              help="PSK keys file (psktool's username:hexkey lines) or a directory holding "
                   "keys.psk.")
@click.option("--tls-verify-client", is_flag=True,
              help="x509: require a client certificate signed by ca-cert.pem.")
@click.option("--repo", "repositories", multiple=True, type=click.Path(file_okay=False),
              metavar="PATH|s3://BUCKET/PREFIX",
              help="A repository the web console shows restore points of and backs up into "
                   "(repeatable).")
@click.option("--backup-bandwidth", default=None, metavar="SIZE",
              help="Read at most SIZE bytes a second (e.g. 50M) in the console's backups.")
@click.option("--max-connections", default=ServerLimits().max_connections, show_default=True,
              type=click.IntRange(1, 10_000), help="NBD connections at once.")
@password_options
def host(data_dir: str, api: str, nbd: str | None, token: str | None, tls_mode: str | None,
         tls_creds: str | None, tls_psk: str | None, tls_verify_client: bool,
         repositories: tuple[str, ...], backup_bandwidth: str | None,
         max_connections: int) -> None:
    """Own the disks under --data; serve the control API (and NBD) until interrupted."""
    import asyncio

    from blocktrail.host.daemon import Endpoint, HostConfig
    from blocktrail.nbd.proto import TlsMode

    tls = _tls_config(tls_creds, tls_psk, tls_verify_client)
    mode = TlsMode[(tls_mode or ("require" if tls else "off")).upper()]
    if mode is not TlsMode.OFF and tls is None:
        raise InvalidArgument(f"--tls={tls_mode} needs --tls-creds DIR or --tls-psk FILE")
    if nbd is None and tls is not None:
        raise InvalidArgument("TLS credentials are for NBD: give --nbd as well")
    config = HostConfig(data_dir, Endpoint.parse(api), token,
                        Endpoint.parse(nbd) if nbd else None, mode, tls,
                        ServerLimits(max_connections=max_connections), repositories,
                        parse_size(backup_bandwidth) if backup_bandwidth else None,
                        password_sources())
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_and_tell(config))


async def _serve_and_tell(config: HostConfig) -> None:
    """Serve; once the host has its data directory and its sockets, say where."""
    import asyncio

    from blocktrail.host.daemon import serve

    started = asyncio.Event()
    serving = asyncio.create_task(serve(config, started, handle_signals=True))
    told = asyncio.create_task(started.wait())
    await asyncio.wait([serving, told], return_when=asyncio.FIRST_COMPLETED)
    told.cancel()
    if started.is_set():
        click.echo(printable(
            f"blocktrail host: disks in {config.data_dir}, API on {config.api} (console at "
            f"/console, metrics at /metrics)"
            + (f", NBD on {config.nbd} (TLS {config.nbd_tls_mode.name.lower()})"
               if config.nbd else "")), err=True)
    await serving


def _tls_config(creds: str | None, psk: str | None, verify_client: bool) -> TlsConfig | None:
    from blocktrail.nbd.tls import TlsConfig

    if creds and psk:
        raise InvalidArgument("give --tls-creds or --tls-psk, not both")
    if creds:
        return TlsConfig.x509(creds, verify_client=verify_client)
    if psk:
        if verify_client:
            raise InvalidArgument("--tls-verify-client is for x509 credentials")
        return TlsConfig.psk(psk)
    return None
