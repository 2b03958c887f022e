"""`blocktrail worker --config jobs.toml [--once]`: run backup jobs on their schedules."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import click

from blocktrail.cli.disk import json_option
from blocktrail.cli.output import ExitCode, printable

if TYPE_CHECKING:
    from blocktrail.worker.worker import Worker

STATUS_REFRESH_S = 1.0


@click.command("worker")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="The job file (TOML; docs/jobs.md).")
@click.option("--once", is_flag=True,
              help="Run every job that is due now once, then exit (0: all succeeded; else the "
                   "exit code of the first failure).")
@click.option("--metrics", default=None, metavar="HOST:PORT",
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (also [worker] "
                   "metrics in the job file).")
@json_option
def worker(config_path: str, once: bool, metrics: str | None, as_json: bool) -> None:
    """Back up the disks and VMs of hosts on the schedules of a job file: retention after
    each backup, verify and check when due, notifications on failure. SIGTERM or Ctrl-C:
    no new jobs, the running ones finish (a second one stops at once)."""
    from blocktrail.repo.leases import timing_from_environment
    from blocktrail.worker.config import load_config
    from blocktrail.worker.metrics import serve_metrics
    from blocktrail.worker.worker import Worker

    config = load_config(config_path)
    display = _Display(as_json)
    work = Worker(config, report=display.report, timing=timing_from_environment())
    address = metrics or config.metrics
    server = serve_metrics(work.metrics, address) if address else None
    try:
        with _stop_on_signals(work), display.live(work):
            if once:
                code = work.run_once()
            else:
                work.serve()
                code = 0
    finally:
        if server is not None:
            server.shutdown()  # type: ignore[attr-defined]
    if code:
        raise ExitCode(code)


@contextlib.contextmanager
def _stop_on_signals(work: Worker) -> Iterator[None]:
    import signal

    stops = 0

    def handler(signum: int, _frame: Any) -> None:
        nonlocal stops
        stops += 1
        if stops > 1:
            raise KeyboardInterrupt
        click.echo("stopping: no new jobs; waiting for the running ones (again: stop now)",
                   err=True)
        work.stop()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


class _Display:
    """What the worker says: a JSON line per event on stdout (--json); otherwise a line per
    event on stderr and, on a terminal, one live line per running job."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self._live: Any = None

    def report(self, line: dict[str, Any]) -> None:
        if self.as_json:
            click.echo(json.dumps(line, default=str))
            return
        text = printable(_human(line))
        if self._live is not None:
            self._live.console.print(text, markup=False, highlight=False)
        else:
            click.echo(text, err=True)

    @contextlib.contextmanager
    def live(self, work: Worker) -> Iterator[None]:
        if self.as_json or not sys.stderr.isatty():
            yield
            return
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        def render() -> Text:
            lines = work.status_lines()
            return Text("\n".join(lines) if lines else "(no job running)")

        with Live(get_renderable=render, console=Console(stderr=True),
                  refresh_per_second=1 / STATUS_REFRESH_S, transient=True) as live:
            self._live = live
            try:
                yield
            finally:
                self._live = None


def _human(line: dict[str, Any]) -> str:
    event, task = line.get("event"), line.get("task")
    if event == "started":
        extra = [w for w in ("verify", "check") if line.get(w)]
        return f"{task}: started (attempt {line['attempt']})" + (
            f", with {' and '.join(extra)}" if extra else "")
    if event == "succeeded":
        parts = []
        for d in line["disks"]:
            text = (f"{d['disk']}: {d['kind']} {d['point_id']}, read "
                    f"{d['bytes_read']} B, stored {d['bytes_stored']} B")
            if d["fallback_reason"]:
                text += f" (full, because {d['fallback_reason']})"
            if d["audit_mismatches"]:
                text += "; AUDIT MISMATCH: the tracker missed changes"
            if d["verify"]:
                text += f"; verify: {d['verify']}"
            if d["forgotten"]:
                text += f"; forgot {len(d['forgotten'])} points"
            if d.get("kept_for_taint"):
                text += (f"; kept {', '.join(d['kept_for_taint'])} beyond the policy: a kept "
                         "point builds on them, and they are no base (blocktrail forget "
                         "says why)")
            parts.append(text)
        return f"{task}: done in {line['seconds']} s: " + "; ".join(parts)
    if event == "failed":
        then = "gave up until its next time" if line["gave_up"] else "will retry"
        return f"{task}: FAILED ({line['error']}: {line['message']}); {then}"
    return f"{task}: {event}: {line.get('message', '')}"
