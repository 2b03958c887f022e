"""`blocktrail worker`: runs the jobs of a job file on their schedules (scheduler.py), each task
on a thread of its own, and remembers what ran in a state file, so a run missed while the
worker was down runs when it starts again.

After each run the state file is replaced atomically; the metrics are updated; a failure whose
retries are used up, an audit that caught the tracker missing changes and a verify that found
differences are notified (notify.py).
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from blocktrail.errors import BlocktrailError, CorruptMetadata, ExitCode, io_error
from blocktrail.fileio import OsFileIO
from blocktrail.repo.leases import DEFAULT_TIMING, Timing
from blocktrail.worker.config import JobConfig, WorkerConfig
from blocktrail.worker.metrics import WorkerMetrics
from blocktrail.worker.notify import Event, deliver
from blocktrail.worker.runner import JobProgress, RunOptions, RunResult, result_json, run_task
from blocktrail.worker.scheduler import Scheduler, Task, TaskState, is_unix_time

STATE_FORMAT = "blocktrail-worker-state"
MAX_SLEEP_S = 60.0


class Clock(Protocol):
    def now(self) -> float:
        """Unix time."""
        ...

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """Wait for ``event`` at most ``timeout`` seconds of this clock."""
        ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    def wait(self, event: threading.Event, timeout: float) -> bool:
        return event.wait(max(0.0, timeout))


RunTask = Callable[[Task, RunOptions, JobProgress], RunResult]
Notifier = Callable[[JobConfig, Event], list[str]]
Report = Callable[[dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class Finished:
    task: Task
    started: float
    result: RunResult | None
    error: BlocktrailError | None
    seconds: float
    verified: bool
    checked: bool


@dataclass
class Worker:
    config: WorkerConfig
    clock: Clock = field(default_factory=SystemClock)
    run: RunTask = run_task
    notify: Notifier = lambda job, event: deliver(job.notify, event)
    report: Report = lambda line: None
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)
    timing: Timing = DEFAULT_TIMING  # of the repositories' leases

    def __post_init__(self) -> None:
        states, self.checks = load_state(self.config.state_path)  # checks that ended
        self._checking: set[str] = set()  # repositories a running task checks
        self.scheduler = Scheduler(self.config, states)
        self.progress: dict[str, JobProgress] = {}
        self.failures: list[BlocktrailError] = []
        self._done: queue.Queue[Finished] = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: dict[str, threading.Thread] = {}

    # ------------------------------------------------------------------ the loop

    def stop(self) -> None:
        """Start no more tasks; `serve` returns once the running ones end."""
        self._stop.set()
        self._wake.set()

    def serve(self) -> None:
        """Run the jobs until `stop`."""
        while not self._stop.is_set():
            now = self.clock.now()
            for task in self.scheduler.pick(now):
                self._start(task, now)
            if self._collect():
                continue  # a run ended and freed its slot: what is due may start now
            wake = self.scheduler.next_wakeup()
            self._wake.clear()
            if self._done.empty() and not self._stop.is_set():
                # A task due already waits for a free slot: only an ending run frees one, and
                # it sets the event.
                timeout = wake - now if now < wake < now + MAX_SLEEP_S else MAX_SLEEP_S
                self.clock.wait(self._wake, timeout)
        self._drain()

    def run_once(self) -> int:
        """Run every task due now once (no retries: a failure is retried by the next
        invocation, after its backoff). -> 0, or the exit code of the first failure."""
        due_by = self.clock.now()
        todo = {t.key for t in self.scheduler.tasks if self.scheduler.due_at(t) <= due_by}
        while (todo or self._threads) and not self._stop.is_set():
            for task in self.scheduler.pick(self.clock.now(), due_by=due_by,
                                            only=lambda t: t.key in todo):
                todo.discard(task.key)
                self._start(task, self.clock.now())
            if not self._threads:
                break  # nothing runs and nothing more can start
            self._handle(self._done.get())
            self._collect()
        self._drain()
        return self.failures[0].exit_code if self.failures else ExitCode.OK

    def _drain(self) -> None:
        while self._threads:
            self._handle(self._done.get())

    def _collect(self) -> int:
        """Handle the runs that ended. -> how many."""
        handled = 0
        while True:
            try:
                finished = self._done.get_nowait()
            except queue.Empty:
                return handled
            self._handle(finished)
            handled += 1

    # ------------------------------------------------------------------ one task

    def _start(self, task: Task, now: float) -> None:
        verify = self.scheduler.verify_due(task, now)
        check = self._check_due(task.job, now)
        if check:
            self._checking.add(task.job.repository)  # one check per repository at a time
        progress = self.progress[task.key] = JobProgress(task.key)
        options = RunOptions(verify=verify, check=check, tz=self.config.timezone,
                             timing=self.timing)
        self.metrics.started(task.job.name, task.target)
        self.report({"event": "started", "task": task.key, "verify": verify, "check": check,
                     "attempt": self.scheduler.state(task).failures + 1})

        def body() -> None:
            began = time.monotonic()
            result, error = None, None
            try:
                result = self.run(task, options, progress)
            except BlocktrailError as exc:
                error = exc
            except Exception as exc:  # a bug must not stop the worker; it is reported
                error = BlocktrailError(f"internal error: {type(exc).__name__}: {exc}")
            self._done.put(Finished(task, now, result, error, time.monotonic() - began,
                                    verify, check))
            self._wake.set()

        thread = threading.Thread(target=body, name=f"job {task.key}", daemon=True)
        self._threads[task.key] = thread
        thread.start()

    def _check_due(self, job: JobConfig, now: float) -> bool:
        if job.check_every_s is None or job.repository in self._checking:
            return False
        last = self.checks.get(job.repository)
        return last is None or now - last >= job.check_every_s

    def _handle(self, done: Finished) -> None:
        task, job = done.task, done.task.job
        self._threads.pop(task.key).join()
        self.progress.pop(task.key, None)
        if done.checked:
            self._checking.discard(job.repository)
        if done.error is None and done.result is not None:
            if done.checked:  # recorded once it ended: a check cut short is due again
                self.checks[job.repository] = done.started
            outcome = self.scheduler.finished(task, done.started, True,
                                              verified=done.verified)
            self.metrics.succeeded(job.name, task.target, job.repository, done.started,
                                   done.result)
            self.report({"event": "succeeded", "task": task.key,
                         **result_json(done.result)})
            self._notify_findings(task, done.result)
        else:
            error = done.error or BlocktrailError("no result")
            outcome = self.scheduler.finished(task, done.started, False, _describe(error))
            self.metrics.failed(job.name, task.target, done.started, done.seconds,
                                outcome.gave_up)
            self.report({"event": "failed", "task": task.key, "error": type(error).__name__,
                         "message": error.message, "retry_at": outcome.retry_at,
                         "gave_up": outcome.gave_up})
            self.failures.append(error)
            if outcome.gave_up:
                self._send(task, "failure", f"{task.key} failed: {_describe(error)}",
                           {"error": type(error).__name__, "attempts": job.retries + 1})
        save_state(self.config.state_path, self.scheduler.states, self.checks)

    def _notify_findings(self, task: Task, result: RunResult) -> None:
        for run in result.disks:
            if run.audit_mismatches:
                self._send(task, "audit_mismatch",
                           f"the audit of {run.disk} caught the change tracker missing "
                           f"changes (restore point {run.point_id} stored the right data; the "
                           "next backup is full)",
                           {"disk": run.disk, "point": run.point_id,
                            "areas": [list(e) for e in run.audit_mismatches]})
            if run.verify in ("differences", "damaged"):
                self._send(task, "verify_differences",
                           f"restore point {run.point_id} of {run.disk} {run.verify} from its "
                           "snapshot" + (f"; healed as {run.healed_point}"
                                         if run.healed_point else ""),
                           {"disk": run.disk, "point": run.point_id,
                            "healed_point": run.healed_point, "result": run.verify,
                            "areas": [list(e) for e in run.verify_differences]})
        check = result.check
        if check is not None and not check.ok:
            self._send(task, "verify_differences",
                       f"check of {task.job.repository} found {check.problems} problems "
                       "(run `blocktrail check` for the list)", {"problems": check.problems})

    def _send(self, task: Task, kind: str, message: str, details: dict[str, Any]) -> None:
        job = task.job
        if job.notify.empty or kind not in job.notify.events:
            return
        event = Event(kind, job.name, task.target, job.host, job.repository, message,
                      self.clock.now(), details)
        problems = self.notify(job, event)
        self.metrics.notified(kind, not problems)
        for problem in problems:
            self.report({"event": "notification_failed", "task": task.key, "message": problem})

    def status_lines(self) -> list[str]:
        return [p.line() for p in list(self.progress.values())]


def _describe(error: BlocktrailError) -> str:
    return f"{type(error).__name__}: {error.message}"


# ---------------------------------------------------------------------- the state file

def load_state(path: str) -> tuple[dict[str, TaskState], dict[str, float]]:
    """The tasks' states and the repositories' last checks (nothing yet: empty)."""
    afresh = "move it away to start afresh (every job then runs at once)"
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read())
    except FileNotFoundError:
        return {}, {}
    except OSError as exc:
        raise io_error(f"the worker's state file {path} cannot be read", exc) from None
    except ValueError as exc:
        raise CorruptMetadata(f"the worker's state file {path} cannot be read ({exc}); "
                              f"{afresh}") from None
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise CorruptMetadata(f"{path} is not a worker state file; {afresh}")
    try:
        return _tasks(doc.get("tasks", {})), _checks(doc.get("checks", {}))
    except ValueError as exc:
        raise CorruptMetadata(f"the worker's state file {path} is damaged ({exc}); "
                              f"{afresh}") from None


def _tasks(obj: Any) -> dict[str, TaskState]:
    if not isinstance(obj, dict):
        raise ValueError(f"tasks is not an object: {obj!r}")
    tasks = {}
    for key, value in obj.items():
        try:
            tasks[key] = TaskState.from_json(value)
        except ValueError as exc:
            raise ValueError(f"task {key!r}: {exc}") from None
    return tasks


def _checks(obj: Any) -> dict[str, float]:
    if not isinstance(obj, dict):
        raise ValueError(f"checks is not an object: {obj!r}")
    for key, value in obj.items():
        if not is_unix_time(value):
            raise ValueError(f"check of {key!r} is not a time: {value!r}")
    return {key: float(value) for key, value in obj.items()}


def save_state(path: str, states: dict[str, TaskState], checks: dict[str, float]) -> None:
    doc = {"format": STATE_FORMAT, "version": 1,
           "tasks": {k: s.to_json() for k, s in sorted(states.items())}, "checks": checks}
    directory = os.path.dirname(os.path.abspath(path))
    fio = OsFileIO()
    fio.makedirs(directory)
    fio.replace_atomic(path, (json.dumps(doc, indent=1) + "\n").encode())
