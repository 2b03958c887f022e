"""`blocktrail serve REPO POINT... --nbd ENDPOINT`: restore points, read-only, over NBD."""

from __future__ import annotations

import contextlib
import json

import click

from blocktrail.cli.output import human, printable
from blocktrail.cli.password import password_options
from blocktrail.cli.password import sources as password_sources
from blocktrail.nbd.limits import ServerLimits


@click.command("serve")
@click.argument("repo_path", metavar="REPO")
@click.argument("point_ids", metavar="POINT...", nargs=-1, required=True)
@click.option("--nbd", "nbd", required=True, metavar="unix:PATH|tcp:HOST:PORT",
              help="Where to serve NBD (a unix socket is made 0600).")
@click.option("--max-connections", default=ServerLimits().max_connections, show_default=True,
              type=click.IntRange(1, 10_000), help="NBD connections at once.")
@click.option("--json", "as_json", is_flag=True,
              help="Print what is served as one JSON line once it is.")
@password_options
def serve(repo_path: str, point_ids: tuple[str, ...], nbd: str, max_connections: int,
          as_json: bool) -> None:
    """Serve restore points read-only over NBD until interrupted: the export named POINT is
    that restore point's disk image (base:allocation from its holes), fetched from the
    repository chunk by chunk as it is read, every chunk checked. For qemu-img convert,
    nbdcopy, a VM booted on a qcow2 overlay, or mounting a file system to copy single files
    out. Writes are refused (EPERM)."""
    import asyncio

    from blocktrail.backup.pointexport import open_points, serve_catalog, uri
    from blocktrail.host.endpoint import Endpoint

    endpoint = Endpoint.parse(nbd)
    if endpoint.unix_path is None and endpoint.host is None:
        raise click.BadParameter("use unix:PATH or tcp:HOST:PORT", param_hint="--nbd")
    catalog = open_points(repo_path, list(point_ids), password_sources())

    def started() -> None:
        sizes = {p: s.size_bytes for p, s in catalog.sources.items()}
        if as_json:
            exports = {p: {"uri": uri(endpoint, p), "size_bytes": n} for p, n in sizes.items()}
            click.echo(json.dumps({"repository": repo_path, "nbd": nbd, "exports": exports}))
            return
        click.echo(printable(f"blocktrail serve: {len(sizes)} restore point(s) of "
                             f"{repo_path}, read-only, over NBD on {nbd}:"))
        for point_id, size in sizes.items():
            click.echo(printable(f"  {uri(endpoint, point_id)}  ({human(size)})"))

    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_catalog(catalog, endpoint,
                                      limits=ServerLimits(max_connections=max_connections),
                                      started=started))
    finally:
        catalog.close()
