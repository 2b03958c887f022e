"""The control API: disks, snapshots, changed areas, VMs, errors, token auth."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from blocktrail.host.api import create_app
from blocktrail.host.registry import DiskRegistry

TOKEN = "s3cret-token"


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[DiskRegistry]:
    reg = DiskRegistry(str(tmp_path / "data"))
    yield reg
    reg.close()


@pytest.fixture
def client(registry: DiskRegistry) -> TestClient:
    return TestClient(create_app(registry, TOKEN),
                      headers={"Authorization": f"Bearer {TOKEN}"})


def test_token_is_required(registry: DiskRegistry) -> None:
    anonymous = TestClient(create_app(registry, TOKEN))
    response = anonymous.get("/disks")
    assert response.status_code == 401
    assert response.json()["error"] == "Unauthorized"
    wrong = TestClient(create_app(registry, TOKEN), headers={"Authorization": "Bearer nope"})
    assert wrong.get("/disks").status_code == 401


def test_disk_lifecycle_and_changed_areas(client: TestClient, registry: DiskRegistry) -> None:
    created = client.post("/disks", json={"name": "d0", "size_bytes": 1 << 20,
                                          "granularity": 4096})
    assert created.status_code == 201
    start = created.json()["current_change_id"]
    registry.get("d0").pwrite(b"x" * 5000, 4096)
    snap = client.post("/disks/d0/snapshots", json={"name": "s1"})
    assert snap.status_code == 201
    listed = client.get("/disks/d0/snapshots").json()
    assert [s["name"] for s in listed] == ["s1"]
    assert set(listed[0]) >= {"name", "change_id", "created_at"}
    areas = client.get("/disks/d0/changed-areas", params={"since": start, "snapshot": "s1"})
    assert areas.json()["changed_areas"] == [{"offset": 4096, "length": 8192}]
    assert client.get("/disks/d0/changed-areas", params={"since": "*"}).json()[
        "changed_areas"] == [{"offset": 4096, "length": 8192}]
    assert client.post("/disks/d0/resize", json={"size_bytes": 2 << 20}).status_code == 200
    grown = client.get("/disks/d0/changed-areas", params={"since": snap.json()["change_id"]})
    assert grown.json()["changed_areas"] == [{"offset": 1 << 20, "length": 1 << 20}]
    assert client.delete("/disks/d0/snapshots/s1").status_code == 200
    reset = client.post("/disks/d0/tracking/reset").json()["change_id"]
    stale = client.get("/disks/d0/changed-areas", params={"since": start})
    assert stale.status_code == 422 and stale.json()["error"] == "StaleChangeId"
    assert client.get("/disks/d0/changed-areas", params={"since": reset}).status_code == 200


def test_errors_are_typed(client: TestClient) -> None:
    assert client.get("/disks/nope").status_code == 404
    client.post("/disks", json={"name": "d0", "size_bytes": 65536})
    assert client.post("/disks", json={"name": "d0", "size_bytes": 65536}).status_code == 409
    assert client.post("/disks", json={"name": "../x", "size_bytes": 1}).status_code == 400
    bad = client.get("/disks/d0/changed-areas", params={"since": "garbage"})
    assert bad.status_code == 422 and bad.json()["error"] == "InvalidChangeId"
    past_end = client.get("/disks/d0/changed-areas", params={"since": "*", "start_offset": 65536})
    assert past_end.status_code == 416
    assert client.delete("/disks/d0/snapshots/none").status_code == 404


def test_vm_snapshot_is_taken_on_every_disk(client: TestClient, registry: DiskRegistry) -> None:
    for name in ("a", "b"):
        client.post("/disks", json={"name": name, "size_bytes": 1 << 20})
    assert client.post("/vms", json={"name": "vm1", "disks": ["a", "b"]}).status_code == 201
    taken = client.post("/vms/vm1/snapshots", json={"name": "nightly"})
    assert taken.status_code == 201
    assert set(taken.json()["snapshots"]) == {"a", "b"}
    assert [s.name for s in registry.get("b").snapshots] == ["nightly"]
    # a name clash on one disk leaves no half-taken VM snapshot behind
    registry.get("b").create_snapshot("clash")
    failed = client.post("/vms/vm1/snapshots", json={"name": "clash"})
    assert failed.status_code == 409
    assert [s.name for s in registry.get("a").snapshots] == ["nightly"]
    assert client.delete("/vms/vm1/snapshots/nightly").status_code == 200
    assert registry.get("a").snapshots == []


def test_openapi_document(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    assert "/disks/{name}/changed-areas" in doc["paths"]


@pytest.mark.parametrize(("path", "body", "wrong"), [
    ("/disks", {"name": "d1", "size_bytes": 1 << 20, "granularty": 4096}, "granularty"),
    ("/disks", {"name": "d1", "size_bytes": "1048576"}, "size_bytes"),
    ("/disks", {"name": "d1", "size_bytes": 1.5}, "size_bytes"),
    ("/disks", {"name": "d1", "size_bytes": True}, "size_bytes"),
    ("/disks/import", {"name": "d1", "source_path": "/dev/null", "sparse": True}, "sparse"),
    ("/disks/d0/resize", {"size_bytes": 2 << 20, "shrink": True}, "shrink"),
    ("/disks/d0/snapshots", {"name": "s1", "description": "x"}, "description"),
    ("/vms", {"name": "v", "disks": ["d0"], "disk": "d0"}, "disk"),
    ("/vms/v0/snapshots", {"name": "s1", "quiesce": True}, "quiesce"),
])
def test_unknown_keys_and_values_of_another_type_are_refused(
        client: TestClient, registry: DiskRegistry, path: str, body: dict[str, object],
        wrong: str) -> None:
    """A typo or a value of another JSON type is a 400 naming it; nothing is changed."""
    assert client.post("/disks", json={"name": "d0", "size_bytes": 1 << 20}).status_code == 201
    assert client.post("/vms", json={"name": "v0", "disks": ["d0"]}).status_code == 201
    answer = client.post(path, json=body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "InvalidArgument" and wrong in answer.json()["message"]
    assert registry.names() == ["d0"] and registry.get("d0").size_bytes == 1 << 20
    assert registry.get("d0").snapshots == []
    assert [vm.name for vm in registry.vms()] == ["v0"]


def test_a_whole_number_may_be_written_with_a_fraction_of_zero(client: TestClient) -> None:
    made = client.post("/disks", json={"name": "d0", "size_bytes": 1048576.0,
                                       "granularity": 4096.0})
    assert made.status_code == 201, made.text
    assert (made.json()["size_bytes"], made.json()["granularity"]) == (1 << 20, 4096)
