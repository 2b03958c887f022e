"""One disk that cannot be opened hides none of the others: GET /disks lists it with why."""

from __future__ import annotations

from pathlib import Path

from apiclient import api_client
from blocktrail.host.api import create_app
from blocktrail.host.registry import DiskRegistry

MiB = 1 << 20


def test_a_damaged_disk_is_listed_with_why_and_the_others_as_always(tmp_path: Path) -> None:
    data = tmp_path / "data"
    registry = DiskRegistry(str(data))
    client = api_client(create_app(registry))
    for name in ("d0", "d1", "d2"):
        assert client.post("/disks", json={"name": name, "size_bytes": MiB}).status_code == 201
    registry.close()
    (data / "disks" / "d1" / "disk.json").write_text("{ not json")

    registry = DiskRegistry(str(data))
    try:
        client = api_client(create_app(registry))
        answer = client.get("/disks")
        assert answer.status_code == 200
        listed = {d["name"]: d for d in answer.json()}
        assert sorted(listed) == ["d0", "d1", "d2"]
        assert listed["d0"]["size_bytes"] == MiB and listed["d2"]["size_bytes"] == MiB
        assert set(listed["d1"]) == {"name", "error", "message"}
        assert listed["d1"]["error"] == "CorruptMetadata" and "metadata" in \
            listed["d1"]["message"]
        alone = client.get("/disks/d1")
        assert alone.status_code >= 400 and alone.json()["error"] == "CorruptMetadata"
    finally:
        registry.close()
