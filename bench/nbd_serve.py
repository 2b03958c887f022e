"""Serve one disk directory over NBD until SIGTERM, optionally with tracking switched off: the
baseline of the tracking-cost benchmark (the host always tracks).

    python -m bench.nbd_serve DISK_DIR SOCKET [--no-tracking]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

from bench.disk_bench import NoTracking
from blocktrail.disk import Disk
from blocktrail.host.daemon import Endpoint, bind
from blocktrail.host.exports import DiskCatalog
from blocktrail.nbd.server import NbdServer
from blocktrail.tracking import ChangeTracker


async def serve(disk: Disk, name: str, path: str) -> None:
    server = NbdServer(DiskCatalog.of({name: disk}))
    server.listen(bind(Endpoint(unix_path=path)))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("disk_dir")
    parser.add_argument("socket")
    parser.add_argument("--no-tracking", action="store_true")
    args = parser.parse_args()
    tracker: type[ChangeTracker] = NoTracking if args.no_tracking else ChangeTracker
    with Disk.open(args.disk_dir, tracker_class=tracker) as disk:
        asyncio.run(serve(disk, os.path.basename(args.disk_dir.rstrip("/")), args.socket))


if __name__ == "__main__":
    main()
