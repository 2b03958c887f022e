"""Names through the control API: every name (body, path, query) checked by the one grammar
before anything changes; a refused name is a 4xx JSON error that changed NOTHING; a valid one,
however odd (``a%20b``, ``?x``, ``#``), is one path segment and round-trips unchanged; answers
never fail to serialize after a change; errors keep their JSON shape and their status (507 for a
full file system, 409 for busy)."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from apiclient import api_client
from blocktrail.disk import Disk
from blocktrail.errors import HostBusy, NoSpace
from blocktrail.host.api import create_app
from blocktrail.host.endpoint import api_path
from blocktrail.host.registry import DiskRegistry
from blocktrail.names import (
    DISK_NAME_MAX,
    SNAPSHOT_NAME_MAX,
    is_valid_disk_name,
    is_valid_snapshot_name,
)
from names_strategies import TRICKY_VALID, hostile_names

MiB = 1 << 20
SHARED = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[DiskRegistry]:
    reg = DiskRegistry(str(tmp_path / "data"))
    yield reg
    reg.close()


@pytest.fixture
def client(registry: DiskRegistry) -> TestClient:
    client = api_client(create_app(registry))
    assert client.post("/disks", json={"name": "d0", "size_bytes": MiB}).status_code == 201
    return client


def post_json(client: TestClient, path: str, body: dict[str, Any]) -> Any:
    """A body as any JSON client may send it: lone surrogates as \\ud800 escapes."""
    return client.post(path, content=json.dumps(body).encode(),
                       headers={"Content-Type": "application/json"})


def segment(name: str) -> str:
    """A path segment for any string, even one UTF-8 cannot encode."""
    return quote(name.encode("utf-8", "surrogatepass"), safe="")


def state(registry: DiskRegistry) -> Any:
    """Everything a request could change: the disks, their snapshots and change IDs, the VMs,
    and every file of the data directory (name, size, modification time)."""
    disks = {name: ([(s.name, s.change_id) for s in registry.get(name).snapshots],
                    registry.get(name).current_change_id, registry.get(name).size_bytes)
             for name in registry.names()}
    files = sorted((os.path.relpath(os.path.join(root, f), registry.data_dir),
                    os.stat(os.path.join(root, f)).st_size,
                    os.stat(os.path.join(root, f)).st_mtime_ns)
                   for root, _, names in os.walk(registry.data_dir) for f in names
                   if f != "host.lock")
    return disks, [(vm.name, vm.disks) for vm in registry.vms()], files


def refused(response: Any) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error", "message"} and body["message"], body


# ------------------------------------------------------------------ the reported failures

def test_a_name_json_cannot_carry_as_utf8_is_refused_and_changes_nothing(
        client: TestClient, registry: DiskRegistry) -> None:
    """Once, POST {"name": "\\ud800"} answered 500 but had made and saved the snapshot, and
    the disk could no longer be listed, backed up or have it removed."""
    before = state(registry)
    answer = post_json(client, "/disks/d0/snapshots", {"name": "\ud800"})
    assert answer.status_code == 400 and answer.json()["error"] == "InvalidArgument"
    assert "snapshot name" in answer.json()["message"]
    assert state(registry) == before
    assert [d["name"] for d in client.get("/disks").json()] == ["d0"]
    assert client.get("/disks/d0").json()["snapshots"] == []


def test_a_disk_holding_a_legacy_surrogate_name_lists_and_the_snapshot_can_go(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    DiskRegistry(str(data)).close()
    path = data / "disks" / "d0"
    with Disk.create(path, MiB) as disk:
        disk.pwrite(b"old", 0)
        disk.create_snapshot("PLACEHOLDER")
        disk.pwrite(b"new", 0)
    meta = (path / "disk.json").read_text()
    assert '"PLACEHOLDER"' in meta
    (path / "disk.json").write_text(meta.replace('"PLACEHOLDER"', '"\\ud800"'))  # JSON escape
    registry = DiskRegistry(str(data))
    try:
        client = api_client(create_app(registry))
        listed = client.get("/disks")
        assert listed.status_code == 200
        (snap,) = listed.json()[0]["snapshots"]
        assert is_valid_snapshot_name(snap["name"]) and snap["name"] == "\\ud800"
        assert client.get("/disks/d0").status_code == 200
        removed = client.delete(api_path("disks", "d0", "snapshots", snap["name"]))
        assert removed.status_code == 200, removed.text
        assert client.get("/disks/d0/snapshots").json() == []
        assert registry.get("d0").pread(3, 0) == b"new"
    finally:
        registry.close()


def test_a_name_is_one_path_segment(client: TestClient, registry: DiskRegistry) -> None:
    disk = registry.get("d0")
    for name in ("a b", "a%20b", "x y", "x%20y"):
        disk.pwrite(name.encode().ljust(8), 0)
        assert post_json(client, "/disks/d0/snapshots", {"name": name}).status_code == 201
    disk.pwrite(b"newest!!", 0)
    assert client.delete(api_path("disks", "d0", "snapshots", "a%20b")).status_code == 200
    assert [s.name for s in disk.snapshots] == ["a b", "x y", "x%20y"]
    reverted = client.post(api_path("disks", "d0", "snapshots", "x%20y", "revert"))
    assert reverted.status_code == 200, reverted.text
    assert disk.pread(8, 0) == b"x%20y   "  # not "x y"
    assert [s.name for s in disk.snapshots] == ["a b", "x y", "x%20y"]
    for name in ("?x", "#", "%", "%2F", "a\\b", "é"):
        assert post_json(client, "/disks/d0/snapshots", {"name": name}).status_code == 201
        areas = client.get(api_path("disks", "d0", "changed-areas"),
                           params={"since": "*", "snapshot": name})
        assert areas.status_code == 200, (name, areas.text)
        listed = client.get(api_path("disks", "d0", "snapshots")).json()
        assert listed[-1]["name"] == name
        assert client.delete(api_path("disks", "d0", "snapshots", name)).json() == {
            "removed": name}


@pytest.mark.parametrize("name", [".", ".."])
def test_dot_names_are_refused_wherever_they_appear(client: TestClient, registry: DiskRegistry,
                                                    name: str) -> None:
    before = state(registry)
    refused(post_json(client, "/disks/d0/snapshots", {"name": name}))
    for path in (f"/disks/d0/snapshots/{quote(name, safe='')}",
                 f"/disks/d0/snapshots/{name.replace('.', '%2E')}"):
        refused(client.delete(path))
        refused(client.post(path + "/revert"))
    assert state(registry) == before


# ------------------------------------------------------------------ every name, every endpoint

def _name_requests(client: TestClient, name: str,
                   image: str) -> list[tuple[str, Callable[[], Any], bool]]:
    """(what, the request, whether the grammar allows ``name`` there) for every place a name
    goes, each request one that would change something if the name were taken."""
    seg = segment(name)
    snap_ok, disk_ok = is_valid_snapshot_name(name), is_valid_disk_name(name)
    return [
        ("create disk", lambda: post_json(client, "/disks", {"name": name, "size_bytes": 65536}),
         disk_ok),
        ("import disk", lambda: post_json(client, "/disks/import",
                                          {"name": name, "source_path": image}), disk_ok),
        ("define VM", lambda: post_json(client, "/vms", {"name": name, "disks": ["d0"]}),
         disk_ok),
        ("VM of disk", lambda: post_json(client, "/vms", {"name": "vm9", "disks": [name]}),
         False),
        ("snapshot", lambda: post_json(client, "/disks/d0/snapshots", {"name": name}), snap_ok),
        ("VM snapshot", lambda: post_json(client, "/vms/vm1/snapshots", {"name": name}),
         snap_ok),
        ("remove", lambda: client.delete(f"/disks/d0/snapshots/{seg}"), False),
        ("revert", lambda: client.post(f"/disks/d0/snapshots/{seg}/revert"), False),
        ("remove VM snapshot", lambda: client.delete(f"/vms/vm1/snapshots/{seg}"), False),
        ("resize", lambda: post_json(client, f"/disks/{seg}/resize", {"size_bytes": 65536}),
         False),
        ("reset", lambda: client.post(f"/disks/{seg}/tracking/reset"), False),
        ("VM snapshot of", lambda: post_json(client, f"/vms/{seg}/snapshots", {"name": "s"}),
         False),
        ("changed areas", lambda: client.get(f"/disks/d0/changed-areas?since=*&snapshot={seg}"),
         False),
    ]


@given(name=hostile_names())
@settings(max_examples=150, deadline=None, suppress_health_check=SHARED)
def test_hostile_names_change_nothing_and_valid_ones_round_trip(
        client: TestClient, registry: DiskRegistry, tmp_path: Path, name: str) -> None:
    image = tmp_path / "image.raw"
    if not image.exists():
        image.write_bytes(b"\x05" * 65536)
        assert post_json(client, "/vms", {"name": "vm1", "disks": ["d0"]}).status_code == 201
    if is_valid_disk_name(name) or name in ("d0", "vm1", "s"):
        return  # a taken or real name: the round trips below cover those
    before = state(registry)
    for what, request, allowed in _name_requests(client, name, str(image)):
        response = request()
        if allowed:  # a valid snapshot name: it is taken whole, then given back
            assert response.status_code == 201, (what, name, response.text)
            if what == "snapshot":
                assert response.json()["name"] == name
                removed = client.delete(api_path("disks", "d0", "snapshots", name))
            else:
                assert set(response.json()["snapshots"]) == {"d0"}
                removed = client.delete(api_path("vms", "vm1", "snapshots", name))
            assert removed.status_code == 200 and removed.json() == {"removed": name}
            before = state(registry)  # change IDs moved on, and that is all
            continue
        refused(response)
        assert state(registry) == before, (what, name)


@given(name=hostile_names())
@settings(max_examples=150, deadline=None, suppress_health_check=SHARED)
def test_disk_names_round_trip_or_change_nothing(client: TestClient, registry: DiskRegistry,
                                                 name: str) -> None:
    before = state(registry)
    if name == "d0":
        return
    created = post_json(client, "/disks", {"name": name, "size_bytes": 65536})
    if not is_valid_disk_name(name):
        refused(created)
        if name not in (".", ".."):  # dot segments: /disks/.. is /, /disks/. is /disks/
            refused(client.get(f"/disks/{segment(name)}"))
        assert state(registry) == before, name
        return
    if created.status_code == 409:  # generated twice
        return
    assert created.status_code == 201 and created.json()["name"] == name
    assert client.get(api_path("disks", name)).json()["name"] == name
    assert name in [d["name"] for d in client.get("/disks").json()]


# ------------------------------------------------------------------ errors keep their shape

def test_errors_map_to_their_status_and_keep_their_shape(
        client: TestClient, registry: DiskRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    cases = [(NoSpace("the file system is full"), 507, "NoSpace"),
             (HostBusy("served elsewhere"), 409, "HostBusy"),
             (OSError(errno.ENOSPC, "No space left on device"), 507, "NoSpace"),
             (OSError(errno.EDQUOT, "Disk quota exceeded"), 507, "NoSpace"),
             (OSError(errno.EIO, "Input/output error"), 500, "DiskIOFailure")]
    for error, status, kind in cases:
        def fail(*_args: object, _error: BaseException = error) -> None:
            raise _error

        monkeypatch.setattr(registry, "create", fail)
        answer = client.post("/disks", json={"name": "d1", "size_bytes": 65536})
        assert answer.status_code == status and answer.json()["error"] == kind, answer.text
        assert answer.json()["message"]


def test_a_bug_is_a_json_500(registry: DiskRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> list[str]:
        raise RuntimeError("something nobody expected")

    monkeypatch.setattr(registry, "names", broken)
    answer = api_client(create_app(registry), raise_server_exceptions=False).get("/disks")
    assert answer.status_code == 500
    assert answer.json() == {"error": "InternalError", "message": "GET /disks: RuntimeError: "
                             "something nobody expected (a bug in the host)"}


def test_answers_are_ascii_json(client: TestClient) -> None:
    assert post_json(client, "/disks/d0/snapshots", {"name": "日本語"}).status_code == 201
    raw = client.get("/disks/d0/snapshots").content
    assert raw.isascii() and json.loads(raw)[0]["name"] == "日本語"


def test_the_document_states_the_grammar(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    snapshot = schemas["SnapshotCreate"]["properties"]["name"]
    assert snapshot["maxLength"] == SNAPSHOT_NAME_MAX and snapshot["minLength"] == 1
    assert snapshot["format"] == "blocktrail-snapshot-name" and snapshot["pattern"]
    assert "printable" in snapshot["description"]
    disk = schemas["DiskCreate"]["properties"]["name"]
    assert disk["maxLength"] == DISK_NAME_MAX and disk["format"] == "blocktrail-disk-name"
    for path, param in (("/disks/{name}/snapshots/{snapshot}", "snapshot"),
                        ("/vms/{vm}/snapshots/{snapshot}", "vm")):
        (parameter,) = [p for p in doc["paths"][path]["delete"]["parameters"]
                        if p["name"] == param]
        assert parameter["schema"]["pattern"] and parameter["schema"]["format"]
    for name in TRICKY_VALID:  # the pattern lets every valid name through
        import re
        assert re.fullmatch(snapshot["pattern"].strip("^$"), name), name
