"""The NBD backup sources without a network: where HostDiskSource finds the host's NBD, the
disk ID NbdExportSource derives from a URI, and which areas a full backup of an export reads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from blocktrail.backup.sources.host import HostDiskSource
from blocktrail.backup.sources.nbd import allocated_areas, default_disk_id
from blocktrail.extents import Extent
from blocktrail.nbd.proto.errors import ServerUnreachable, TlsError
from blocktrail.nbd.uri import NbdEndpoint, NbdUri


class FakeApi:
    def __init__(self, host: dict[str, Any]) -> None:
        self.host = host
        self.calls: list[tuple[str, str]] = []

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        self.calls.append((method, path))
        if path == "/host":
            return self.host
        assert path == "/disks/vm%2F1"  # the name is quoted into the path
        return {"disk_id": "id-1", "granularity": 65536}


@pytest.mark.parametrize(("announced", "api_host", "expected"), [
    ("unix:/run/bt-nbd.sock", None, NbdEndpoint(unix_path="/run/bt-nbd.sock")),
    ("tcp:10.1.2.3:10809", "api.example", NbdEndpoint(host="10.1.2.3")),
    ("tcp:0.0.0.0:10809", "api.example", NbdEndpoint(host="api.example")),
    ("tcp:[::]:7000", "api.example", NbdEndpoint(host="api.example", port=7000)),
    ("tcp:0.0.0.0:10809", None, NbdEndpoint(host="localhost")),
])
def test_the_hosts_nbd_endpoint(announced: str, api_host: str | None,
                                expected: NbdEndpoint) -> None:
    api = FakeApi({"version": "0", "nbd": announced, "tls": "off"})
    source = HostDiskSource(api, "vm/1", api_host=api_host)
    assert source.nbd_endpoint == expected
    assert (source.disk_id, source.granularity) == ("id-1", 65536)
    source.close()


def test_a_host_without_nbd_or_requiring_tls_is_refused_with_the_reason() -> None:
    with pytest.raises(ServerUnreachable, match="--nbd"):
        HostDiskSource(FakeApi({"version": "0", "nbd": None, "tls": "off"}), "vm/1")
    with pytest.raises(TlsError, match="requires TLS"):
        HostDiskSource(FakeApi({"version": "0", "nbd": "unix:/s", "tls": "require"}), "vm/1")
    allowed = HostDiskSource(FakeApi({"version": "0", "nbd": "unix:/s", "tls": "allow"}), "vm/1")
    assert allowed.nbd_endpoint == NbdEndpoint(unix_path="/s")


def test_default_disk_ids_name_the_export_not_how_it_was_spelled(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    relative = NbdUri.parse("nbds+unix:///disk0?socket=nbd.sock&tls-psk-file=/k")
    assert default_disk_id(relative) == \
        f"nbd+unix:///disk0?socket={os.path.join(os.fspath(tmp_path), 'nbd.sock')}"
    assert default_disk_id(NbdUri.parse("nbd://Backup-Host/vm%201")) == \
        "nbd://backup-host:10809/vm%201"


class FakeAllocation:
    """A BlockingNbdClient that answers ``base:allocation`` with fixed extents."""

    def __init__(self, extents: list[tuple[int, int, int]]) -> None:
        self._extents = extents
        self.size_bytes = sum(length for _, length, _ in extents)

    def can_meta_context(self, context: str) -> bool:
        return context == "base:allocation"

    def extents(self, context: str) -> list[tuple[int, int, int]]:
        return self._extents


def test_only_areas_reported_as_zeros_are_left_out_of_a_full_backup() -> None:
    """NBD_STATE_HOLE without NBD_STATE_ZERO has undefined contents: it must be read."""
    nbd = FakeAllocation([(0, 4096, 0), (4096, 4096, 1), (8192, 4096, 3), (12288, 4096, 2),
                          (16384, 4096, 0)])
    areas = allocated_areas(nbd)  # type: ignore[arg-type]
    assert areas == [Extent(0, 8192), Extent(16384, 4096)]
