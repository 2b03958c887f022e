"""When each task runs: the worker's scheduling core. No I/O and no clock of its own: the caller
passes the time, so tests drive it with a fake clock.

A task is one unit of a job's run: one disk of a ``disks = [...]`` job, or the whole VM of a
``vm = NAME`` job. Its schedule counts from the start of its last successful run (an hourly
job stays hourly however long a run takes); a task never runs twice at once, and one that was
due while it ran runs once when it ends, never more (no pile-up). A task that never ran, or
whose due time passed while the worker was down, is due at once. A failed run is retried after
``retry_backoff * 2**(failures - 1)`` (at most ``max_backoff``); after ``retries`` retries the
task gives up until its next regular time, counted from the failed run's start.

Limits: at most ``max_jobs`` tasks at once, at most ``max_per_host`` per host, and a free slot
goes to the due task whose host runs the fewest tasks (then the one due longest): a host with
many disks cannot starve the others.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from typing import Any

from blocktrail.worker.config import JobConfig, Schedule, WorkerConfig

NEVER = float("inf")


@dataclass(frozen=True, slots=True)
class Task:
    job: JobConfig
    target: str  # a disk name, or the VM's name

    @property
    def key(self) -> str:
        return f"{self.job.name}/{self.target}"

    @property
    def host(self) -> str:
        return self.job.host


@dataclass(slots=True)
class TaskState:
    """What the scheduler remembers of a task (kept in the worker's state file)."""

    last_success: float | None = None  # start of the last successful run
    schedule_from: float | None = None  # the regular schedule counts from here
    last_attempt: float | None = None  # start of the last run, whatever its end
    failures: int = 0  # failed runs since the last success (or since giving up)
    last_error: str | None = None
    last_verify: float | None = None
    running: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"last_success": self.last_success, "schedule_from": self.schedule_from,
                "last_attempt": self.last_attempt, "failures": self.failures,
                "last_error": self.last_error, "last_verify": self.last_verify}

    @classmethod
    def from_json(cls, obj: Any) -> TaskState:
        """ValueError naming what is wrong: ``obj`` is not what `to_json` writes."""
        if not isinstance(obj, dict):
            raise ValueError(f"not an object: {obj!r}")

        def number(key: str) -> float | None:
            value = obj.get(key)
            if value is None:
                return None
            if not is_unix_time(value):
                raise ValueError(f"{key} is not a time: {value!r}")
            return float(value)

        failures, error = obj.get("failures", 0), obj.get("last_error")
        if not isinstance(failures, int) or isinstance(failures, bool) or failures < 0:
            raise ValueError(f"failures is not a count: {failures!r}")
        if error is not None and not isinstance(error, str):
            raise ValueError(f"last_error is not a text: {error!r}")
        return cls(number("last_success"), number("schedule_from"), number("last_attempt"),
                   failures, error, number("last_verify"))


def is_unix_time(value: Any) -> bool:
    """A Unix time as the state file holds it: a finite number, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) \
        and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of a finished run."""

    ok: bool
    retry_at: float | None = None  # a retry is scheduled
    gave_up: bool = False  # the retries are used up: report the failure


def next_calendar(schedule: Schedule, after: float, tz: tzinfo | None) -> float:
    """The first of the schedule's calendar times strictly after ``after``."""
    start = datetime.fromtimestamp(after, tz) if tz is not None else \
        datetime.fromtimestamp(after).astimezone()
    best = NEVER
    for at in schedule.at:
        day = start.replace(hour=at.hour, minute=at.minute, second=0, microsecond=0)
        for offset in range(8):
            candidate = day + timedelta(days=offset)
            if at.weekday is not None and candidate.weekday() != at.weekday:
                continue
            if tz is None:  # wall time: re-resolve the offset (daylight saving)
                candidate = candidate.replace(tzinfo=None).astimezone()
            if candidate.timestamp() > after:
                best = min(best, candidate.timestamp())
                break
    return best


def next_regular(schedule: Schedule, since: float | None, tz: tzinfo | None) -> float:
    """When a task whose schedule counts from ``since`` is due (``since`` None: at once)."""
    if since is None:
        return 0.0
    if schedule.every_s is not None:
        return since + schedule.every_s
    return next_calendar(schedule, since, tz)


@dataclass
class Scheduler:
    config: WorkerConfig
    states: dict[str, TaskState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tasks = [Task(job, target) for job in self.config.jobs for target in job.targets]
        for task in self.tasks:
            self.states.setdefault(task.key, TaskState())

    def state(self, task: Task) -> TaskState:
        return self.states[task.key]

    def due_at(self, task: Task) -> float:
        """When the task may start next (NEVER while it runs)."""
        state = self.state(task)
        if state.running:
            return NEVER
        if state.failures and state.last_attempt is not None:
            backoff = task.job.retry_backoff_s * float(2 ** (state.failures - 1))
            return state.last_attempt + min(backoff, self.config.max_backoff_s)
        return next_regular(task.job.schedule, state.schedule_from, self.config.timezone)

    def running(self) -> list[Task]:
        return [t for t in self.tasks if self.state(t).running]

    def pick(self, now: float, *, due_by: float | None = None,
             only: Callable[[Task], bool] | None = None) -> list[Task]:
        """The tasks to start now (each marked running), within the limits: those due by
        ``due_by`` (default: now), among ``only`` (default: all)."""
        busy: dict[str, int] = {}
        for task in self.running():
            busy[task.host] = busy.get(task.host, 0) + 1
        slots = self.config.max_jobs - sum(busy.values())
        limit = now if due_by is None else due_by
        due = sorted((t for t in self.tasks if self.due_at(t) <= limit
                      and (only is None or only(t))),
                     key=lambda t: (self.due_at(t), t.key))
        started: list[Task] = []
        while slots > 0:
            ready = [t for t in due if busy.get(t.host, 0) < self.config.max_per_host]
            if not ready:
                break
            task = min(ready, key=lambda t: busy.get(t.host, 0))  # stable: due order kept
            due.remove(task)
            busy[task.host] = busy.get(task.host, 0) + 1
            slots -= 1
            state = self.state(task)
            state.running, state.last_attempt = True, now
            started.append(task)
        return started

    def finished(self, task: Task, started: float, ok: bool, error: str | None = None,
                 *, verified: bool = False) -> Outcome:
        state = self.state(task)
        state.running = False
        if verified:
            state.last_verify = started
        if ok:
            state.last_success = state.schedule_from = started
            state.failures, state.last_error = 0, None
            return Outcome(True)
        state.last_error = error
        state.failures += 1
        if state.failures <= task.job.retries:
            return Outcome(False, retry_at=self.due_at(task))
        state.failures = 0  # given up: back to the regular schedule, from this run's start
        state.schedule_from = started
        return Outcome(False, gave_up=True)

    def verify_due(self, task: Task, now: float) -> bool:
        every = task.job.verify_every_s
        last = self.state(task).last_verify
        return every is not None and (last is None or now - last >= every)

    def next_wakeup(self) -> float:
        """The earliest time a task not running is due (NEVER: none is)."""
        return min((self.due_at(t) for t in self.tasks), default=NEVER)
