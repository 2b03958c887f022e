"""The host's HTTP control API (FastAPI): disks, VMs, snapshots, changed areas, tracking reset.

Changed areas follow QueryDiskChangedAreas: one answer may cover a prefix of the disk; the
caller continues from ``start_offset + length``. Errors are JSON ``{"error", "message"}`` with a
status code per error type; no endpoint ever answers a refused change ID with an empty list.

Every name (disk, VM, snapshot; in a body, a path or a query) is checked against the one
grammar (names.py) while the request is validated, before anything is changed, and the document
states it (pattern, lengths, and a format per kind of name). A request succeeds whole or changes
nothing; answers are ASCII JSON, so no answer can fail to serialize after a change.
"""

from __future__ import annotations

import hmac
from http import HTTPStatus
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException
from starlette.routing import Match

from blocktrail import __version__
from blocktrail.disk import Disk
from blocktrail.errors import (
    BlocktrailError,
    ChangeIdError,
    DiskBusy,
    DiskClosed,
    DiskExists,
    DiskIOFailure,
    DiskNotFound,
    FileInUse,
    HostBusy,
    InvalidArgument,
    NoSpace,
    OutOfRange,
    ReadOnly,
    SnapshotExists,
    SnapshotNotFound,
    Unauthorized,
    VmNotFound,
    is_no_space,
)
from blocktrail.host.console import PREFIX as CONSOLE_PREFIX
from blocktrail.host.console import Console
from blocktrail.host.fill import FillScheduler
from blocktrail.host.jobs import HostJobs
from blocktrail.host.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from blocktrail.host.metrics import HostMetrics
from blocktrail.host.points import PointCatalog
from blocktrail.host.registry import DiskRegistry
from blocktrail.host.schema import (
    AsciiJSONResponse,
    BearerCredentials,
    ChangedAreas,
    DiskCreate,
    DiskImport,
    DiskInfo,
    DiskName,
    DiskUnavailable,
    ErrorBody,
    HostInfo,
    Removed,
    Resize,
    SnapshotCreate,
    SnapshotInfo,
    SnapshotName,
    SnapshotQuery,
    TrackingReset,
    VmDefine,
    VmInfo,
    VmName,
    VmSnapshots,
    _disk_json,
    _snapshot_json,
    _vm_json,
)
from blocktrail.passwords import NO_SOURCES, PasswordSources

_STATUS: list[tuple[type[BlocktrailError], int]] = [
    (Unauthorized, 401),
    (DiskNotFound, 404), (SnapshotNotFound, 404), (VmNotFound, 404),
    (DiskExists, 409), (SnapshotExists, 409), (DiskBusy, 409), (DiskClosed, 409),
    (HostBusy, 409), (FileInUse, 409),
    (ChangeIdError, 422), (OutOfRange, 416), (InvalidArgument, 400), (ReadOnly, 400),
    (NoSpace, 507),
]
DOCUMENTED_ERRORS = (400, 401, 404, 409, 416, 422, 500, 507)
# The "format" of each kind of name in the document (what a client may generate from).


def _error_response(exc: BlocktrailError) -> JSONResponse:
    status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 500)
    return AsciiJSONResponse({"error": type(exc).__name__, "message": exc.message}, status)


