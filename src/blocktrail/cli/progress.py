"""Progress for whatever a person waits on: a bar with bytes, rate and ETA on a terminal; with
``--json``, a JSON line on stderr at most once a second (stdout keeps the one JSON answer);
otherwise nothing.

The library reports progress as ``(done, total)`` in its own units (chunks for backup, restore
and verify, bytes for an import); ``unit_bytes`` turns them into bytes. Work that reports no
progress at all (check, prune) gets a spinner with the time elapsed.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO

Progress = Callable[[int, int], None]
JSON_INTERVAL_S = 1.0


class JsonLines:
    """``{"progress": LABEL, "done_bytes": N, "total_bytes": N, "rate_bytes_per_s": R,
    "eta_s": S}`` lines, at most one per ``interval_s``."""

    def __init__(self, label: str, unit_bytes: int, stream: TextIO,
                 clock: Callable[[], float] = time.monotonic,
                 interval_s: float = JSON_INTERVAL_S) -> None:
        self._label, self._unit, self._stream, self._clock = label, unit_bytes, stream, clock
        self._interval = interval_s
        self._started = self._last = clock()

    def __call__(self, done: int, total: int) -> None:
        now = self._clock()
        if now - self._last < self._interval:
            return
        self._last = now
        self._stream.write(json.dumps(line(self._label, done * self._unit, total * self._unit,
                                           now - self._started)) + "\n")
        self._stream.flush()


def line(label: str, done_bytes: int, total_bytes: int, elapsed_s: float) -> dict[str, object]:
    """One progress report: bytes done of total, the rate so far and the time left at it."""
    rate = done_bytes / elapsed_s if elapsed_s > 0 else 0.0
    eta = (total_bytes - done_bytes) / rate if rate > 0 and total_bytes >= done_bytes else None
    return {"progress": label, "done_bytes": done_bytes, "total_bytes": total_bytes,
            "rate_bytes_per_s": round(rate), "eta_s": None if eta is None else round(eta, 1)}


@contextlib.contextmanager
def progress_bar(label: str, as_json: bool, *, unit_bytes: int = 1,
                 stream: TextIO | None = None) -> Iterator[Progress | None]:
    """A progress callback for ``label`` (None: nobody is watching)."""
    out = stream or sys.stderr
    if as_json:
        yield JsonLines(label, unit_bytes, out)
        return
    if not out.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = Console(file=out)
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), transient=True,
                  console=console) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done * unit_bytes,
                                             total=total * unit_bytes)


@contextlib.contextmanager
def spinner(label: str, as_json: bool, *, stream: TextIO | None = None) -> Iterator[None]:
    """For work that cannot say how far it is: a spinner and the time elapsed on a terminal,
    nothing otherwise."""
    out = stream or sys.stderr
    if as_json or not out.isatty():
        yield
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), "[progress.description]{task.description}",
                  TimeElapsedColumn(), transient=True, console=Console(file=out)) as bar:
        bar.add_task(label, total=None)
        yield
