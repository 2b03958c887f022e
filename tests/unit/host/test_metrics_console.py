"""The host's /metrics (parsed by Prometheus' parser) and its console through the ASGI app:
token and cookie, forms refused without their token, the buttons, the pages."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from apiclient import UvicornPaths
from blocktrail.backup.engine import BackupOptions, run_backup
from blocktrail.backup.sources.local import LocalDiskSource
from blocktrail.host.api import create_app
from blocktrail.host.metrics import reset_reason
from blocktrail.host.registry import DiskRegistry
from blocktrail.repo import Repository
from s3server import TEST_ENCRYPTION, TEST_PASSWORD, SeaweedFS

TOKEN = "console-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[TestClient, DiskRegistry, Path]]:
    repo = tmp_path / "repo"
    Repository.init(repo, encryption=TEST_ENCRYPTION).close()
    registry = DiskRegistry(str(tmp_path / "data"))
    app = create_app(registry, TOKEN, repositories=(str(repo),))
    try:
        yield TestClient(UvicornPaths(app), base_url="http://testserver"), registry, repo
    finally:
        app.state.catalog.close()
        registry.close()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_follow_the_disks(setup: tuple[TestClient, DiskRegistry, Path]) -> None:
    client, registry, repo = setup
    assert client.get("/metrics").status_code == 401
    client.post("/disks", json={"name": "d0", "size_bytes": 1 << 20}, headers=AUTH)
    disk = registry.get("d0")
    disk.pwrite(b"x" * 8192, 0)
    disk.pread(4096, 0)
    client.post("/disks/d0/snapshots", json={"name": "s1"}, headers=AUTH)
    client.delete("/disks/d0/snapshots/s1", headers=AUTH)
    client.post("/disks/d0/tracking/reset", headers=AUTH)
    with Repository.open(repo, password=TEST_PASSWORD) as r:
        point = run_backup(LocalDiskSource(disk), r, BackupOptions()).point
    got = samples(client.get("/metrics", headers=AUTH).text)
    d0 = (("disk", "d0"),)
    assert got[("blocktrail_disk_written_bytes_total", d0)] == 8192
    assert got[("blocktrail_disk_read_bytes_total", d0)] >= 4096
    assert got[("blocktrail_disk_intent_flushes_total", d0)] >= 1
    assert got[("blocktrail_disk_snapshots_created_total", d0)] == 1
    assert got[("blocktrail_disk_consolidation_seconds_count", d0)] == 1
    assert got[("blocktrail_disk_tracking_resets_total", (("disk", "d0"),
                                                           ("reason", "request")))] == 1
    assert got[("blocktrail_disk_snapshots", d0)] == 0
    assert got[("blocktrail_host_disks", ())] == 1
    where = (("disk", "d0"), ("repository", str(repo)))
    assert got[("blocktrail_disk_restore_points", where)] == 1
    assert got[("blocktrail_disk_last_backup_timestamp_seconds", where)] == \
        pytest.approx(point.created.timestamp())
    assert "/metrics" not in client.get("/openapi.json", headers=AUTH).json()["paths"]


def test_reset_reasons_are_few_labels() -> None:
    assert reset_reason("tracking reset by request") == "request"
    assert reset_reason("unclean shutdown and the write-intent log is unreadable (x)") == \
        "unclean_shutdown"
    assert reset_reason("disk file base.raw was changed outside blocktrail since ...") == \
        "changed_outside"
    assert reset_reason("reverted to snapshot 's'") == "revert"
    assert reset_reason("something new") == "other"


def _csrf(page: str) -> str:
    marker = 'name="csrf" value="'
    start = page.index(marker) + len(marker)
    return page[start: page.index('"', start)]


def test_console_login_cookie_and_buttons(setup: tuple[TestClient, DiskRegistry, Path]) -> None:
    client, registry, repo = setup
    client.post("/disks", json={"name": "d0", "size_bytes": 1 << 20}, headers=AUTH)
    refused = client.get("/console/")
    assert refused.status_code == 401 and 'name="token"' in refused.text
    assert client.post("/console/login", data={"token": "nope"}).status_code == 401
    login = client.post("/console/login", data={"token": TOKEN, "next": "/console/"},
                        follow_redirects=False)
    assert login.status_code == 303
    cookie = login.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and TOKEN not in cookie
    page = client.get("/console/")
    assert page.status_code == 200 and "d0" in page.text
    csrf = _csrf(page.text)
    stale = client.post("/console/disks/d0/snapshot", data={"snapshot": "s", "csrf": "x"},
                        headers={"X-Console": "fetch"})
    assert stale.status_code == 403
    taken = client.post("/console/disks/d0/snapshot", data={"snapshot": "s1", "csrf": csrf},
                        headers={"X-Console": "fetch"})
    assert taken.status_code == 201 and taken.json()["ok"]
    assert [s.name for s in registry.get("d0").snapshots] == ["s1"]
    again = client.post("/console/disks/d0/snapshot", data={"snapshot": "s1", "csrf": csrf,
                                                            "next": "/console/disks/d0"},
                        follow_redirects=False)
    assert again.status_code == 303 and "SnapshotExists" in again.headers["location"]
    bad = client.post("/console/disks/d0/snapshot", data={"snapshot": "a/b", "csrf": csrf},
                      headers={"X-Console": "fetch"})
    assert bad.status_code == 400 and not bad.json()["ok"]
    started = client.post("/console/disks/d0/backup", data={"repository": "0", "csrf": csrf},
                          headers={"X-Console": "fetch"})
    assert started.status_code == 202, started.text
    _wait_finished(client)
    with Repository.open(repo, password=TEST_PASSWORD) as r:
        (point,) = r.points()
    disk_page = client.get("/console/disks/d0").text
    assert point.id in disk_page and "no earlier verified restore point" in disk_page
    verify = client.post("/console/verify", data={"repository": "0", "point": point.id,
                                                  "csrf": csrf},
                         headers={"X-Console": "fetch"})
    assert verify.status_code == 202
    assert "intact" in _wait_finished(client) or "equals" in _wait_finished(client)
    missing = client.post("/console/verify", data={"repository": "0", "point": "nope",
                                                   "csrf": csrf}, headers={"X-Console": "fetch"})
    assert missing.status_code == 404
    assert client.post("/console/disks/d0/backup", data={"repository": "7", "csrf": csrf},
                       headers={"X-Console": "fetch"}).status_code == 400
    assert client.get("/console/disks/nope").status_code == 404
    assert client.get("/console/static/console.js").status_code == 200
    client.post("/console/logout")
    assert client.get("/console/").status_code == 401


@pytest.mark.parametrize("index", ["\u00b2", "\u0663", "9" * 5000, "-1", " 0", ""])
def test_a_repository_index_that_is_no_number_is_refused(
        setup: tuple[TestClient, DiskRegistry, Path], index: str) -> None:
    client, _registry, _repo = setup
    client.post("/disks", json={"name": "d0", "size_bytes": 1 << 20}, headers=AUTH)
    csrf = _csrf(client.get("/console/", headers=AUTH).text)
    answer = client.post("/console/disks/d0/backup", data={"repository": index, "csrf": csrf},
                         headers={**AUTH, "X-Console": "fetch"})
    assert answer.status_code == 400, answer.text
    assert "no such repository" in answer.json()["message"]


def _wait_finished(client: TestClient, headers: dict[str, str] | None = None) -> Any:
    import time
    deadline = time.monotonic() + 30
    while True:
        text = client.get("/console/jobs/fragment", headers=headers).text
        if "No job running" in text and "Finished" in text:
            return text
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_bearer_token_opens_the_console_too(setup: tuple[TestClient, DiskRegistry, Path]
                                            ) -> None:
    client, _registry, _repo = setup
    assert client.get("/console/jobs", headers=AUTH).status_code == 200
    moved = client.get("/console", headers=AUTH, follow_redirects=False)
    assert moved.status_code == 308 and moved.headers["location"] == "/console/"
    assert client.get("/console/jobs", headers={"Authorization": "Bearer x"}).status_code == 401


def test_unix_socket_console_needs_no_token(tmp_path: Path) -> None:
    registry = DiskRegistry(str(tmp_path / "data"))
    app = create_app(registry, None)
    try:
        client = TestClient(UvicornPaths(app))
        page = client.get("/console/")
        assert page.status_code == 200 and "start the host with" in page.text
    finally:
        app.state.catalog.close()
        registry.close()


def test_an_s3_repository_in_the_console_and_the_metrics(
        s3_server: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``host --repo s3://...``: the console backs up into it and lists its points, the metrics
    count them, and a new point or verify record shows at once (its listing changed)."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    url = s3_server.new_url("console")
    Repository.init(url, s3=s3_server.options(), encryption=TEST_ENCRYPTION).close()
    registry = DiskRegistry(str(tmp_path / "data"))
    app = create_app(registry, TOKEN, repositories=(url,))
    try:
        client = TestClient(UvicornPaths(app), base_url="http://testserver")
        client.post("/disks", json={"name": "d0", "size_bytes": 1 << 20}, headers=AUTH)
        registry.get("d0").pwrite(b"s" * 65536, 0)
        where = (("disk", "d0"), ("repository", url))
        got = samples(client.get("/metrics", headers=AUTH).text)
        assert got[("blocktrail_repository_readable", (("repository", url),))] == 1
        assert ("blocktrail_disk_restore_points", where) not in got
        page = client.get("/console/", headers=AUTH)
        assert url in page.text
        started = client.post("/console/disks/d0/backup",
                              data={"repository": "0", "csrf": _csrf(page.text)},
                              headers={**AUTH, "X-Console": "fetch"})
        assert started.status_code == 202, started.text
        assert "Finished" in _wait_finished(client, AUTH)
        with Repository.open(url, s3=s3_server.options(), password=TEST_PASSWORD) as r:
            (point,) = r.points()
            assert samples(client.get("/metrics", headers=AUTH).text)[
                ("blocktrail_disk_restore_points", where)] == 1
            assert point.id in client.get("/console/disks/d0", headers=AUTH).text
            r.set_verify_state(point.id, "failed")
        assert "failed" in client.get("/console/disks/d0", headers=AUTH).text
    finally:
        app.state.catalog.close()
        registry.close()
