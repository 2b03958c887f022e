"""Notifications: a JSON body POSTed to a job's webhook and/or given to its command on stdin,
when a job fails (its retries used up), when an audit caught the tracker missing changes, and
when a verify found differences. A notification that cannot be delivered is reported, never
fatal to the job."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from blocktrail import __version__
from blocktrail.worker.config import Notify

WEBHOOK_TIMEOUT_S = 10.0
COMMAND_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # "failure" | "audit_mismatch" | "verify_differences"
    job: str
    target: str
    host: str
    repository: str
    message: str
    time: float
    details: dict[str, Any] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {"event": self.kind, "job": self.job, "target": self.target, "host": self.host,
                "repository": self.repository, "message": self.message,
                "time": datetime.fromtimestamp(self.time, UTC).isoformat(),
                "details": self.details, "source": f"blocktrail {__version__}"}


def deliver(notify: Notify, event: Event) -> list[str]:
    """Send ``event`` where the job says (if it wants this kind). -> what could not be sent."""
    if event.kind not in notify.events:
        return []
    body = json.dumps(event.body())
    problems = []
    if notify.webhook is not None:
        problems += _webhook(notify.webhook, body)
    if notify.command:
        problems += _command(notify.command, body)
    return problems


def _webhook(url: str, body: str) -> list[str]:
    import httpx

    try:
        response = httpx.post(url, content=body, timeout=WEBHOOK_TIMEOUT_S,
                              headers={"Content-Type": "application/json"})
    except httpx.HTTPError as exc:
        return [f"webhook {url}: {exc or type(exc).__name__}"]
    if not response.is_success:
        return [f"webhook {url}: HTTP {response.status_code}"]
    return []


def _command(command: tuple[str, ...], body: str) -> list[str]:
    try:
        done = subprocess.run(list(command), input=body, text=True, capture_output=True,
                              timeout=COMMAND_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [f"command {command[0]}: {exc}"]
    if done.returncode != 0:
        return [f"command {command[0]}: exit code {done.returncode}: "
                f"{done.stderr.strip()[:200]}"]
    return []
