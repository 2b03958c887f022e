"""How the background fill paces itself: big steps while the guest is idle, small steps and
rests while it does I/O, a rate limit kept, failures retried after 1, 2, 4, ... units (reset
by a good step), a pause by request held."""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

from blocktrail.disk import Disk
from blocktrail.disk.restoring import ChunkUnavailable, FillProgress
from blocktrail.host.fill import FillJob, FillPolicy

CS = 64 * 1024
POLICY = FillPolicy(idle_chunks=8, busy_chunks=2, busy_share=0.5, first_retry_s=0.05,
                    max_retry_s=0.2)


class FakeDisk:
    """What a fill job uses of a restoring disk; each step takes ``step_s``."""

    def __init__(self, chunks: int, step_s: float = 0.01) -> None:
        self.chunks, self.local, self.step_s = chunks, 0, step_s
        self.io_requests = 0
        self.steps: list[tuple[float, int, bool]] = []  # (when, chunks asked, failed)
        self.failures = 0
        self.restore_source = None
        self.restore_origin = {"repository": "/r", "point": "P"}
        self.lock = threading.Lock()

    @property
    def restore_progress(self) -> FillProgress | None:
        if self.local >= self.chunks:
            return None
        return FillProgress(self.chunks, self.local, self.chunks - self.local)

    def fill(self, count: int) -> FillProgress:
        time.sleep(self.step_s)
        with self.lock:
            failed = self.failures > 0
            self.steps.append((time.monotonic(), count, failed))
            if failed:
                self.failures -= 1
                raise ChunkUnavailable("chunk 3 of restore point P cannot be read: damaged")
            self.local = min(self.chunks, self.local + count)
            return FillProgress(self.chunks, self.local, self.chunks - self.local)


def run_job(disk: FakeDisk, **kwargs: Any) -> FillJob:
    job = FillJob("d0", cast(Disk, disk), POLICY, **kwargs)
    job.start()
    return job