def _validation_message(exc: RequestValidationError) -> str:
    """The request's first problems, one per field: ``size_bytes: Input should be ...``."""
    problems = []
    for error in exc.errors()[:5]:
        loc = [str(part) for part in error.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path", "header"):
            loc = loc[1:] or loc
        problems.append(f"{'.'.join(loc) or 'request'}: {error.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(problems)


def _allowed_methods(app: FastAPI, request: Request) -> list[str]:
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return sorted(methods)


def _open_disks(registry: DiskRegistry) -> list[tuple[str, Disk]]:
    out = []
    for name in registry.names():
        try:
            out.append((name, registry.get(name)))
        except BlocktrailError:
            continue  # being created, or damaged: GET /disks/NAME says why
    return out


def create_app(registry: DiskRegistry, token: str | None = None, *, nbd: str | None = None,
               nbd_tls: str = "off", repositories: tuple[str, ...] = (),
               backup_bandwidth: int | None = None,
               fills: FillScheduler | None = None,
               repo_password: PasswordSources = NO_SOURCES) -> FastAPI:
    """The control API over ``registry``; with ``token``, every call needs
    ``Authorization: Bearer <token>``. ``nbd``/``nbd_tls``: where and how the host serves the
    disks over NBD (GET /host tells clients). Beside it: ``GET /metrics`` (Prometheus) and the
    web console under /console, which shows the restore points in ``repositories``
    (``app.state.catalog``; close it when the app is done) and backs up into them (at most
    ``backup_bandwidth`` bytes a second). ``fills``: instant restores (their endpoints and
    background fills; host/restore_api.py)."""
    if token is not None and not token.strip():
        # an empty token would match a request that carries none
        raise InvalidArgument("the API token is empty; give a non-empty token")

    def authorize(creds: BearerCredentials) -> None:
        if token is None:
            return
        given = "" if creds is None else creds.credentials
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise Unauthorized("missing or wrong API token")

    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorBody} for code in DOCUMENTED_ERRORS}
    # No redirects for a trailing slash: /disks/d0/snapshots/a%2F must not become a request
    # for the snapshot "a" (a server decodes %2F in paths; a name never holds "/").
    app = FastAPI(title="blocktrail host", version=__version__,
                  dependencies=[Depends(authorize)], responses=errors,
                  default_response_class=AsciiJSONResponse, redirect_slashes=False)

    @app.exception_handler(BlocktrailError)
    async def _error(_request: Request, exc: BlocktrailError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(OSError)
    async def _os_error(request: Request, exc: OSError) -> JSONResponse:
        what = f"{request.method} {request.url.path}"
        if is_no_space(exc):
            return _error_response(NoSpace(f"{what}: the host's file system is full "
                                           f"({exc.strerror}); free space and retry"))
        return _error_response(DiskIOFailure(f"{what}: {exc}"))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        return AsciiJSONResponse({"error": "InternalError", "message":
                                  f"{request.method} {request.url.path}: "
                                  f"{type(exc).__name__}: {exc} (a bug in the host)"}, 500)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return AsciiJSONResponse({"error": InvalidArgument.__name__,
                                  "message": _validation_message(exc)}, 400)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        phrase = HTTPStatus(exc.status_code).phrase
        message = f"{request.method} {request.url.path}: {exc.detail}"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names the methods of the first route on the path only.
            headers["Allow"] = ", ".join(_allowed_methods(app, request))
        return AsciiJSONResponse({"error": phrase.replace(" ", ""), "message": message},
                                 exc.status_code, headers=headers)

    catalog = PointCatalog(repositories, repo_password)
    jobs = HostJobs(registry.get, registry.names, catalog, backup_bandwidth)
    metrics = HostMetrics(lambda: _open_disks(registry), catalog, lambda: len(jobs.running()))
    app.state.catalog = catalog
    app.mount(CONSOLE_PREFIX, Console(registry, token, catalog, jobs, metrics).app())

    @app.get(CONSOLE_PREFIX, include_in_schema=False)
    def console_root() -> Response:
        return RedirectResponse(CONSOLE_PREFIX + "/", 308)

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/host", response_model=HostInfo)
    def host_info() -> dict[str, Any]:
        return {"version": __version__, "nbd": nbd, "tls": nbd_tls}

    @app.get("/disks", response_model=list[DiskInfo | DiskUnavailable])
    def list_disks() -> list[dict[str, Any]]:
        out = []
        for name in registry.names():
            try:
                out.append(_disk_json(name, registry.get(name)))
            except BlocktrailError as exc:
                out.append({"name": name, "error": type(exc).__name__,
                            "message": exc.message})
        return out

    @app.post("/disks", status_code=201, response_model=DiskInfo)
    def create_disk(body: DiskCreate) -> dict[str, Any]:
        return _disk_json(body.name, registry.create(body.name, body.size_bytes,
                                                     body.granularity))

    @app.post("/disks/import", status_code=201, response_model=DiskInfo)
    def import_disk(body: DiskImport) -> dict[str, Any]:
        disk = registry.import_raw(body.name, body.source_path, body.granularity)
        return _disk_json(body.name, disk)

    @app.get("/disks/{name}", response_model=DiskInfo)
    def disk_info(name: DiskName) -> dict[str, Any]:
        return _disk_json(name, registry.get(name))

    @app.post("/disks/{name}/resize", response_model=DiskInfo)
    def resize(name: DiskName, body: Resize) -> dict[str, Any]:
        disk = registry.get(name)
        disk.resize(body.size_bytes)
        return _disk_json(name, disk)

    @app.get("/disks/{name}/snapshots", response_model=list[SnapshotInfo])
    def list_snapshots(name: DiskName) -> list[dict[str, Any]]:
        return [_snapshot_json(s) for s in registry.get(name).snapshots]

    @app.post("/disks/{name}/snapshots", status_code=201, response_model=SnapshotInfo)
    def create_snapshot(name: DiskName, body: SnapshotCreate) -> dict[str, Any]:
        snap = registry.get(name).create_snapshot(body.name)
        metrics.snapshots_created.labels(name).inc()
        return _snapshot_json(snap)

    @app.delete("/disks/{name}/snapshots/{snapshot}", response_model=Removed)
    def remove_snapshot(name: DiskName, snapshot: SnapshotName) -> dict[str, Any]:
        disk = registry.get(name)
        with metrics.consolidating(name):
            disk.remove_snapshot(snapshot)
        return {"removed": snapshot}

    @app.post("/disks/{name}/snapshots/{snapshot}/revert", response_model=DiskInfo)
    def revert(name: DiskName, snapshot: SnapshotName) -> dict[str, Any]:
        disk = registry.get(name)
        disk.revert_to_snapshot(snapshot)
        return _disk_json(name, disk)

    @app.get("/disks/{name}/changed-areas", response_model=ChangedAreas)
    def changed_areas(name: DiskName, since: str, start_offset: int = 0,
                      snapshot: SnapshotQuery = None) -> dict[str, Any]:
        """QueryDiskChangedAreas: areas changed after ``since`` up to ``snapshot`` (or now);
        ``since=*`` gives all allocated areas."""
        return registry.get(name).query_changed_areas(since, start_offset, snapshot).to_json()

    @app.post("/disks/{name}/tracking/reset", response_model=TrackingReset)
    def reset_tracking(name: DiskName) -> dict[str, Any]:
        return {"change_id": registry.get(name).reset_tracking()}

    @app.get("/vms", response_model=list[VmInfo])
    def list_vms() -> list[dict[str, Any]]:
        return [_vm_json(vm) for vm in registry.vms()]

    @app.post("/vms", status_code=201, response_model=VmInfo)
    def define_vm(body: VmDefine) -> dict[str, Any]:
        return _vm_json(registry.define_vm(body.name, body.disks))

    @app.post("/vms/{vm}/snapshots", status_code=201, response_model=VmSnapshots)
    def vm_snapshot(vm: VmName, body: SnapshotCreate) -> dict[str, Any]:
        taken = registry.vm_snapshot(vm, body.name)
        for disk, _snap in taken:
            metrics.snapshots_created.labels(disk).inc()
        return {"vm": vm, "snapshots": {disk: _snapshot_json(s) for disk, s in taken}}

    @app.delete("/vms/{vm}/snapshots/{snapshot}", response_model=Removed)
    def vm_remove_snapshot(vm: VmName, snapshot: SnapshotName) -> dict[str, Any]:
        registry.vm_remove_snapshot(vm, snapshot)
        return {"removed": snapshot}

    if fills is not None:
        from blocktrail.host.restore_api import restore_router
        app.include_router(restore_router(registry, fills, repo_password))
    return app
