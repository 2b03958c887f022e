"""Export names: ``DISK`` and ``DISK@SNAPSHOT``, each part a valid name (names.py); anything
else, ``DISK@`` above all (a script's ``d0@$SNAP`` with an empty variable), is no export at all,
in the catalog and at NBD negotiation."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest

from blocktrail.disk import Disk
from blocktrail.host.daemon import Endpoint, bind
from blocktrail.host.exports import DiskCatalog
from blocktrail.nbd.blocking import BlockingNbdClient
from blocktrail.nbd.proto.errors import NegotiationRefused
from blocktrail.nbd.server import NbdServer
from blocktrail.nbd.uri import NbdEndpoint, NbdUri

MiB = 1 << 20
SNAPSHOTS = ("s1", "a b", "a%20b", "?x", "#", "é-ü", "x%2Fy")
NOT_EXPORTS = ("d0@", "d0@@", "d0@@s1", "@s1", "@", "", "d0@.", "d0@..", "d0@ s1", "d0@s1 ",
               "d0@s1\n", "d0@s1@s1", "d0@nope", "d1", "../d0", "d0/", "d0 ", " d0", "d0@s1/x",
               "d0@\u202es1", "d0@s\u200b1", "D0", "d0@a%2520b")


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    with Disk.create(tmp_path / "d0", 4 * MiB) as disk:
        disk.pwrite(b"live" * 1024, 0)
        for name in SNAPSHOTS:
            disk.create_snapshot(name)
        yield disk


def test_the_catalog_knows_only_grammatical_names(disk: Disk) -> None:
    catalog = DiskCatalog.of({"d0": disk})
    live = catalog.target("d0")
    assert live is not None and not live.read_only and live.snapshot is None
    for name in SNAPSHOTS:
        target = catalog.target(f"d0@{name}")
        assert target is not None and target.read_only and target.snapshot == name
    for name in NOT_EXPORTS:
        assert catalog.target(name) is None, name
        assert catalog.lookup(name) is None, name
    assert sorted(catalog.names()) == sorted(["d0", *(f"d0@{s}" for s in SNAPSHOTS)])


@pytest.fixture
def served(disk: Disk, tmp_path: Path) -> Iterator[NbdEndpoint]:
    path = str(tmp_path / "nbd.sock")
    loop = asyncio.new_event_loop()
    ready: Future[None] = Future()
    stop = asyncio.Event()

    async def main() -> None:
        server = NbdServer(DiskCatalog.of({"d0": disk}))
        server.listen(bind(Endpoint(unix_path=path)))
        ready.set_result(None)
        await stop.wait()
        await server.close()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    ready.result(10)
    try:
        yield NbdEndpoint(unix_path=path)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        loop.close()


def test_negotiation_refuses_what_is_no_export(served: NbdEndpoint, disk: Disk) -> None:
    for name in ("d0@", "d0@..", "d0@ s1", "@s1", "d0@nope"):
        with pytest.raises(NegotiationRefused, match="no such export"):
            BlockingNbdClient.connect(NbdUri(served, name), timeout=10)
    for name in ("a b", "a%20b", "?x", "#", "é-ü"):
        with BlockingNbdClient.connect(NbdUri(served, f"d0@{name}"), timeout=10) as client:
            assert client.pread(4, 0) == b"live"
            assert client.is_read_only()
