"""A disk on a blocktrail host as a backup source: snapshots through the control API, data and
changed areas over NBD, the way a backup application talks to a remote hypervisor.

Each snapshot is read from the export ``NAME@SNAPSHOT``: data and ``base:allocation`` on one set
of connections, and the areas changed since a change ID from the meta context
``qemu:dirty-bitmap:CHANGE_ID`` on a connection of its own (the host answers a change ID it
cannot vouch for with an error reply, which must not spoil the data connections). That error
becomes `DirtyBitmapUnavailable` (a ChangeIdError), so the engine reads everything and records
the host's reason. The NBD endpoint comes from the API (``GET /host``).
"""

from __future__ import annotations

import threading
from typing import Any, Protocol
from urllib.parse import quote

from blocktrail.backup.source import DirtyBitmapUnavailable, SourceSnapshot
from blocktrail.backup.sources.nbd import CONNECTIONS, allocated_areas, dirty_page
from blocktrail.errors import SnapshotNotFound
from blocktrail.extents import Extent
from blocktrail.nbd.blocking import BlockingNbdClient
from blocktrail.nbd.proto.constants import BASE_ALLOCATION, DIRTY_BITMAP_PREFIX
from blocktrail.nbd.proto.errors import ServerUnreachable, TlsError
from blocktrail.nbd.uri import NbdEndpoint, NbdUri, TlsParameters
from blocktrail.tracking import DiskChangeInfo

ANY_ADDRESS = ("0.0.0.0", "::", "")


class TlsCredentialsMissing(TlsError):
    """The host requires TLS on NBD and no credentials were given."""


class ControlApi(Protocol):
    """What this source needs of the host's API client (`blocktrail.host.client.HostClient`):
    one call that returns the decoded JSON body or raises the typed error the host named."""

    def call(self, method: str, path: str, **kwargs: Any) -> Any: ...


class HostDiskSource:
    """Back up the disk ``disk`` of the host behind ``api``. ``api_host``: the API's host name,
    used when the host's NBD listens on every address (0.0.0.0 or ::); ``nbd``: an NBD endpoint
    to use instead of the one the host announces."""

    def __init__(self, api: ControlApi, disk: str, *, api_host: str | None = None,
                 nbd: NbdEndpoint | None = None, connections: int = CONNECTIONS,
                 tls: TlsParameters | None = None) -> None:
        self._api = api
        self._disk = disk
        self._path = f"/disks/{quote(disk, safe='')}"
        info = api.call("GET", self._path)
        self._disk_id = str(info["disk_id"])
        self._granularity = int(info["granularity"])
        self._endpoint = nbd or _announced_endpoint(api.call("GET", "/host"), api_host,
                                                    tls=tls is not None)
        self._tls = tls
        self._connections = connections
        self._lock = threading.Lock()
        self._data: dict[str, BlockingNbdClient] = {}
        self._dirty: dict[tuple[str, str], BlockingNbdClient] = {}

    @property
    def disk_id(self) -> str:
        return self._disk_id

    @property
    def granularity(self) -> int:
        return self._granularity

    @property
    def nbd_endpoint(self) -> NbdEndpoint:
        return self._endpoint

    def _export(self, snapshot: str) -> NbdUri:
        return NbdUri(self._endpoint, f"{self._disk}@{snapshot}", self._tls)

    # ------------------------------------------------------------------ snapshots (the API)

    def create_snapshot(self, name: str) -> SourceSnapshot:
        snap = self._api.call("POST", f"{self._path}/snapshots", json={"name": name})
        return _snapshot(snap)

    def existing_snapshot(self, name: str) -> SourceSnapshot:
        for snap in self._api.call("GET", f"{self._path}/snapshots"):
            if snap["name"] == name:
                return _snapshot(snap)
        raise SnapshotNotFound(f"disk {self._disk} has no snapshot {name!r}")

    def remove_snapshot(self, name: str) -> None:
        self._close_snapshot(name)
        self._api.call("DELETE", f"{self._path}/snapshots/{quote(name, safe='')}")

    # ------------------------------------------------------------------ data (NBD)

    def _data_client(self, snapshot: str) -> BlockingNbdClient:
        with self._lock:
            client = self._data.get(snapshot)
            if client is None:
                client = BlockingNbdClient.connect(self._export(snapshot),
                                                   contexts=[BASE_ALLOCATION],
                                                   connections=self._connections)
                self._data[snapshot] = client
            return client

    def _dirty_client(self, snapshot: str, change_id: str) -> BlockingNbdClient:
        with self._lock:
            client = self._dirty.get((snapshot, change_id))
            if client is None:
                client = BlockingNbdClient.connect(self._export(snapshot),
                                                   contexts=[DIRTY_BITMAP_PREFIX + change_id])
                self._dirty[(snapshot, change_id)] = client
            return client

    def query_changed_areas(self, change_id: str, start_offset: int,
                            snapshot: str) -> DiskChangeInfo:
        """Areas changed after ``change_id`` up to ``snapshot``, one BLOCK_STATUS answer a
        page; a change ID the host refuses raises `DirtyBitmapUnavailable`."""
        client = self._dirty_client(snapshot, change_id)

        def refusal(context: str, why: str) -> DirtyBitmapUnavailable:
            if why:
                return DirtyBitmapUnavailable(f"the host answered: {why}")
            return DirtyBitmapUnavailable(f"the host's NBD server did not agree to {context}")

        return dirty_page(client, DIRTY_BITMAP_PREFIX + change_id, start_offset, refusal)

    def allocated_areas(self, snapshot: str) -> list[Extent]:
        return allocated_areas(self._data_client(snapshot))

    def pread(self, snapshot: str, count: int, offset: int) -> bytes:
        return self._data_client(snapshot).pread(count, offset)

    def snapshot_size(self, snapshot: str) -> int:
        return self._data_client(snapshot).size_bytes

    def _close_snapshot(self, snapshot: str) -> None:
        with self._lock:
            clients = [self._data.pop(snapshot)] if snapshot in self._data else []
            for key in [k for k in self._dirty if k[0] == snapshot]:
                clients.append(self._dirty.pop(key))
        for client in clients:
            client.close()

    def close(self) -> None:
        """Close the NBD connections (the API client belongs to the caller)."""
        with self._lock:
            clients = [*self._data.values(), *self._dirty.values()]
            self._data.clear()
            self._dirty.clear()
        for client in clients:
            client.close()


def _snapshot(snap: dict[str, Any]) -> SourceSnapshot:
    return SourceSnapshot(str(snap["name"]), str(snap["change_id"]), int(snap["size_bytes"]))


def _announced_endpoint(info: dict[str, Any], api_host: str | None, *,
                        tls: bool) -> NbdEndpoint:
    """The NBD endpoint of ``GET /host``'s answer; one listening on every address is reached
    at the API's host name (or this machine, for an API on a unix socket)."""
    address = info.get("nbd")
    if not address:
        raise ServerUnreachable("the host serves no NBD (start `blocktrail host` with --nbd "
                                "unix:PATH or --nbd tcp:HOST:PORT): backups of a host's disks "
                                "read them over NBD")
    if info.get("tls", "off") == "require" and not tls:
        raise TlsCredentialsMissing(f"the host requires TLS on its NBD endpoint {address}: give "
                                    "TLS credentials (--tls-certificates DIR or --tls-psk-file "
                                    "FILE with --tls-username NAME)")
    endpoint = NbdEndpoint.parse(str(address))
    if endpoint.host is not None and endpoint.host in ANY_ADDRESS:
        endpoint = NbdEndpoint(host=api_host or "localhost", port=endpoint.port)
    return endpoint
