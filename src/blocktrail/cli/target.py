"""A disk named on the command line: a local directory, or NAME on a host (--host)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from blocktrail.disk import Disk
from blocktrail.errors import InvalidArgument
from blocktrail.host.client import HostClient
from blocktrail.nbd.uri import TlsParameters

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


def nbd_tls_options(fn: Callable[..., T]) -> Callable[..., T]:
    """TLS credentials for reading a host's disks over NBD (an NBD URI carries its own)."""
    fn = click.option("--tls-username", default=None, envvar="BLOCKTRAIL_TLS_USERNAME",
                      metavar="NAME", help="PSK identity (default: your login name).")(fn)
    fn = click.option("--tls-psk-file", default=None, envvar="BLOCKTRAIL_TLS_PSK_FILE",
                      metavar="FILE", help="PSK keys file (username:hexkey lines), for a host "
                                           "whose NBD requires TLS.")(fn)
    fn = click.option("--tls-certificates", default=None, envvar="BLOCKTRAIL_TLS_CERTIFICATES",
                      metavar="DIR", help="x509 client credentials (ca-cert.pem, "
                                          "client-cert.pem, client-key.pem), for a host whose "
                                          "NBD requires TLS.")(fn)
    return fn


def tls_parameters(certificates: str | None, psk_file: str | None,
                   username: str | None) -> TlsParameters | None:
    if certificates and psk_file:
        raise InvalidArgument("give --tls-certificates or --tls-psk-file, not both")
    if not (certificates or psk_file):
        if username:
            raise InvalidArgument("--tls-username goes with --tls-psk-file")
        return None
    return TlsParameters(certificates, psk_file, username)

