"""The worker's job file (TOML; docs/jobs.md): what to back up, where, when, and what to keep.

Every key is checked when the file is read, and an unknown key is refused (a typo must not turn
off retention or verification silently). Durations are ``90s``, ``15m``, ``1h30m``, ``1d``,
``2w`` (or a number of seconds); sizes ``50M``, ``1G`` (bytes, binary units).
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from datetime import tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from blocktrail.errors import InvalidArgument
from blocktrail.names import check_disk_name, check_vm_name
from blocktrail.repo.s3options import check_endpoint

EVENTS = frozenset({"failure", "audit_mismatch", "verify_differences"})
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(w|d|h|m|s)")
_DURATION_S = {"w": 604800.0, "d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
MAX_DURATION_S = 366 * 86400.0  # a year: longer is a mistake (and "inf" never comes)
_SIZE = re.compile(r"(\d+)\s*([KMGT]?)(?:I?B)?")
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass(frozen=True, slots=True)
class Retention:
    """How many restore points of each kind to keep, per disk (restic's buckets: the newest
    point of each of the newest N hours, days, ISO weeks, months)."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0

    @property
    def empty(self) -> bool:
        return not (self.last or self.hourly or self.daily or self.weekly or self.monthly)


@dataclass(frozen=True, slots=True)
class CalendarTime:
    """``HH:MM`` every day, or ``Mon HH:MM`` once a week (weekday 0 = Monday)."""

    hour: int
    minute: int
    weekday: int | None = None


@dataclass(frozen=True, slots=True)
class Schedule:
    every_s: float | None = None
    at: tuple[CalendarTime, ...] = ()


@dataclass(frozen=True, slots=True)
class Notify:
    webhook: str | None = None
    command: tuple[str, ...] = ()
    events: frozenset[str] = EVENTS

    @property
    def empty(self) -> bool:
        return self.webhook is None and not self.command


@dataclass(frozen=True, slots=True)
class JobConfig:
    name: str
    host: str
    repository: str
    schedule: Schedule
    endpoint: str | None = None  # an s3:// repository's endpoint, region and AWS profile
    region: str | None = None
    profile: str | None = None
    disks: tuple[str, ...] = ()
    vm: str | None = None
    token_file: str | None = None
    password_file: str | None = None  # an encrypted repository's (else the environment's)
    password_command: str | None = None
    keep: Retention = Retention()
    prune: bool = True
    audit_percent: float = 1.0
    verify_every_s: float | None = None
    check_every_s: float | None = None
    check_subset_percent: float = 5.0
    bandwidth_bytes_per_s: int | None = None
    retries: int = 3
    retry_backoff_s: float = 60.0
    notify: Notify = Notify()

    @property
    def targets(self) -> tuple[str, ...]:
        """What one run of the job backs up as one unit: each disk, or the VM."""
        return (self.vm,) if self.vm is not None else self.disks


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    jobs: tuple[JobConfig, ...]
    max_jobs: int = 2
    max_per_host: int = 1
    state_path: str = "worker-state.json"
    metrics: str | None = None
    timezone: tzinfo | None = None  # None: the machine's local time
    max_backoff_s: float = 3600.0
    path: str = field(default="", compare=False)


