"""Retention per disk (what is kept, what never goes) on synthetic points and on a real
repository; the job file's keys and its refusals."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from blocktrail.backup.engine import BackupOptions, run_backup
from blocktrail.backup.sources.local import LocalDiskSource
from blocktrail.disk import Disk
from blocktrail.errors import InvalidArgument
from blocktrail.repo import Repository, RestorePoint
from blocktrail.worker.config import Retention, parse_config
from blocktrail.worker.retention import apply_retention, points_to_keep
from s3server import TEST_ENCRYPTION, TEST_PASSWORD

NOW = datetime(2026, 3, 31, 23, 30, tzinfo=UTC)


def point(i: int, hours_ago: float, verify: str = "unverified") -> RestorePoint:
    created = NOW - timedelta(hours=hours_ago)
    return RestorePoint(f"{created:%Y%m%dT%H%M%S}-{i:04d}", "disk", 1 << 20, 65536, 1024, (),
                        "incremental", None, None, None, created.isoformat(), "t", verify)


def test_buckets_keep_the_newest_point_of_each() -> None:
    points = [point(i, h) for i, h in enumerate([0, 0.5, 1, 5, 25, 49, 24 * 8, 24 * 40])]
    keep = points_to_keep(points, Retention(last=1, hourly=2, daily=3), tz=UTC)
    ids = {p.id: i for i, p in enumerate(points)}
    assert sorted(ids[k] for k in keep) == [0, 2, 4, 5]  # last, 2 hours, 3 days (0 shared)
    weekly = points_to_keep(points, Retention(weekly=3), tz=UTC)
    assert sorted(ids[k] for k in weekly) == [0, 5, 7]  # 49 h and 8 d ago: one ISO week
    monthly = points_to_keep(points, Retention(monthly=2), tz=UTC)
    assert sorted(ids[k] for k in monthly) == [0, 7]


def test_never_forgets_the_newest_the_newest_verified_or_a_protected_point() -> None:
    points = [point(0, 30, "ok"), point(1, 20, "failed"), point(2, 10), point(3, 1)]
    keep = points_to_keep(points, Retention(last=1), tz=UTC, protected={points[1].id, "zzz"})
    assert keep == {points[3].id, points[0].id, points[1].id}
    assert points_to_keep(points, Retention(), tz=UTC) == {p.id for p in points}  # empty: all
    assert points_to_keep([], Retention(last=1)) == set()


def test_never_forgets_a_failed_point_a_kept_point_builds_on() -> None:
    """The newest point's chain holds a failed one: it stays, with the point between, so the
    next backup still sees that the newest is no base; the full before it goes."""
    full = point(0, 30)
    failed = replace(point(1, 20, "failed"), parent=full.id)
    between = replace(point(2, 10), parent=failed.id)
    newest = replace(point(3, 1), parent=between.id)
    keep = points_to_keep([replace(full, kind="full"), failed, between, newest],
                          Retention(last=1), tz=UTC)
    assert keep == {newest.id, between.id, failed.id}


@contextlib.contextmanager
def backed_up(tmp_path: Path, count: int
              ) -> Iterator[tuple[Disk, Repository, list[RestorePoint]]]:
    """A disk of 1 MiB and a repository holding ``count`` backups of it, chunk i changed
    before backup i (the first full, the others incremental)."""
    with Disk.create(tmp_path / "d", 1 << 20, 65536) as disk, \
            Repository.init(tmp_path / "repo", encryption=TEST_ENCRYPTION) as repo:
        made = []
        for i in range(count):
            disk.pwrite(bytes([i + 1]) * 65536, i * 65536)
            made.append(run_backup(LocalDiskSource(disk), repo, BackupOptions()).point)
        yield disk, repo, made


def test_applied_to_a_repository_then_pruned_it_checks_clean(tmp_path: Path) -> None:
    with backed_up(tmp_path, 5) as (disk, repo, made):
        repo.set_verify_state(made[1].id, "ok")
        retained = apply_retention(repo, disk.disk_id, Retention(last=2), tz=UTC)
        assert {p.id for p in retained.forgotten} == {made[0].id, made[2].id}
        assert retained.kept_for_taint == []
        assert [p.id for p in repo.points()] == [made[1].id, made[3].id, made[4].id]
        repo.prune()
        assert repo.check(read_data=True).ok
        # the next backup is still incremental against the newest
        disk.pwrite(b"\x09" * 65536, 0)
        report = run_backup(LocalDiskSource(disk), repo, BackupOptions())
        assert report.kind == "incremental" and report.point.parent == made[4].id


def test_the_base_of_a_running_backup_and_verify_records_on_a_repository(tmp_path: Path) -> None:
    with backed_up(tmp_path, 4) as (disk, repo, made):
        repo.set_verify_state(made[0].id, "unverified")
        repo.set_verify_state(made[2].id, "failed")
        # another process backs the disk up from made[1] (its lease names the base)
        with Repository.open(tmp_path / "repo", password=TEST_PASSWORD) as other, \
                other.disk_lease(disk.disk_id) as lease:
            other.record_base(lease, made[1].id)
            retained = apply_retention(repo, disk.disk_id, Retention(last=1), tz=UTC)
        assert {p.id for p in retained.forgotten} == {made[0].id}
        # made[3] (the newest) builds on the failed made[2]: it stays, its verify record too,
        # and the result says why the policy's choice was overruled
        assert retained.kept_for_taint == [made[2].id]
        assert [p.id for p in repo.points()] == [made[1].id, made[2].id, made[3].id]
        assert repo.point(made[2].id).verify_state == "failed"
        assert made[0].id not in repo.verify_records()  # its verify record went with it
        assert repo.check().ok


def test_a_job_run_says_which_points_it_kept_for_a_failed_one(tmp_path: Path) -> None:
    """The worker's result and its log line name the points kept beyond the policy, so that
    an operator who set ``last = 1`` knows why more points stay."""
    from blocktrail.cli.worker import _human
    from blocktrail.worker.runner import (
        DiskRun,
        JobProgress,
        RunOptions,
        RunResult,
        _retain,
        result_json,
    )

    with backed_up(tmp_path, 3) as (disk, repo, made):
        repo.set_verify_state(made[1].id, "failed")
        job = parse_config('[[job]]\nname = "j"\nhost = "unix:/h"\ndisks = ["d"]\n'
                           'repository = "/r"\nevery = "1h"\n[job.keep]\nlast = 1\n',
                           "/etc/jobs.toml").jobs[0]
        run = DiskRun(disk="d", disk_id=disk.disk_id, point_id=made[2].id, kind="incremental",
                      fallback_reason=None, bytes_read=0, bytes_stored=0, audit_sampled=0,
                      audit_mismatches=(), audit_damaged=())
        run = _retain(repo, job, run, RunOptions(tz=UTC), JobProgress("j"))
    assert run.forgotten == (made[0].id,) and run.kept_for_taint == (made[1].id,)
    line = {"event": "succeeded", "task": "j", **result_json(RunResult((run,), 1.0))}
    assert line["disks"][0]["kept_for_taint"] == [made[1].id]
    assert f"forgot 1 points; kept {made[1].id} beyond the policy" in _human(line)


EXAMPLE = """
[worker]
max_jobs = 4
max_per_host = 2
metrics = "127.0.0.1:9464"
timezone = "Europe/Berlin"