def wait_finished(job: FillJob, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while job.running:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert job.finished


def test_idle_guest_big_steps_no_rests() -> None:
    disk = FakeDisk(64)
    started = time.monotonic()
    wait_finished(run_job(disk))
    assert [n for _, n, _ in disk.steps] == [8] * 8
    assert time.monotonic() - started < 8 * disk.step_s + 1.0


def test_busy_guest_small_steps_and_rests() -> None:
    disk = FakeDisk(40, step_s=0.02)
    stop = threading.Event()

    def guest() -> None:
        while not stop.is_set():
            disk.io_requests += 1
            time.sleep(0.001)

    thread = threading.Thread(target=guest)
    thread.start()
    try:
        job = run_job(disk)
        wait_finished(job)
    finally:
        stop.set()
        thread.join()
    sizes = [n for _, n, _ in disk.steps]
    assert sizes[0] == 8 and set(sizes[1:]) == {2}  # the first step knows of no I/O yet
    times = [t for t, _, _ in disk.steps]
    gaps = [b - a for a, b in itertools.pairwise(times[1:])]
    # each step works ~20 ms and then rests as long: ~40 ms from one to the next
    assert sum(gaps) / len(gaps) >= 0.035


def test_a_rate_limit_is_kept() -> None:
    disk = FakeDisk(20, step_s=0.0)
    started = time.monotonic()
    wait_finished(run_job(disk, rate=40 * CS))  # 40 chunks a second
    assert [n for _, n, _ in disk.steps] == [8, 8, 8]  # at most a quarter second's worth
    # 8 chunks are a fifth of a second's worth: the second step waits 0.2 s, the third 0.4 s
    times = [t for t, _, _ in disk.steps]
    assert times[1] - started >= 0.19 and times[2] - started >= 0.39


@contextlib.contextmanager
def _on_the_fill_log(handler: logging.Handler) -> Iterator[None]:
    """``handler`` sees the fill's log records while the block runs."""
    logger = logging.getLogger("blocktrail.restore")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


class _Delays(logging.Handler):
    """The delays the fill chose, as its warnings carry them (unrounded)."""

    def __init__(self) -> None:
        super().__init__()
        self.delays: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno == logging.WARNING and isinstance(record.args, tuple):
            self.delays.append(cast(float, record.args[1]))


def test_failures_are_retried_with_backoff_and_a_good_step_resets_it() -> None:
    delays = _Delays()
    with _on_the_fill_log(delays):
        disk = FakeDisk(32, step_s=0.0)
        disk.failures = 4
        job = run_job(disk)
        wait_finished(job)
        failed = [t for t, _, f in disk.steps if f]
        gaps = [b - a for a, b in itertools.pairwise(failed)]
        assert len(failed) == 4
        # doubling up to the maximum; each retry waits at least its delay (a loaded machine
        # may wake it later, so no upper bound on the gaps)
        assert delays.delays == [0.05, 0.1, 0.2, 0.2]
        assert all(gap >= delay - 0.001 for gap, delay in zip(gaps, delays.delays, strict=False))
        assert job.error is not None and "chunk 3 of restore point P" in job.error
        assert disk.local == 32
        # after a good step, the next failure waits the first delay again
        delays.delays.clear()
        disk2 = FakeDisk(32, step_s=0.0)
        disk2.failures = 1

        def fail_after_a_good_step(count: int, fill: Callable[[int], FillProgress] = disk2.fill
                                    ) -> FillProgress:
            if len(disk2.steps) == 1:  # the first step failed: this one succeeds, then fail
                progress = fill(count)
                disk2.failures = 1
                return progress
            return fill(count)

        disk2.fill = fail_after_a_good_step  # type: ignore[method-assign]
        job2 = run_job(disk2)
        wait_finished(job2)
        assert [failed for _, _, failed in disk2.steps][:3] == [True, False, True]
        assert delays.delays[:2] == [0.05, 0.05]


def test_a_pause_holds_the_fill_until_resumed() -> None:
    disk = FakeDisk(16, step_s=0.0)
    job = run_job(disk, paused=True)
    time.sleep(0.2)
    assert disk.steps == [] and job.running
    job.control(paused=False, rate=None)
    wait_finished(job)
    assert disk.local == 16


def test_stop_ends_a_job_waiting_to_retry() -> None:
    disk = FakeDisk(16, step_s=0.0)
    disk.failures = 100
    job = run_job(disk)
    time.sleep(0.3)
    started = time.monotonic()
    job.stop()
    assert not job.running and time.monotonic() - started < 1.0
    assert not job.finished


def test_a_control_call_ends_the_wait_before_a_retry() -> None:
    slow = FillPolicy(idle_chunks=8, first_retry_s=30, max_retry_s=30)
    disk = FakeDisk(16, step_s=0.0)
    disk.failures = 1
    job = FillJob("d0", cast(Disk, disk), slow)
    job.start()
    _wait_for(lambda: job.retry_at is not None)
    job.control(paused=False, rate=None)  # e.g. the repository is back
    wait_finished(job, timeout_s=5)


def test_a_control_call_between_the_failure_and_the_wait_is_not_lost() -> None:
    """The control call lands after the failure is recorded but before the job begins to
    wait (here: while it logs the failure); the wait still ends at once."""
    slow = FillPolicy(idle_chunks=8, first_retry_s=30, max_retry_s=30)
    disk = FakeDisk(16, step_s=0.0)
    disk.failures = 1
    job = FillJob("d0", cast(Disk, disk), slow)

    class KickOnWarning(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno == logging.WARNING and job.retry_at is not None:
                job.control(paused=False, rate=None)

    with _on_the_fill_log(KickOnWarning()):
        job.start()
        wait_finished(job, timeout_s=5)
    assert [failed for _, _, failed in disk.steps] == [True, False, False]


def test_a_control_call_while_the_failing_step_runs_is_not_lost() -> None:
    """The repository is mended (and the user says so) while a step that fails runs, e.g. a
    step hanging on a store that is away: the retry comes at once, not after the delay."""
    slow = FillPolicy(idle_chunks=8, first_retry_s=30, max_retry_s=30)
    inside, go_on = threading.Event(), threading.Event()

    class HeldStep(FakeDisk):
        def fill(self, count: int) -> FillProgress:
            if not self.steps:  # the first step waits until the control call was made
                inside.set()
                assert go_on.wait(10)
            return super().fill(count)

    disk = HeldStep(16, step_s=0.0)
    disk.failures = 1
    job = FillJob("d0", cast(Disk, disk), slow)
    job.start()
    assert inside.wait(10)
    job.control(paused=False, rate=None)  # while the step that fails runs
    go_on.set()
    wait_finished(job, timeout_s=5)
    assert [failed for _, _, failed in disk.steps] == [True, False, False]


def test_a_new_rate_ends_a_rest_taken_at_the_old_one() -> None:
    disk = FakeDisk(16, step_s=0.0)
    job = run_job(disk, rate=CS // 30)  # one chunk, then 30 s of rest
    _wait_for(lambda: len(disk.steps) == 1)
    job.control(paused=False, rate=None)  # no limit now
    wait_finished(job, timeout_s=5)


def _wait_for(condition: Any, timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_a_pause_earns_no_burst_under_a_rate_limit() -> None:
    disk = FakeDisk(40, step_s=0.0)
    job = run_job(disk, rate=40 * CS)  # steps of 8 chunks, one every 0.2 s
    _wait_for(lambda: disk.local >= 8)
    job.control(paused=True, rate=40 * CS)
    time.sleep(0.8)  # four steps' worth of time, paused
    done = len(disk.steps)
    resumed = time.monotonic()
    job.control(paused=False, rate=40 * CS)
    wait_finished(job)
    after = [t - resumed for t, _, _ in disk.steps[done:]]
    # the rest at the rate, from the resumption on (not all at once to catch up)
    assert len(after) >= 3 and after[-1] >= (len(after) - 1) * 0.2 - 0.02, after


def test_an_outage_earns_no_burst_under_a_rate_limit() -> None:
    disk = FakeDisk(40, step_s=0.0)
    job = run_job(disk, rate=40 * CS)
    _wait_for(lambda: disk.local >= 8)
    disk.failures = 4  # the store is away for 0.05 + 0.1 + 0.2 + 0.2 s of retries
    _wait_for(lambda: len([s for s in disk.steps if s[2]]) == 4 and job.retry_at is None
              and disk.local > 8)
    back = next(t for t, _, failed in disk.steps if not failed and t > disk.steps[1][0])
    wait_finished(job)
    after = [t - back for t, _, failed in disk.steps if not failed and t >= back]
    assert len(after) >= 3 and after[-1] >= (len(after) - 1) * 0.2 - 0.02, after