def parse_duration(value: Any, what: str) -> float:
    """Seconds, more than 0 and at most `MAX_DURATION_S` (366 days)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(min(value, MAX_DURATION_S + 1))  # a huge int: no OverflowError
    else:
        text = str(value).strip().lower() if isinstance(value, str) else ""
        parts = _DURATION.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
            raise InvalidArgument(f"{what}: {value!r} is not a duration (e.g. 90s, 15m, "
                                  "1h30m, 1d)")
        seconds = sum(float(n) * _DURATION_S[u] for n, u in parts)
    if not seconds > 0:  # NaN too
        raise InvalidArgument(f"{what}: a duration must be positive")
    if not seconds <= MAX_DURATION_S:
        raise InvalidArgument(f"{what}: {value!r} is longer than 366 days")
    return seconds


def parse_size(value: Any, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _SIZE.fullmatch(str(value).strip().upper()) if isinstance(value, str) else None
    if not match or int(match.group(1)) == 0:
        raise InvalidArgument(f"{what}: {value!r} is not a size (e.g. 50M, 1G)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def parse_calendar(value: str, what: str) -> CalendarTime:
    match = re.fullmatch(r"(?:([A-Za-z]{3})\s+)?(\d{1,2}):(\d{2})", value.strip())
    if not match or int(match.group(2)) > 23 or int(match.group(3)) > 59 or (
            match.group(1) and match.group(1).lower() not in WEEKDAYS):
        raise InvalidArgument(f"{what}: {value!r} is not a time (HH:MM, or Mon HH:MM)")
    day = match.group(1)
    return CalendarTime(int(match.group(2)), int(match.group(3)),
                        WEEKDAYS.index(day.lower()) if day else None)


class _Table:
    """A TOML table whose keys are taken one by one; what is left over is refused."""

    def __init__(self, data: Any, what: str) -> None:
        if not isinstance(data, dict):
            raise InvalidArgument(f"{what} must be a table")
        self.data, self.what = dict(data), what

    def take(self, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        if key not in self.data:
            return default
        value = self.data.pop(key)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise InvalidArgument(f"{self.what}: {key} has the wrong type ({value!r})")
        return value

    def done(self) -> None:
        if self.data:
            raise InvalidArgument(f"{self.what}: unknown key(s) {', '.join(sorted(self.data))}")


def _count(table: _Table, key: str) -> int:
    value = table.take(key, int, 0)
    if value < 0:
        raise InvalidArgument(f"{table.what}: {key} must be 0 or more")
    return int(value)


def _at_least_one(table: _Table, key: str, default: int) -> int:
    value = table.take(key, int, default)
    if value < 1:
        raise InvalidArgument(f"{table.what}: {key} must be 1 or more")
    return int(value)


def parse_listen_address(address: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT``; no host: 127.0.0.1) -> (host, port), the port 1-65535."""
    host, sep, port = address.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise InvalidArgument(f"{what}: {address!r} is not HOST:PORT (a port from 1 to 65535)")
    return host.strip("[]") or "127.0.0.1", int(port)


def _percent(table: _Table, key: str, default: float) -> float:
    value = float(table.take(key, (int, float), default))
    if not 0 <= value <= 100:
        raise InvalidArgument(f"{table.what}: {key} is a percentage from 0 to 100")
    return value


def _retention(data: Any, what: str) -> Retention:
    table = _Table(data, f"{what}: keep")
    keep = Retention(*(_count(table, k) for k in ("last", "hourly", "daily", "weekly",
                                                  "monthly")))
    table.done()
    return keep


def _notify(data: Any, what: str) -> Notify:
    table = _Table(data, f"{what}: notify")
    webhook = table.take("webhook", str)
    if webhook is not None and not webhook.startswith(("http://", "https://")):
        raise InvalidArgument(f"{table.what}: webhook must be an http:// or https:// URL")
    command = table.take("command", (str, list), [])
    command = [command] if isinstance(command, str) else command
    if not all(isinstance(c, str) and c for c in command):
        raise InvalidArgument(f"{table.what}: command is a program and its arguments")
    events = table.take("on", list, sorted(EVENTS))
    if not all(isinstance(e, str) for e in events) or not set(events) <= EVENTS:
        raise InvalidArgument(f"{table.what}: on names events among {', '.join(sorted(EVENTS))}")
    table.done()
    return Notify(webhook, tuple(command), frozenset(events))


def _schedule(table: _Table) -> Schedule:
    every = table.take("every", (str, int, float))
    at = table.take("at", (str, list))
    if (every is None) == (at is None):
        raise InvalidArgument(f"{table.what}: give every = DURATION or at = TIME (not both)")
    if every is not None:
        return Schedule(every_s=parse_duration(every, f"{table.what}: every"))
    times = [at] if isinstance(at, str) else at
    if not times or not all(isinstance(t, str) for t in times):
        raise InvalidArgument(f"{table.what}: at is a time or a list of times")
    return Schedule(at=tuple(parse_calendar(t, f"{table.what}: at") for t in times))


