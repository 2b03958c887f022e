"""The worker's scheduling with a fake clock: due, missed and overlapping runs, limits and
per-host fairness, retries with backoff, calendar times; the Worker loop with a fake task
runner; the state file across restarts."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from blocktrail.errors import BlocktrailError, HostUnreachable
from blocktrail.worker.config import JobConfig, WorkerConfig, parse_config
from blocktrail.worker.runner import DiskRun, JobProgress, RunOptions, RunResult
from blocktrail.worker.scheduler import Scheduler, Task, next_calendar
from blocktrail.worker.worker import Worker, load_state

T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC).timestamp()  # a Monday, 10:00 UTC
HOUR = 3600.0


def config(text: str, tmp_path: Path | None = None) -> WorkerConfig:
    state = f'state = "{tmp_path / "state.json"}"\n' if tmp_path else ""
    return parse_config(f'[worker]\ntimezone = "UTC"\n{state}{text}', "/etc/jobs.toml")


def job(name: str, host: str = "unix:/h1", *, disks: str = '["d0"]', extra: str = "") -> str:
    return (f'[[job]]\nname = "{name}"\nhost = "{host}"\ndisks = {disks}\n'
            f'repository = "/r"\nevery = "1h"\n{extra}\n')


def test_a_task_that_never_ran_is_due_at_once_then_every_interval() -> None:
    sched = Scheduler(config(job("a")))
    (task,) = sched.tasks
    assert sched.pick(T0) == [task]
    assert sched.pick(T0) == []  # running: never twice
    sched.finished(task, T0, ok=True)
    assert sched.due_at(task) == T0 + HOUR
    assert sched.pick(T0 + HOUR - 1) == []
    assert sched.pick(T0 + HOUR) == [task]


def test_a_missed_run_runs_once_at_start_not_once_per_missed_interval(tmp_path: Path) -> None:
    cfg = config(job("a"), tmp_path)
    sched = Scheduler(cfg)
    (task,) = sched.tasks
    sched.pick(T0)
    sched.finished(task, T0, ok=True)
    from blocktrail.worker.worker import save_state
    save_state(cfg.state_path, sched.states, {})
    # the worker is down for 5 hours, then starts again
    again = Scheduler(cfg, load_state(cfg.state_path)[0])
    assert again.pick(T0 + 5 * HOUR) == [again.tasks[0]]
    again.finished(again.tasks[0], T0 + 5 * HOUR, ok=True)
    assert again.pick(T0 + 5 * HOUR + 1) == []
    assert again.due_at(again.tasks[0]) == T0 + 6 * HOUR


def test_an_overlong_run_is_followed_by_one_run_not_a_pile_up() -> None:
    sched = Scheduler(config(job("a")))
    (task,) = sched.tasks
    sched.pick(T0)
    for hour in range(1, 4):  # due three times while it runs
        assert sched.pick(T0 + hour * HOUR) == []
    sched.finished(task, T0, ok=True)  # the schedule counts from the run's start
    assert sched.pick(T0 + 3.5 * HOUR) == [task]
    sched.finished(task, T0 + 3.5 * HOUR, ok=True)
    assert sched.pick(T0 + 3.6 * HOUR) == []


def test_concurrency_limit_and_per_host_fairness() -> None:
    jobs = (job("a", "unix:/h1", disks='["d0", "d1", "d2", "d3"]')
            + job("b", "unix:/h2", disks='["e0"]') + job("c", "unix:/h3", disks='["f0"]'))
    sched = Scheduler(config("max_jobs = 3\nmax_per_host = 2\n" + jobs))
    first = sched.pick(T0)
    assert len(first) == 3
    assert {t.host for t in first} == {"unix:/h1", "unix:/h2", "unix:/h3"}  # no host starves
    assert sched.pick(T0) == []  # the limit
    done = next(t for t in first if t.host == "unix:/h2")
    sched.finished(done, T0, ok=True)
    (second,) = sched.pick(T0 + 1)
    assert second.host == "unix:/h1"  # h1 runs one: may run a second
    h1 = next(t for t in first if t.host == "unix:/h1")
    sched.finished(h1, T0, ok=True)
    sched.finished(next(t for t in first if t.host == "unix:/h3"), T0, ok=True)
    third = sched.pick(T0 + 2)
    assert len(third) == 1 and third[0].host == "unix:/h1"  # max_per_host = 2 on h1


def test_retries_back_off_then_give_up_until_the_next_regular_time() -> None:
    sched = Scheduler(config(job("a", extra='retries = 2\nretry_backoff = "1m"')))
    (task,) = sched.tasks
    sched.pick(T0)
    first = sched.finished(task, T0, ok=False, error="boom")
    assert first.retry_at == T0 + 60 and not first.gave_up
    assert sched.pick(T0 + 59) == [] and sched.pick(T0 + 60) == [task]
    second = sched.finished(task, T0 + 60, ok=False, error="boom")
    assert second.retry_at == T0 + 60 + 120  # doubled
    assert sched.pick(T0 + 180) == [task]
    third = sched.finished(task, T0 + 180, ok=False, error="boom")
    assert third.gave_up and third.retry_at is None
    assert sched.due_at(task) == T0 + 180 + HOUR  # next regular time, from the failed run
    assert sched.state(task).last_error == "boom"
    sched.pick(T0 + 180 + HOUR)
    assert sched.finished(task, T0 + 180 + HOUR, ok=True).ok
    assert sched.state(task).failures == 0 and sched.state(task).last_error is None


def test_backoff_is_capped() -> None:
    cfg = config('max_backoff = "5m"\n' + job("a", extra='retries = 10\nretry_backoff = "1m"'))
    sched = Scheduler(cfg)
    (task,) = sched.tasks
    now = T0
    for _ in range(6):
        sched.pick(now)
        outcome = sched.finished(task, now, ok=False)
        assert outcome.retry_at is not None and outcome.retry_at - now <= 300
        now = outcome.retry_at


def test_calendar_times() -> None:
    cfg = config('[[job]]\nname = "n"\nhost = "unix:/h"\ndisks = ["d"]\nrepository = "/r"\n'
                 'at = ["02:30", "Sun 12:00"]\n')
    schedule = cfg.jobs[0].schedule
    monday_10 = T0
    assert next_calendar(schedule, monday_10, UTC) == \
        datetime(2026, 3, 3, 2, 30, tzinfo=UTC).timestamp()
    saturday_3 = datetime(2026, 3, 7, 3, 0, tzinfo=UTC).timestamp()
    assert next_calendar(schedule, saturday_3, UTC) == \
        datetime(2026, 3, 8, 2, 30, tzinfo=UTC).timestamp()
    sunday_3 = datetime(2026, 3, 8, 3, 0, tzinfo=UTC).timestamp()
    assert next_calendar(schedule, sunday_3, UTC) == \
        datetime(2026, 3, 8, 12, 0, tzinfo=UTC).timestamp()
    sched = Scheduler(cfg)
    (task,) = sched.tasks
    sched.pick(monday_10)
    sched.finished(task, monday_10, ok=True)
    assert sched.pick(datetime(2026, 3, 3, 2, 29, tzinfo=UTC).timestamp()) == []
    # the worker was down over two 02:30s: one run at start
    assert sched.pick(datetime(2026, 3, 5, 9, 0, tzinfo=UTC).timestamp()) == [task]


def test_a_vm_job_is_one_task_and_verify_comes_due() -> None:
    cfg = config('[[job]]\nname = "web"\nhost = "unix:/h"\nvm = "web"\nrepository = "/r"\n'
                 'every = "1h"\nverify_every = "1d"\n')
    sched = Scheduler(cfg)
    (task,) = sched.tasks
    assert task.target == "web" and task.key == "web/web"
    assert sched.verify_due(task, T0)
    sched.pick(T0)
    sched.finished(task, T0, ok=True, verified=True)
    assert not sched.verify_due(task, T0 + HOUR)
    assert sched.verify_due(task, T0 + 24 * HOUR)


# ----------------------------------------------------------------------------- the loop


class FakeClock:
    """Time moves only when the worker waits with nothing else to do."""

    def __init__(self, start: float) -> None:
        self.t = start
        self.waits: list[float] = []

    def now(self) -> float:
        return self.t

    def wait(self, event: threading.Event, timeout: float) -> bool:
        if event.wait(0.05):  # a task finished: no time passes
            return True
        self.waits.append(timeout)
        self.t += timeout
        return False


def _result(task: Task) -> RunResult:
    run = DiskRun(task.target, f"id-{task.target}", f"p-{task.target}", "incremental", None,
                  10, 5, 16, (), ())
    return RunResult((run,), 0.01)


def test_worker_loop_runs_on_schedule_retries_and_reports(tmp_path: Path) -> None:
    cfg = config(job("a", extra='retries = 1\nretry_backoff = "1m"\nnotify = { webhook = '
                                '"http://127.0.0.1:9/hook" }'), tmp_path)
    clock = FakeClock(T0)
    calls: list[tuple[str, float]] = []
    events: list[Any] = []

    def run(task: Task, options: RunOptions, progress: JobProgress) -> RunResult:
        calls.append((task.key, clock.now()))
        if len(calls) in (2, 3):  # the second run fails, and its one retry
            raise HostUnreachable("the host is down")
        return _result(task)

    worker = Worker(cfg, clock=clock, run=run,
                    notify=lambda job_, event: events.append(event) or [])
    stopper = threading.Thread(target=lambda: _stop_after(worker, calls, 5))
    stopper.start()
    worker.serve()
    stopper.join()
    times = [t - T0 for _, t in calls]
    assert times[:5] == [0, HOUR, HOUR + 60, 2 * HOUR + 60, 3 * HOUR + 60]
    assert [e.kind for e in events] == ["failure"]  # once, after the retry failed too
    assert "the host is down" in events[0].message
    state = load_state(cfg.state_path)[0]["a/d0"]
    assert state.last_success == T0 + 3 * HOUR + 60 and state.failures == 0


def _stop_after(worker: Worker, calls: list[Any], count: int) -> None:
    import time
    deadline = time.monotonic() + 30
    while len(calls) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.stop()


def test_once_runs_what_is_due_and_exits_with_the_first_failure(tmp_path: Path) -> None:
    cfg = config("max_jobs = 2\n" + job("a", disks='["d0", "d1"]') + job("b", "unix:/h2"),
                 tmp_path)
    clock = FakeClock(T0)
    ran: list[str] = []

    def run(task: Task, options: RunOptions, progress: JobProgress) -> RunResult:
        ran.append(task.key)
        if task.key == "b/d0":
            raise HostUnreachable("no")
        return _result(task)

    assert Worker(cfg, clock=clock, run=run).run_once() == HostUnreachable.exit_code
    assert sorted(ran) == ["a/d0", "a/d1", "b/d0"]
    ran.clear()
    clock.t += 10
    assert Worker(cfg, clock=clock, run=run).run_once() == 0  # nothing due: b backs off
    assert ran == []
    clock.t += 60
    Worker(cfg, clock=clock, run=run).run_once()
    assert ran == ["b/d0"]


def test_a_due_task_waiting_for_a_slot_does_not_spin(tmp_path: Path) -> None:
    cfg = config("max_jobs = 1\n" + job("a", disks='["d0", "d1"]'), tmp_path)
    clock = FakeClock(T0)
    ran: list[str] = []
    started: list[float] = []
    ended: list[float] = []

    def run(task: Task, options: RunOptions, progress: JobProgress) -> RunResult:
        ran.append(task.key)
        started.append(clock.now())
        import time
        time.sleep(0.3)  # d1 is due meanwhile, and has no slot
        ended.append(clock.now())
        return _result(task)

    worker = Worker(cfg, clock=clock, run=run)
    stopper = threading.Thread(target=lambda: _stop_after(worker, ran, 2))
    stopper.start()
    worker.serve()
    stopper.join()
    assert sorted(ran) == ["a/d0", "a/d1"]
    assert all(w > 0 for w in clock.waits), clock.waits
    # d1 starts as soon as d0's run ends and frees the slot, not a sleep (60 s) later
    assert started[1] == ended[0], (started, ended)


def test_a_bug_in_a_run_is_a_failure_not_the_end_of_the_worker(tmp_path: Path) -> None:
    cfg = config(job("a", extra="retries = 0"), tmp_path)

    def run(task: Task, options: RunOptions, progress: JobProgress) -> RunResult:
        raise ZeroDivisionError("oops")

    worker = Worker(cfg, clock=FakeClock(T0), run=run)
    assert worker.run_once() == BlocktrailError.exit_code
    assert "ZeroDivisionError" in (load_state(cfg.state_path)[0]["a/d0"].last_error or "")


def test_jobs_of_the_worker_config(tmp_path: Path) -> None:
    cfg = config(job("a"), tmp_path)
    assert isinstance(cfg.jobs[0], JobConfig)
    with pytest.raises(BlocktrailError, match="cannot be read"):
        (tmp_path / "state.json").write_text("{nope")
        load_state(cfg.state_path)


def test_a_lying_tracker_and_a_differing_verify_are_notified(tmp_path: Path) -> None:
    from blocktrail.extents import Extent
    from blocktrail.worker.runner import CheckRun

    cfg = config(job("a", extra='notify = { command = ["true"] }'), tmp_path)
    events: list[Any] = []

    def run(task: Task, options: RunOptions, progress: JobProgress) -> RunResult:
        disk = DiskRun("d0", "id", "p1", "incremental", None, 10, 5, 16,
                       (Extent(0, 65536),), (), verify="differences",
                       verify_differences=(Extent(65536, 65536),), healed_point="p2")
        return RunResult((disk,), 0.1, check=CheckRun(False, 2, 10, 5.0))

    worker = Worker(cfg, clock=FakeClock(T0), run=run,
                    notify=lambda job_, event: events.append(event) or [])
    assert worker.run_once() == 0
    kinds = [e.kind for e in events]
    assert kinds == ["audit_mismatch", "verify_differences", "verify_differences"]
    assert events[0].details["areas"] == [[0, 65536]]
    assert events[1].details["healed_point"] == "p2"
    assert events[2].details["problems"] == 2
    body = events[0].body()
    assert body["event"] == "audit_mismatch" and body["job"] == "a" and body["target"] == "d0"
    assert worker.metrics.registry.get_sample_value(
        "blocktrail_job_audit_mismatches_total", {"job": "a", "disk": "d0"}) == 1
    assert worker.metrics.registry.get_sample_value(
        "blocktrail_worker_notifications_total",
        {"event": "verify_differences", "delivery": "sent"}) == 2


def test_notifications_are_delivered_to_a_command(tmp_path: Path) -> None:
    from blocktrail.worker.config import Notify
    from blocktrail.worker.notify import Event, deliver

    out = tmp_path / "body.json"
    event = Event("failure", "j", "d0", "unix:/h", "/r", "it failed", T0, {"attempts": 4})
    assert deliver(Notify(command=("sh", "-c", f"cat > {out}")), event) == []
    import json
    assert json.loads(out.read_text())["details"] == {"attempts": 4}
    problems = deliver(Notify(command=("false",)), event)
    assert problems and "exit code 1" in problems[0]
    assert deliver(Notify(command=("false",), events=frozenset({"audit_mismatch"})), event) == []
    unreachable = deliver(Notify(webhook="http://127.0.0.1:9/none"), event)
    assert unreachable and "webhook" in unreachable[0]


def test_a_check_is_recorded_only_once_it_ended(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker killed while a task checks the repository checks it again after a restart:
    the state file another task's end writes meanwhile does not say it was checked."""
    from blocktrail.worker import worker as worker_module

    cfg = config("max_jobs = 2\nmax_per_host = 2\n"
                 + job("a", disks='["d0", "d1"]', extra='check_every = "1w"'), tmp_path)
    hold, saved = threading.Event(), threading.Event()
    checked: list[str] = []
    real_save = worker_module.save_state

    def save(*args: Any) -> None:
        real_save(*args)
        saved.set()

    monkeypatch.setattr(worker_module, "save_state", save)

    def run(task: Task, options: RunOptions, progress: JobProgress) -> RunResult:
        if options.check:
            checked.append(task.key)
            assert hold.wait(30)  # checking while the other task ends
        return _result(task)

    first = Worker(cfg, clock=FakeClock(T0), run=run)
    runner = threading.Thread(target=first.run_once)
    runner.start()
    try:
        assert saved.wait(30)  # the other task ended and the state file was written
        assert len(checked) == 1
        assert load_state(cfg.state_path)[1] == {}
        # the worker is killed here; one started again runs the unfinished task, and checks
        again: list[tuple[str, bool]] = []
        restarted = Worker(cfg, clock=FakeClock(T0 + 60), run=lambda task, options, _: (
            again.append((task.key, options.check)) or _result(task)))
        assert restarted.run_once() == 0
        assert again == [(checked[0], True)]
    finally:
        hold.set()
        runner.join()
    assert load_state(cfg.state_path)[1] == {"/r": T0}  # recorded at its end, from its start


