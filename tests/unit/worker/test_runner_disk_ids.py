"""A job never backs up two disks of one disk ID: their restore points, retention and leases
would be shared, and retention would forget one disk's only point for the other's."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blocktrail.errors import InvalidArgument
from blocktrail.worker import runner
from blocktrail.worker.config import parse_config
from blocktrail.worker.runner import JobProgress, RunOptions
from blocktrail.worker.scheduler import Task

LISTING = [{"name": "e0", "disk_id": "id-e"}, {"name": "r2", "disk_id": "id-e"},
           {"name": "x1", "disk_id": "id-x"}, {"name": "bad", "error": "CorruptMetadata",
                                                 "message": "damaged"}]


class FakeClient:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def call(self, method: str, path: str, **_: Any) -> Any:
        self.calls.append((method, path))
        if path == "/disks":
            return LISTING
        if path == "/vms":
            return [{"name": "vm1", "disks": ["e0", "r2"]}]
        raise AssertionError(f"unexpected call {method} {path}")

    def close(self) -> None:
        pass


class FakeSource:
    def __init__(self, disk: str) -> None:
        self.disk_id = {d["name"]: d.get("disk_id") for d in LISTING}[disk]

    def close(self) -> None:
        pass


class NoLeases:
    def disk_lease(self, disk_id: str) -> Any:
        raise AssertionError("a lease was taken for a job that shares a disk ID")


@contextlib.contextmanager
def no_leases(*_: Any) -> Iterator[NoLeases]:
    yield NoLeases()


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> FakeClient:
    client = FakeClient()
    monkeypatch.setattr(runner, "host_client", lambda job: client)
    monkeypatch.setattr(runner, "open_repository", no_leases)
    monkeypatch.setattr(runner, "_source", lambda client, job, disk: FakeSource(disk))
    return client


def job_task(targets: str, target: str) -> Task:
    config = parse_config(f'[[job]]\nname = "j"\nhost = "unix:/h"\n{targets}\n'
                          'repository = "/r"\nevery = "1h"\n', str(Path("/etc/jobs.toml")))
    return Task(config.jobs[0], target)


@pytest.mark.parametrize("disk", ["e0", "r2"])
def test_a_disk_job_refuses_two_disks_of_one_disk_id(fakes: FakeClient, disk: str) -> None:
    task = job_task('disks = ["e0", "r2", "x1"]', disk)
    with pytest.raises(InvalidArgument, match=r"'e0' and 'r2' .* same disk ID id-e"):
        runner.run_task(task, RunOptions(), JobProgress(task.key))


def test_a_disk_of_its_own_id_in_such_a_job_is_backed_up(fakes: FakeClient) -> None:
    task = job_task('disks = ["e0", "r2", "x1"]', "x1")
    with pytest.raises(AssertionError, match="a lease was taken"):  # it went on to back up
        runner.run_task(task, RunOptions(), JobProgress(task.key))


def test_a_vm_job_refuses_two_disks_of_one_disk_id(fakes: FakeClient) -> None:
    task = job_task('vm = "vm1"', "vm1")
    with pytest.raises(InvalidArgument, match="same disk ID id-e"):
        runner.run_task(task, RunOptions(), JobProgress(task.key))