def _job(data: Any, index: int, base_dir: str) -> JobConfig:
    table = _Table(data, f"job {index + 1}")
    name = table.take("name", str)
    if not name or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
        raise InvalidArgument(f"{table.what}: name is required (1-64 of A-Z a-z 0-9 . _ -)")
    table.what = f"job {name!r}"
    host = table.take("host", str)
    repository = table.take("repository", str)
    if not host or not repository:
        raise InvalidArgument(f"{table.what}: host and repository are required")
    disks = table.take("disks", list)
    vm = table.take("vm", str)
    if (disks is None) == (vm is None):
        raise InvalidArgument(f"{table.what}: give disks = [...] or vm = NAME (not both)")
    if disks is not None:
        if not disks or len(set(disks)) != len(disks) or not all(isinstance(d, str)
                                                                  for d in disks):
            raise InvalidArgument(f"{table.what}: disks is a list of distinct disk names")
        for disk in disks:
            check_disk_name(disk)
    else:
        check_vm_name(vm)
    token_file = table.take("token_file", str)
    password_file = table.take("password_file", str)
    password_command = table.take("password_command", str)
    if password_file and password_command:
        raise InvalidArgument(f"{table.what}: give password_file or password_command, not both")
    s3 = {key: table.take(key, str) for key in ("endpoint", "region", "profile")}
    if any(s3.values()) and not repository.startswith("s3://"):
        raise InvalidArgument(f"{table.what}: endpoint, region and profile are for s3:// "
                              "repositories")
    if s3["endpoint"] is not None:
        check_endpoint(s3["endpoint"], f"{table.what}: endpoint")
    schedule = _schedule(table)
    keep = _retention(table.take("keep", dict, {}), table.what)
    verify = table.take("verify_every", (str, int, float))
    check = table.take("check_every", (str, int, float))
    bandwidth = table.take("bandwidth", (str, int))
    job = JobConfig(
        name=name, host=host, repository=_path(repository, base_dir), schedule=schedule,
        endpoint=s3["endpoint"], region=s3["region"], profile=s3["profile"],
        disks=tuple(disks or ()), vm=vm,
        token_file=_path(token_file, base_dir) if token_file else None, keep=keep,
        password_file=_path(password_file, base_dir) if password_file else None,
        password_command=password_command,
        prune=table.take("prune", bool, True),
        audit_percent=_percent(table, "audit_sample", 1.0),
        verify_every_s=None if verify is None else parse_duration(verify,
                                                                  f"{table.what}: verify_every"),
        check_every_s=None if check is None else parse_duration(check,
                                                                f"{table.what}: check_every"),
        check_subset_percent=_percent(table, "check_subset", 5.0),
        bandwidth_bytes_per_s=None if bandwidth is None else parse_size(
            bandwidth, f"{table.what}: bandwidth"),
        retries=_count(table, "retries") if "retries" in table.data else 3,
        retry_backoff_s=parse_duration(table.take("retry_backoff", (str, int, float), 60),
                                       f"{table.what}: retry_backoff"),
        notify=_notify(table.take("notify", dict, {}), table.what))
    table.done()
    return job


def _path(path: str, base_dir: str) -> str:
    """A repository or file path relative to the job file's directory (URLs as they are)."""
    if "://" in path or os.path.isabs(path):
        return path
    return os.path.normpath(os.path.join(base_dir, path))


def _timezone(name: str | None) -> tzinfo | None:
    if name is None or name == "local":
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidArgument(f"[worker]: unknown timezone {name!r}") from None


def parse_config(text: str, path: str = "jobs.toml") -> WorkerConfig:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"{path}: not valid TOML: {exc}") from None
    base = os.path.dirname(os.path.abspath(path))
    top = _Table(doc, path)
    worker = _Table(top.take("worker", dict, {}), "[worker]")
    jobs_data = top.take("job", list, [])
    top.done()
    jobs = tuple(_job(data, i, base) for i, data in enumerate(jobs_data))
    if not jobs:
        raise InvalidArgument(f"{path}: no [[job]] tables")
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise InvalidArgument(f"{path}: job names must be distinct")
    state = worker.take("state", str) or os.path.splitext(os.path.basename(path))[0] \
        + ".state.json"
    metrics = worker.take("metrics", str)
    if metrics is not None:
        parse_listen_address(metrics, "[worker]: metrics")
    config = WorkerConfig(
        jobs=jobs, max_jobs=_at_least_one(worker, "max_jobs", 2),
        max_per_host=_at_least_one(worker, "max_per_host", 1),
        state_path=_path(state, base), metrics=metrics,
        timezone=_timezone(worker.take("timezone", str)),
        max_backoff_s=parse_duration(worker.take("max_backoff", (str, int, float), "1h"),
                                     "[worker]: max_backoff"),
        path=path)
    worker.done()
    return config


def load_config(path: str) -> WorkerConfig:
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block, a device never end
            raise InvalidArgument(f"the job file {path} is not a regular file")
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise InvalidArgument(f"no job file {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"cannot read the job file {path}: {exc}") from None
    return parse_config(text, path)