@pytest.mark.parametrize("doc", [
    '{"format": "blocktrail-worker-state", "tasks": {"j/d0": {"failures": "x"}}}',
    '{"format": "blocktrail-worker-state", "tasks": {"j/d0": {"failures": -1}}}',
    '{"format": "blocktrail-worker-state", "tasks": {"j/d0": {"last_success": "noon"}}}',
    '{"format": "blocktrail-worker-state", "tasks": {"j/d0": {"last_success": Infinity}}}',
    '{"format": "blocktrail-worker-state", "tasks": {"j/d0": {"last_error": 3}}}',
    '{"format": "blocktrail-worker-state", "tasks": {"j/d0": [1]}}',
    '{"format": "blocktrail-worker-state", "tasks": "abc"}',
    '{"format": "blocktrail-worker-state", "tasks": [["a", 1]]}',
    '{"format": "blocktrail-worker-state", "checks": [1]}',
    '{"format": "blocktrail-worker-state", "checks": {"/r": "yesterday"}}',
    '{"format": "blocktrail-worker-state", "checks": {"/r": NaN}}',
    '{"format": "other"}',
    '[1, 2]',
    '{nope',
])
def test_a_damaged_state_file_stops_the_worker_saying_so(tmp_path: Path, doc: str) -> None:
    from blocktrail.errors import CorruptMetadata

    cfg = config(job("j"), tmp_path)
    (tmp_path / "state.json").write_text(doc)
    with pytest.raises(CorruptMetadata, match="move it away to start afresh"):
        Worker(cfg, clock=FakeClock(T0), run=lambda *_: RunResult((), 0.0))
    assert (tmp_path / "state.json").read_text() == doc  # left as it was


def test_a_state_file_as_written_is_read_back(tmp_path: Path) -> None:
    cfg = config(job("j"), tmp_path)
    (tmp_path / "state.json").write_text(
        '{"format": "blocktrail-worker-state", "version": 1, "tasks": {"j/d0": '
        '{"last_success": 10, "schedule_from": 10.5, "last_attempt": null, "failures": 2, '
        '"last_error": "HostUnreachable: no", "last_verify": null}}, "checks": {"/r": 7}}')
    tasks, checks = load_state(cfg.state_path)
    assert tasks["j/d0"].failures == 2 and tasks["j/d0"].schedule_from == 10.5
    assert checks == {"/r": 7.0}
