"""A disk named on the command line: a local directory, or NAME on a host (--host).

A name for a host is checked here (names.py) before anything is sent, and every URL path is
built from percent-encoded segments (`api_path`): ``a%20b`` and ``a b`` are two snapshots.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from blocktrail.errors import InvalidArgument
from blocktrail.host.endpoint import api_path
from blocktrail.names import check_disk_name

if TYPE_CHECKING:  # imported where used: a command loads only what it needs
    from blocktrail.disk import Disk
    from blocktrail.host.client import HostClient
    from blocktrail.nbd.uri import TlsParameters

T = TypeVar("T")

host_option = click.option(
    "--host", "host", envvar="BLOCKTRAIL_HOST", default=None, metavar="URL",
    help="Act through a running host (its --api value, e.g. unix:/run/bt.sock); "
         "DISK is then the disk's name on the host. Also BLOCKTRAIL_HOST.")


def on_disk(disk: str, host: str | None, local: Callable[[Disk], T],
            remote: Callable[[HostClient], T]) -> T:
    """Run ``local`` on the opened disk directory, or ``remote`` against the host (``disk`` is
    then a disk name, checked before anything is sent)."""
    if host is None:
        from blocktrail.disk import Disk
        with Disk.open(disk) as d:
            return local(d)
    check_disk_name(disk)
    return with_host(host, remote)


def with_host(host: str, fn: Callable[[HostClient], T]) -> T:
    from blocktrail.host.client import HostClient
    client = HostClient.from_env(host)
    try:
        return fn(client)
    finally:
        client.close()


def call(method: str, *segments: str, **kwargs: Any) -> Callable[[HostClient], Any]:
    """``method`` on the path of ``segments`` (each percent-encoded), when run."""
    return lambda client: client.call(method, api_path(*segments), **kwargs)


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
    from blocktrail.nbd.uri import TlsParameters
    return TlsParameters(certificates, psk_file, username)