[[job]]
name = "vm1-hourly"
host = "unix:/run/bt-api.sock"
disks = ["vm1"]
repository = "/backups/repo"
every = "1h"
keep = { last = 24, daily = 7, weekly = 4 }

[[job]]
name = "web-nightly"
host = "http://10.0.0.5:8080"
token_file = "token"
vm = "web"
repository = "repo"
at = ["02:30", "Sun 04:00"]
keep = { daily = 14, monthly = 6 }
audit_sample = 5
verify_every = "7d"
check_every = "1w"
check_subset = 10
bandwidth = "50M"
retries = 5
retry_backoff = "2m"

[job.notify]
webhook = "https://hooks.example/bt"
command = ["/usr/local/bin/page", "-x"]
on = ["failure"]
"""


def test_the_documented_example_parses() -> None:
    cfg = parse_config(EXAMPLE, "/etc/blocktrail/jobs.toml")
    hourly, nightly = cfg.jobs
    assert (cfg.max_jobs, cfg.max_per_host, cfg.metrics) == (4, 2, "127.0.0.1:9464")
    assert cfg.state_path == "/etc/blocktrail/jobs.state.json"
    assert hourly.schedule.every_s == 3600 and hourly.targets == ("vm1",)
    assert hourly.keep == Retention(last=24, daily=7, weekly=4)
    assert nightly.targets == ("web",) and nightly.repository == "/etc/blocktrail/repo"
    assert nightly.token_file == "/etc/blocktrail/token"
    assert [(a.weekday, a.hour, a.minute) for a in nightly.schedule.at] == [(None, 2, 30),
                                                                           (6, 4, 0)]
    assert nightly.bandwidth_bytes_per_s == 50 << 20 and nightly.audit_percent == 5
    assert nightly.verify_every_s == 7 * 86400 and nightly.check_every_s == 7 * 86400
    assert nightly.retries == 5 and nightly.retry_backoff_s == 120
    assert nightly.notify.command == ("/usr/local/bin/page", "-x")
    assert nightly.notify.events == {"failure"}


@pytest.mark.parametrize(("body", "message"), [
    ('disks = ["d"]\nrepository = "/r"\nevery = "1h"\nkeep = { lats = 3 }', "unknown key"),
    ('disks = ["d"]\nrepository = "/r"\nevery = "1h"\nevry = "2h"', "unknown key"),
    ('disks = ["d"]\nrepository = "/r"', "every = DURATION or at = TIME"),
    ('disks = ["d"]\nrepository = "/r"\nevery = "1h"\nat = "02:00"', "not both"),
    ('disks = ["d"]\nvm = "v"\nrepository = "/r"\nevery = "1h"', "or vm = NAME"),
    ('disks = ["-bad"]\nrepository = "/r"\nevery = "1h"', "invalid"),
    ('disks = ["d", "d"]\nrepository = "/r"\nevery = "1h"', "distinct"),
    ('disks = ["d"]\nrepository = "/r"\nevery = "soon"', "not a duration"),
    ('disks = ["d"]\nrepository = "/r"\nat = "25:00"', "not a time"),
    ('disks = ["d"]\nrepository = "/r"\nevery = "1h"\nbandwidth = "fast"', "not a size"),
    ('disks = ["d"]\nrepository = "/r"\nevery = "1h"\naudit_sample = 101', "percentage"),
    ('disks = ["d"]\nrepository = "/r"\nevery = "1h"\nkeep = { last = -1 }', "0 or more"),
    ('disks = ["d"]\nrepository = "/r"\nevery = "1h"\nprune = "yes"', "wrong type"),
    ('disks = ["d"]\nrepository = "/r"\nevery = "1h"\nnotify = { webhook = "ftp://x" }',
     "http"),
    ('disks = ["d"]\nrepository = "/r"\nevery = "1h"\nregion = "eu"', "for s3:// repositories"),
    ('disks = ["d"]\nrepository = "s3://b/p"\nevery = "1h"\nendpoint = "localhost:9000"',
     "http://HOST"),
    ('disks = ["d"]\nrepository = "s3://b/p"\nevery = "1h"\nendpoint = "http://minio:abc"',
     "job 'j': endpoint"),
])
def test_mistakes_are_refused_with_the_key_named(body: str, message: str) -> None:
    text = f'[[job]]\nname = "j"\nhost = "unix:/h"\n{body}\n'
    with pytest.raises(InvalidArgument, match=message):
        parse_config(text)


def test_an_s3_repository_with_its_endpoint_region_and_profile() -> None:
    cfg = parse_config('[[job]]\nname = "j"\nhost = "unix:/h"\ndisks = ["d"]\n'
                       'repository = "s3://bucket/backups"\nevery = "1h"\n'
                       'endpoint = "http://127.0.0.1:8333"\nregion = "eu-central-1"\n'
                       'profile = "backup"\n', "/etc/jobs.toml")
    (job,) = cfg.jobs
    assert job.repository == "s3://bucket/backups"  # a URL, not a path under /etc
    assert (job.endpoint, job.region, job.profile) == ("http://127.0.0.1:8333",
                                                       "eu-central-1", "backup")


def test_no_jobs_and_duplicate_names_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="no \\[\\[job\\]\\]"):
        parse_config("[worker]\nmax_jobs = 1\n")
    one = '[[job]]\nname = "j"\nhost = "unix:/h"\ndisks = ["d"]\nrepository = "/r"\nevery = 60\n'
    with pytest.raises(InvalidArgument, match="distinct"):
        parse_config(one + one)
    with pytest.raises(InvalidArgument, match="not valid TOML"):
        parse_config("[[job]\n")


J = 'disks = ["d"]\nrepository = "/r"\n'


@pytest.mark.parametrize(("body", "message"), [
    (J + "every = inf", "longer than 366 days"),
    (J + "every = nan", "positive"),
    (J + "every = -5", "positive"),
    (J + "every = 0", "positive"),
    (J + 'every = "367d"', "longer than 366 days"),
    (J + f'every = "{"9" * 400}w"', "longer than 366 days"),
    (J + "every = 9223372036854775807", "longer than 366 days"),
    (J + 'every = "1h"\nretry_backoff = inf', "retry_backoff.*longer than 366 days"),
    (J + 'every = "1h"\nverify_every = inf', "verify_every.*longer than 366 days"),
    (J + 'every = "1h"\ncheck_every = "53w"', "check_every.*longer than 366 days"),
    (J + 'every = "1h"\nnotify = { on = [["failure"]] }', "on names events"),
    (J + 'every = "1h"\nnotify = { on = [1] }', "on names events"),
])
def test_durations_past_a_year_and_odd_values_are_refused(body: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_config(f'[[job]]\nname = "j"\nhost = "unix:/h"\n{body}\n')


@pytest.mark.parametrize(("worker", "message"), [
    ("max_jobs = 0", "max_jobs must be 1 or more"),
    ("max_jobs = -3", "max_jobs must be 1 or more"),
    ("max_per_host = 0", "max_per_host must be 1 or more"),
    ("max_backoff = inf", "max_backoff.*longer than 366 days"),
    ('metrics = "127.0.0.1:99999"', "port from 1 to 65535"),
    ('metrics = "127.0.0.1:0"', "port from 1 to 65535"),
    ('metrics = "127.0.0.1:\u00b2"', "port from 1 to 65535"),
    ('metrics = "9464"', "not HOST:PORT"),
])
def test_worker_limits_and_metrics_address_are_checked(worker: str, message: str) -> None:
    text = f'[worker]\n{worker}\n[[job]]\nname = "j"\nhost = "unix:/h"\n{J}every = "1h"\n'
    with pytest.raises(InvalidArgument, match=message):
        parse_config(text)


def test_a_year_is_the_longest_duration() -> None:
    cfg = parse_config(f'[[job]]\nname = "j"\nhost = "unix:/h"\n{J}every = "366d"\n'
                       'check_every = "52w"\n')
    assert cfg.jobs[0].schedule.every_s == 366 * 86400


@pytest.mark.parametrize("address", ["127.0.0.1:99999", "127.0.0.1:\u00b2", "nope"])
def test_a_bad_metrics_option_is_a_usage_error(address: str) -> None:
    from blocktrail.worker.metrics import WorkerMetrics, serve_metrics

    with pytest.raises(InvalidArgument, match="HOST:PORT"):
        serve_metrics(WorkerMetrics(), address)
