"""The instant-restore endpoints of the control API, in process: a disk restored from a point
reads as the point at once and keeps its disk ID and change ID; errors of the repository are
the host's errors; the fill can be paused, resumed and limited, and ends local; a host that
starts again resumes it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from blocktrail.backup.chunksource import open_chunk_source
from blocktrail.cli import target as cli_target
from blocktrail.cli.main import main
from blocktrail.host import restore_api
from blocktrail.host.api import create_app
from blocktrail.host.fill import FillPolicy, FillScheduler
from blocktrail.host.registry import DiskRegistry
from blocktrail.repo import Repository
from blocktrail.repo.backend import BucketNotFound
from instantkit import CS, Point, make_point


class Host:
    def __init__(self, data: Path, policy: FillPolicy | None = None) -> None:
        self.registry = DiskRegistry(str(data), chunk_sources=open_chunk_source)
        self.fills = FillScheduler(self.registry, policy)
        self.client = TestClient(create_app(self.registry, fills=self.fills))

    def close(self) -> None:
        self.fills.close()
        self.registry.close()

    def restore(self, point: Point, name: str = "r0", **fill: Any) -> Any:
        body = {"name": name, "repository": str(point.repo), "point": point.id}
        if fill:
            body["fill"] = fill
        return self.client.post("/disks/restore", json=body)

    def info(self, name: str = "r0") -> Any:
        return self.client.get(f"/disks/{name}").json()

    def wait_local(self, name: str = "r0", timeout_s: float = 60) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.info(name)
            if info["restore"]["state"] == "local":
                return info
            assert time.monotonic() < deadline, info["restore"]
            time.sleep(0.05)


@pytest.fixture
def point(tmp_path: Path) -> Point:
    return make_point(tmp_path / "src", size=48 * CS, seed=21)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    h = Host(tmp_path / "data")
    yield h
    h.close()


def test_a_restored_disk_is_the_point_at_once_and_ends_local(host: Host, point: Point) -> None:
    answer = host.restore(point, paused=True)
    assert answer.status_code == 201, answer.text
    info = answer.json()
    assert info["disk_id"] == point.disk_id and info["size_bytes"] == len(point.content)
    restore = info["restore"]
    assert restore["state"] == "paused" and restore["paused"] == "by request"
    assert restore["summary"] == "filling 0%, paused: by request"
    assert (restore["repository"], restore["point"]) == (str(point.repo), point.id)
    assert restore["local_chunks"] == 0 and restore["chunks"] == len(point.data_chunks)
    epoch, seq = point.change_id.split("/")
    assert info["epochs"][-1]["inherits"] == [epoch, int(seq)]
    disk = host.registry.get("r0")
    assert disk.pread(len(point.content), 0) == point.content  # fetched on demand
    assert disk.query_changed_areas(point.change_id).changed_areas == ()
    disk.pwrite(b"w" * 100, 5 * CS + 7)
    assert [(a.offset, a.length) for a in disk.query_changed_areas(
        point.change_id).changed_areas] == [(5 * CS, CS)]
    resumed = host.client.post("/disks/r0/fill", json={"paused": False})
    assert resumed.status_code == 200
    local = host.wait_local()
    assert local["restore"]["summary"] == "local" and local["restore"]["point"] is None
    expected = bytearray(point.content)
    expected[5 * CS + 7 : 5 * CS + 107] = b"w" * 100
    assert disk.pread(len(point.content), 0) == bytes(expected)
    again = host.client.post("/disks/r0/fill", json={"paused": True})
    assert again.status_code == 400 and "is local" in again.json()["message"]


def test_a_second_disk_of_the_same_point_gets_its_own_identity(host: Host,
                                                             point: Point) -> None:
    """Restore points, their retention and leases are per disk ID: a disk restored while the
    host has a disk of that ID already gets a fresh one and starts a new tracking epoch (its
    first backup is full), so neither disk's points are ever taken for the other's."""
    first = host.restore(point, name="r0", paused=True).json()
    assert first["disk_id"] == point.disk_id
    second = host.restore(point, name="r1", paused=True)
    assert second.status_code == 201, second.text
    info = second.json()
    assert info["disk_id"] not in (point.disk_id, first["disk_id"])
    assert info["epochs"][-1]["inherits"] is None
    # the answer says so: the first goes on from the point, the second does not
    assert (first["continues"], first["fresh_disk_id"]) == (point.change_id, False)
    assert (info["continues"], info["fresh_disk_id"]) == (None, True)
    disk = host.registry.get("r1")
    assert disk.pread(len(point.content), 0) == point.content


def test_the_cli_says_whether_a_restored_disk_is_tracked_against_the_point(
        host: Host, point: Point, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`restore --instant` said every disk's writes were tracked against the point, also of a
    second disk of it, which gets a fresh disk ID and whose first backup is full."""
    class InProcess:
        def call(self, method: str, path: str, **kwargs: Any) -> Any:
            answer = host.client.request(method, path, **kwargs)
            assert answer.status_code < 300, answer.text
            return answer.json()

    monkeypatch.setattr(cli_target, "with_host", lambda _host, fn: fn(InProcess()))
    for name in ("r0", "r1"):
        assert main(["restore", str(point.repo), point.id, "--instant", "--host",
                     "unix:/nowhere", "--disk", name]) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert "tracked against the point" not in second
    assert "disk ID of its own" in second and "first backup is full" in second
    assert "tracked against the point" in first and "incremental" in first


