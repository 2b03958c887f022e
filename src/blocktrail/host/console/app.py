"""The web console: pages rendered on the server (Jinja2), a little script (static/console.js)
that refreshes the running jobs and sends the buttons' forms without leaving the page; every
page and button also works without it.

Pages: the disks and VMs (tracking state, snapshots, newest restore point), a disk (its
snapshots, tracking epochs, restore points per repository with kind, size, verify state and the
reason for each full backup, a chart of the bytes each backup stored), the jobs. Buttons (safe
actions only): take a snapshot, back up now, verify a point.

Access: on a unix socket, whoever can open the socket (mode 0600). On TCP, the API's token: as
``Authorization: Bearer``, or typed once into the login page, which sets a cookie holding an
HMAC of the token (HttpOnly, SameSite=Strict). Without either, every page answers 401 with the
login form. Every button's form carries a token derived from the same secret (no other site
can make a browser press one).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, quote

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from blocktrail import __version__
from blocktrail.disk import Disk
from blocktrail.errors import BlocktrailError, InvalidArgument
from blocktrail.host.console.chart import stored_bytes_chart
from blocktrail.host.jobs import HostJobs
from blocktrail.host.metrics import HostMetrics
from blocktrail.host.points import PointCatalog
from blocktrail.host.registry import DiskRegistry
from blocktrail.names import check_disk_name, check_snapshot_name
from blocktrail.repo import RestorePoint

PREFIX = "/console"
COOKIE = "blocktrail_console"
HERE = os.path.dirname(__file__)
Handler = Callable[[Request], Awaitable[Response]]
STATUS = {"DiskNotFound": 404, "SnapshotNotFound": 404, "PointNotFound": 404,
          "RepositoryNotFound": 404, "BucketNotFound": 404, "InvalidArgument": 400,
          "SnapshotExists": 409, "DiskBusy": 409, "RepositoryBusy": 409}


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def age(when: str | float | datetime) -> str:
    if isinstance(when, datetime):
        then = when.timestamp()
    else:
        then = datetime.fromisoformat(when).timestamp() if isinstance(when, str) else when
    seconds = max(0.0, time.time() - then)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


class Console:
    def __init__(self, registry: DiskRegistry, token: str | None, catalog: PointCatalog,
                 jobs: HostJobs, metrics: HostMetrics | None = None) -> None:
        self.registry, self.token, self.catalog, self.jobs = registry, token, catalog, jobs
        self.metrics = metrics
        secret = token if token is not None else secrets.token_urlsafe(32)
        self._session = hmac.new(secret.encode(), b"console-session", hashlib.sha256).hexdigest()
        self._csrf = hmac.new(secret.encode(), b"console-form", hashlib.sha256).hexdigest()
        self.env = Environment(loader=FileSystemLoader(os.path.join(HERE, "templates")),
                               autoescape=select_autoescape(default=True), trim_blocks=True,
                               lstrip_blocks=True)
        self.env.globals.update(human=human, age=age, prefix=PREFIX, version=__version__,
                                csrf=self._csrf, quote=lambda s: quote(s, safe=""))

    # ------------------------------------------------------------------ plumbing

    def app(self) -> Starlette:
        guarded = self._guarded
        return Starlette(routes=[
            Route("/", guarded(self.index)),
            Route("/login", self.login, methods=["GET", "POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/disks/{name}", guarded(self.disk_page)),
            Route("/jobs", guarded(self.jobs_page)),
            Route("/jobs/fragment", guarded(self.jobs_fragment)),
            Route("/disks/{name}/snapshot", guarded(self.take_snapshot), methods=["POST"]),
            Route("/disks/{name}/backup", guarded(self.backup_now), methods=["POST"]),
            Route("/verify", guarded(self.verify_point), methods=["POST"]),
            Mount("/static", StaticFiles(directory=os.path.join(HERE, "static")),
                  name="static"),
        ])

    def _allowed(self, request: Request) -> bool:
        if self.token is None:
            return True
        header = request.headers.get("authorization", "")
        if header.startswith("Bearer ") and hmac.compare_digest(
                header.removeprefix("Bearer ").encode(), self.token.encode()):
            return True
        return hmac.compare_digest(request.cookies.get(COOKIE, "").encode(),
                                   self._session.encode())

    def _guarded(self, handler: Handler) -> Handler:
        async def guarded(request: Request) -> Response:
            if not self._allowed(request):
                return self._render("login.html", {"error": None, "next": request.url.path},
                                    401)
            if request.method == "POST":
                form = await self._form(request)
                if not hmac.compare_digest(form.get("csrf", "").encode(), self._csrf.encode()):
                    return self._answer(request, False, "the form is stale: reload the page",
                                        403)
                request.state.form = form
            try:
                return await handler(request)
            except BlocktrailError as exc:
                status = STATUS.get(type(exc).__name__, 500)
                return self._answer(request, False, f"{type(exc).__name__}: {exc.message}",
                                    status)
            except OSError as exc:
                return self._answer(request, False, f"I/O failure: {exc}", 500)
        return guarded

    @staticmethod
    async def _form(request: Request) -> dict[str, str]:
        body = (await request.body()).decode("utf-8", "replace")
        return {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}

    def _render(self, template: str, context: dict[str, Any], status: int = 200) -> Response:
        html = self.env.get_template(template).render(**context)
        return HTMLResponse(html, status, headers={"Cache-Control": "no-store"})

    def _answer(self, request: Request, ok: bool, message: str, status: int = 200) -> Response:
        """A button's result: JSON for the script, a redirect (with the message) otherwise; a
        page that failed: an error page."""
        if request.method == "GET":
            return self._render("error.html", {"status": status, "text": message,
                                               "message": None}, status)
        if request.headers.get("x-console") == "fetch":
            return JSONResponse({"ok": ok, "message": message}, status)
        back = getattr(request.state, "form", {}).get("next", "")
        if not back.startswith(PREFIX + "/") or "//" in back[1:]:
            back = PREFIX + "/"
        sep = "&" if "?" in back else "?"
        return RedirectResponse(f"{back}{sep}msg={quote(message)}&ok={int(ok)}", 303)

    # ------------------------------------------------------------------ login

    async def login(self, request: Request) -> Response:
        if request.method == "GET":
            return self._render("login.html", {"error": None, "next": PREFIX + "/"},
                                200 if self._allowed(request) else 401)
        form = await self._form(request)
        given = form.get("token", "")
        if self.token is None or not hmac.compare_digest(given.encode(), self.token.encode()):
            return self._render("login.html", {"error": "wrong token", "next": PREFIX + "/"},
                                401)
        back = form.get("next", "")
        if not back.startswith(PREFIX + "/"):
            back = PREFIX + "/"
        response = RedirectResponse(back, 303)
        response.set_cookie(COOKIE, self._session, httponly=True, samesite="strict",
                            path=PREFIX, secure=request.url.scheme == "https")
        return response

    async def logout(self, request: Request) -> Response:
        response = RedirectResponse(PREFIX + "/login", 303)
        response.delete_cookie(COOKIE, path=PREFIX)
        return response

    # ------------------------------------------------------------------ pages

    def _disks(self) -> list[tuple[str, Disk]]:
        out = []
        for name in self.registry.names():
            try:
                out.append((name, self.registry.get(name)))
            except BlocktrailError:
                continue
        return out

    def _message(self, request: Request) -> dict[str, Any] | None:
        msg = request.query_params.get("msg")
        return None if msg is None else {"text": msg, "ok": request.query_params.get("ok") == "1"}

    async def index(self, request: Request) -> Response:
        views = self.catalog.views()
        rows = []
        for name, disk in self._disks():
            newest = [(v, _newest(v.of_disk(disk.disk_id))) for v in views]
            rows.append({"name": name, "disk": disk, "epoch": disk.tracker.epochs[-1],
                         "snapshots": disk.snapshots, "points": sum(
                             len(v.of_disk(disk.disk_id)) for v in views),
                         "newest": [(v, p) for v, p in newest if p is not None]})
        all_points = [p for v in views for p in v.points]
        return self._render("index.html", {
            "rows": rows, "vms": self.registry.vms(), "views": views,
            "jobs": self.jobs.running(), "finished": self.jobs.finished()[:5],
            "message": self._message(request), "next": PREFIX + "/",
            "chart": stored_bytes_chart(all_points[-500:], "bytes stored per backup, all disks")})

    async def disk_page(self, request: Request) -> Response:
        name = check_disk_name(request.path_params["name"])
        disk = self.registry.get(name)
        sections = []
        for index, view in enumerate(self.catalog.views()):
            points = sorted(view.of_disk(disk.disk_id), key=lambda p: p.created, reverse=True)
            sections.append({"index": index, "view": view, "points": points,
                             "chart": stored_bytes_chart(
                                 points, f"bytes stored per backup of {name}")})
        return self._render("disk.html", {
            "name": name, "disk": disk, "snapshots": disk.snapshots,
            "epochs": list(reversed(disk.tracker.epochs)), "sections": sections,
            "vms": [vm.name for vm in self.registry.vms() if name in vm.disks],
            "jobs": [j for j in self.jobs.running() if j.disk == name],
            "finished": [j for j in self.jobs.finished() if j.disk == name][:5],
            "message": self._message(request), "next": f"{PREFIX}/disks/{quote(name)}"})

    async def jobs_page(self, request: Request) -> Response:
        return self._render("jobs.html", {"jobs": self.jobs.running(),
                                          "finished": self.jobs.finished(),
                                          "message": self._message(request),
                                          "next": PREFIX + "/jobs"})

    async def jobs_fragment(self, request: Request) -> Response:
        disk = request.query_params.get("disk")
        running = [j for j in self.jobs.running() if disk is None or j.disk == disk]
        finished = [j for j in self.jobs.finished() if disk is None or j.disk == disk][:5]
        return self._render("_jobs.html", {"jobs": running, "finished": finished})

    # ------------------------------------------------------------------ buttons

    async def take_snapshot(self, request: Request) -> Response:
        name = check_disk_name(request.path_params["name"])
        snapshot = check_snapshot_name(request.state.form.get("snapshot", "").strip())
        snap = self.registry.get(name).create_snapshot(snapshot)
        if self.metrics is not None:
            self.metrics.snapshots_created.labels(name).inc()
        return self._answer(request, True, f"snapshot {snap.name} of {name} taken at change ID "
                                           f"{snap.change_id}", 201)

    def _repository(self, request: Request) -> str:
        text = request.state.form.get("repository", "0")
        # ASCII digits only ("²" is a digit to str.isdigit, not to int), and few of them (int
        # refuses thousands)
        index = int(text) if text.isascii() and text.isdigit() and len(text) <= 9 else -1
        if not 0 <= index < len(self.catalog.paths):
            raise InvalidArgument("the host knows no such repository (start it with --repo)")
        return self.catalog.paths[index]

    async def backup_now(self, request: Request) -> Response:
        name = check_disk_name(request.path_params["name"])
        job = self.jobs.backup(name, self._repository(request))
        return self._answer(request, True, f"backup of {name} started (job {job.id})", 202)

    async def verify_point(self, request: Request) -> Response:
        point = request.state.form.get("point", "")
        job = self.jobs.verify(self._repository(request), point)
        return self._answer(request, True, f"verify of {point} started (job {job.id})", 202)


def _newest(points: list[RestorePoint]) -> RestorePoint | None:
    return max(points, key=lambda p: p.created, default=None)

