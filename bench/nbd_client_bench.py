"""Our NBD client against nbdcopy, both reading the same raw image from qemu-nbd.

    .venv/bin/python -m bench.nbd_client_bench [--size-mib 1024] [--json]

qemu-nbd serves the image read-only (``-t -e 8 -r -f raw``); the image is random data (no holes)
and sits in the page cache for every run. Measured: ``nbdcopy URI null:`` (libnbd, C; it uses
four connections when the server allows several, as qemu-nbd does with ``-e 8 -r``); our
asyncio client on one connection reading 4 MiB runs with 8 in flight into reused buffers (no
copies); the blocking facade called from 8 threads, each `pread` returning bytes (what the
backup engine does), on one connection and on four (what NbdExportSource opens when the server
allows several). Each figure is the best of three runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from blocktrail.nbd.blocking import BlockingNbdClient
from blocktrail.nbd.client import NbdClient

RUN = 4 << 20
WORKERS = 8


def best_of(runs: int, fn: Callable[[], None]) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def nbdcopy(uri: str) -> None:
    subprocess.run(["nbdcopy", uri, "null:"], check=True)


def async_client(uri: str) -> None:
    async def main() -> None:
        client = await NbdClient.connect(uri)
        size = client.size_bytes

        async def worker(first: int) -> None:
            buffer = bytearray(RUN)
            for offset in range(first * RUN, size, WORKERS * RUN):
                await client.pread_into(memoryview(buffer)[: min(RUN, size - offset)], offset)

        await asyncio.gather(*(worker(i) for i in range(WORKERS)))
        await client.close()

    asyncio.run(main())


def blocking_client(uri: str, connections: int = 1) -> None:
    with BlockingNbdClient.connect(uri, connections=connections) as nbd:
        size = nbd.size_bytes

        def worker(first: int) -> None:
            for offset in range(first * RUN, size, WORKERS * RUN):
                nbd.pread(min(RUN, size - offset), offset)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(WORKERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    missing = [t for t in ("qemu-nbd", "nbdcopy") if shutil.which(t) is None]
    if missing:
        print(f"missing {missing} (Debian packages qemu-utils, libnbd-bin)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as work:
        image, sock = Path(work) / "image.raw", Path(work) / "nbd.sock"
        with open(image, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        image.read_bytes()  # into the page cache
        server = subprocess.Popen(["qemu-nbd", "-t", "-e", "8", "-r", "-f", "raw", "-x", "d",
                                   "-k", str(sock), str(image)])
        try:
            while not sock.exists():
                time.sleep(0.05)
            uri = f"nbd+unix:///d?socket={sock}"
            size = args.size_mib << 20
            runs: dict[str, Callable[[], None]] = {
                "nbdcopy": lambda: nbdcopy(uri),
                "async_pread_into": lambda: async_client(uri),
                "blocking_pread_8_threads": lambda: blocking_client(uri),
                "blocking_pread_4_connections": lambda: blocking_client(uri, 4)}
            results = {name: size / best_of(3, fn) / 1e6 for name, fn in runs.items()}
        finally:
            server.terminate()
            server.wait()
    if args.json:
        print(json.dumps({k: round(v) for k, v in results.items()}))
    else:
        for name, rate in results.items():
            print(f"{name:30} {rate:8.0f} MB/s  ({rate / results['nbdcopy']:.2f} x nbdcopy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