def test_a_restore_opens_the_repository_once(host: Host, point: Point,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk's base goes on with the repository the restore opened (its key derived, its
    index read): the guest's first read does not open it again."""
    opened: list[str] = []
    real = Repository.open.__func__  # type: ignore[attr-defined]

    def counting(cls: type[Repository], location: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(location))
        return real(cls, location, *args, **kwargs)

    monkeypatch.setattr(Repository, "open", classmethod(counting))
    assert host.restore(point, paused=True).status_code == 201
    disk = host.registry.get("r0")
    assert disk.pread(len(point.content), 0) == point.content
    assert opened == [str(point.repo)]
    assert host.client.post("/disks/r0/fill", json={"paused": False}).status_code == 200
    host.wait_local()
    assert opened == [str(point.repo)]


@pytest.mark.parametrize(("fill", "wrong"), [({"pause": True}, "pause"),
                                               ({"paused": "yes"}, "paused"),
                                               ({"paused": 1}, "paused"),
                                               ({"rate_bytes_per_second": "1M"}, "rate")])
def test_a_fill_control_with_an_unknown_key_or_a_string_is_refused(
        host: Host, point: Point, fill: dict[str, Any], wrong: str) -> None:
    """A typo (``pause``) or a string for a boolean must not be ignored or taken as true."""
    refused = host.restore(point, **fill)
    assert refused.status_code == 400 and wrong in refused.json()["message"], refused.text
    assert host.registry.names() == []  # no disk was made
    assert host.restore(point, paused=True).status_code == 201
    control = host.client.post("/disks/r0/fill", json=fill)
    assert control.status_code == 400 and wrong in control.json()["message"], control.text
    assert host.info()["restore"]["paused"] == "by request"  # not resumed, not changed
    typo = host.client.post("/disks/restore", json={"name": "r1", "repository": str(point.repo),
                                                    "point": point.id, "granularty": 4096})
    assert typo.status_code == 400 and "granularty" in typo.json()["message"]


def test_the_fill_is_paused_resumed_and_limited(host: Host, point: Point) -> None:
    assert host.restore(point, rate_bytes_per_second=4 * CS).status_code == 201
    time.sleep(1.0)
    first = host.info()["restore"]
    assert first["state"] == "filling" and first["rate_bytes_per_second"] == 4 * CS
    assert 0 < first["local_chunks"] < first["chunks"]  # ~4 chunks a second
    paused = host.client.post("/disks/r0/fill", json={"paused": True}).json()["restore"]
    assert paused["state"] == "paused" and paused["rate_bytes_per_second"] == 4 * CS
    time.sleep(0.6)
    held = host.info()["restore"]["local_chunks"]
    time.sleep(0.6)
    assert host.info()["restore"]["local_chunks"] == held
    unlimited = host.client.post("/disks/r0/fill",
                                 json={"paused": False, "rate_bytes_per_second": None})
    assert unlimited.json()["restore"]["rate_bytes_per_second"] is None
    host.wait_local()


def test_repository_errors_are_the_hosts_errors(host: Host, point: Point,
                                                tmp_path: Path) -> None:
    missing = host.client.post("/disks/restore", json={
        "name": "r0", "repository": str(point.repo), "point": "20200101T000000000Z-00000000"})
    assert missing.status_code == 404 and missing.json()["error"] == "SnapshotNotFound"
    assert "no restore point" in missing.json()["message"]
    nowhere = host.client.post("/disks/restore", json={
        "name": "r0", "repository": str(tmp_path / "none"), "point": point.id})
    assert nowhere.status_code == 404 and nowhere.json()["error"] == "DiskNotFound"
    assert "not a blocktrail repository" in nowhere.json()["message"]
    relative = host.client.post("/disks/restore", json={
        "name": "r0", "repository": "repo", "point": point.id})
    assert relative.status_code == 400 and "absolute path" in relative.json()["message"]
    bad_name = host.client.post("/disks/restore", json={
        "name": "-r0", "repository": str(point.repo), "point": point.id})
    assert bad_name.status_code == 400
    assert host.client.get("/disks").json() == []  # nothing was created
    assert host.restore(point).status_code == 201
    taken = host.restore(point)
    assert taken.status_code == 409 and taken.json()["error"] == "DiskExists"
    assert not list((tmp_path / "data" / "disks").glob(".creating-*"))


def test_a_missing_bucket_is_not_found(host: Host, point: Point,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """An S3 repository whose bucket does not exist: 404, as for a directory that is no
    repository, never a 500."""
    def no_bucket(*_: Any, **__: Any) -> None:
        raise BucketNotFound("s3://gone/r: bucket gone does not exist at http://127.0.0.1:1")

    monkeypatch.setattr(restore_api, "RepositoryChunkSource", no_bucket)
    answer = host.client.post("/disks/restore", json={
        "name": "r0", "repository": str(point.repo), "point": point.id})
    assert answer.status_code == 404 and answer.json()["error"] == "DiskNotFound"
    assert "bucket gone does not exist" in answer.json()["message"]


def test_a_host_that_starts_again_resumes_the_fill(tmp_path: Path, point: Point) -> None:
    first = Host(tmp_path / "data")
    try:
        assert first.restore(point, rate_bytes_per_second=8 * CS).status_code == 201
        time.sleep(0.8)
    finally:
        first.close()
    second = Host(tmp_path / "data")
    try:
        before = second.info()["restore"]  # opens the disk; nothing fills it yet
        assert before["state"] == "paused" and "no fill runs" in before["paused"]
        assert 0 < before["local_chunks"] < before["chunks"]  # kept across the stop
        assert second.fills.resume() == ["r0"]
        second.wait_local()
        disk = second.registry.get("r0")
        assert disk.pread(len(point.content), 0) == point.content
        assert disk.restore_source is None
    finally:
        second.close()
