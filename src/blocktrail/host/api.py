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
import json
from collections.abc import Callable
from http import HTTPStatus
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, BeforeValidator, Field
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException
from starlette.routing import Match

from blocktrail import __version__
from blocktrail.disk import Disk, Snapshot
from blocktrail.errors import (
    BlocktrailError,
    ChangeIdError,
    DiskBusy,
    DiskClosed,
    DiskExists,
    DiskIOFailure,
    DiskNotFound,
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
from blocktrail.host.fill import FillScheduler, restore_status
from blocktrail.host.jobs import HostJobs
from blocktrail.host.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from blocktrail.host.metrics import HostMetrics
from blocktrail.host.points import PointCatalog
from blocktrail.host.registry import DiskRegistry, Vm
from blocktrail.names import (
    DISK_NAME_MAX,
    DISK_NAME_PATTERN,
    DISK_NAME_RULE,
    SNAPSHOT_NAME_MAX,
    SNAPSHOT_NAME_RULE,
    SNAPSHOT_NAME_SCHEMA_PATTERN,
    check_disk_name,
    check_snapshot_name,
    check_vm_name,
)
from blocktrail.passwords import NO_SOURCES, PasswordSources

_STATUS: list[tuple[type[BlocktrailError], int]] = [
    (Unauthorized, 401),
    (DiskNotFound, 404), (SnapshotNotFound, 404), (VmNotFound, 404),
    (DiskExists, 409), (SnapshotExists, 409), (DiskBusy, 409), (DiskClosed, 409),
    (HostBusy, 409),
    (ChangeIdError, 422), (OutOfRange, 416), (InvalidArgument, 400), (ReadOnly, 400),
    (NoSpace, 507),
]
DOCUMENTED_ERRORS = (400, 401, 404, 409, 416, 422, 500, 507)
# The "format" of each kind of name in the document (what a client may generate from).
DISK_NAME_FORMAT = "blocktrail-disk-name"
VM_NAME_FORMAT = "blocktrail-vm-name"
SNAPSHOT_NAME_FORMAT = "blocktrail-snapshot-name"


BearerCredentials = Annotated[HTTPAuthorizationCredentials | None,
                              Depends(HTTPBearer(auto_error=False))]


def _disk_doc(fmt: str) -> dict[str, Any]:
    return {"pattern": f"^{DISK_NAME_PATTERN}$", "minLength": 1, "maxLength": DISK_NAME_MAX,
            "format": fmt}


_SNAPSHOT_DOC: dict[str, Any] = {"pattern": SNAPSHOT_NAME_SCHEMA_PATTERN, "minLength": 1,
                                 "maxLength": SNAPSHOT_NAME_MAX, "format": SNAPSHOT_NAME_FORMAT}
_GRANULARITY = "bytes tracked as one unit: a power of two from 512"
_GRANULARITY_DOC: dict[str, Any] = {"enum": [1 << bits for bits in range(9, 31)]}


def _grammar(check: Callable[[str], str]) -> AfterValidator:
    """A name checked by names.py, its refusal a validation error with names.py's message."""
    def validate(value: str) -> str:
        try:
            return check(value)
        except InvalidArgument as exc:
            raise PydanticCustomError("invalid_name", "{message}",
                                      {"message": exc.message}) from None

    return AfterValidator(validate)


def _json_integer(value: Any) -> Any:
    """A JSON integer (``3`` or ``3.0``), never ``true`` or ``"3"``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be an integer")
    return value


Integer = Annotated[int, BeforeValidator(_json_integer)]
DiskNameField = Annotated[str, Field(description=DISK_NAME_RULE,
                                     json_schema_extra=_disk_doc(DISK_NAME_FORMAT)),
                          _grammar(check_disk_name)]
VmNameField = Annotated[str, Field(description=DISK_NAME_RULE,
                                   json_schema_extra=_disk_doc(VM_NAME_FORMAT)),
                        _grammar(check_vm_name)]
SnapshotNameField = Annotated[str, Field(description=SNAPSHOT_NAME_RULE,
                                         json_schema_extra=_SNAPSHOT_DOC),
                              _grammar(check_snapshot_name)]
DiskName = Annotated[str, Path(description=DISK_NAME_RULE,
                               json_schema_extra=_disk_doc(DISK_NAME_FORMAT)),
                     _grammar(check_disk_name)]
VmName = Annotated[str, Path(description=DISK_NAME_RULE,
                             json_schema_extra=_disk_doc(VM_NAME_FORMAT)),
                   _grammar(check_vm_name)]
SnapshotName = Annotated[str, Path(description=SNAPSHOT_NAME_RULE,
                                   json_schema_extra=_SNAPSHOT_DOC),
                         _grammar(check_snapshot_name)]
SnapshotQuery = Annotated[str | None, Query(description="end the interval at this snapshot's "
                                                        "point: " + SNAPSHOT_NAME_RULE,
                                            json_schema_extra=_SNAPSHOT_DOC),
                          _grammar(lambda name: name if name is None
                                   else check_snapshot_name(name))]


class AsciiJSONResponse(JSONResponse):
    """JSON in ASCII: any string (even one Unicode cannot encode) becomes an escape, so an
    answer never fails to serialize after its change was made."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, indent=None,
                          separators=(",", ":")).encode("ascii")


class DiskCreate(BaseModel):
    name: DiskNameField = Field(examples=["disk0"])
    size_bytes: Integer = Field(ge=0, le=1 << 50)
    granularity: Integer = Field(default=64 * 1024, ge=512, le=1 << 30,
                                 description=_GRANULARITY, json_schema_extra=_GRANULARITY_DOC)


class DiskImport(BaseModel):
    name: DiskNameField
    source_path: str = Field(description="The absolute path of a raw image on the host: a "
                                         "regular file or a block device the host can read, "
                                         "whose size is where its data ends")
    granularity: Integer = Field(default=64 * 1024, ge=512, le=1 << 30,
                                 description=_GRANULARITY, json_schema_extra=_GRANULARITY_DOC)


class Resize(BaseModel):
    size_bytes: Integer = Field(ge=0, le=1 << 50)


class SnapshotCreate(BaseModel):
    name: SnapshotNameField = Field(examples=["nightly-1"])


class VmDefine(BaseModel):
    name: VmNameField
    disks: list[DiskNameField] = Field(
        description="one or more distinct disk names",
        json_schema_extra={"minItems": 1, "uniqueItems": True})


class ErrorBody(BaseModel):
    error: str = Field(description="the error type, e.g. DiskNotFound or StaleChangeId")
    message: str = Field(description="what went wrong and what to do about it")


class SnapshotInfo(BaseModel):
    name: str
    change_id: str = Field(description="the change ID of the snapshot's point in time")
    created_at: str = Field(description="ISO 8601")
    size_bytes: int


class EpochInfo(BaseModel):
    epoch: str
    created_at: str
    reason: str
    tracker_format: int
    inherits: tuple[str, int] | None


class RestoreInfo(BaseModel):
    """Where the disk's base is: ``local``, or being filled from the restore point it was
    restored from instantly (host/fill.py)."""

    state: Literal["local", "filling", "paused"]
    summary: str = Field(description="'local', 'filling N%', or 'filling N%, paused: why'")
    percent: float
    chunks: int | None = Field(description="chunks of the point that hold data")
    local_chunks: int | None
    repository: str | None
    point: str | None
    paused: str | None = Field(description="why the fill waits: by request, or the error it "
                                           "retries after")
    retry_in_s: float | None
    rate_bytes_per_second: int | None
    last_error: str | None = Field(description="the last chunk that could not be fetched, "
                                               "and why")
    last_error_at: str | None


class DiskInfo(BaseModel):
    name: str
    disk_id: str
    size_bytes: int
    granularity: int
    current_change_id: str
    snapshots: list[SnapshotInfo]
    epochs: list[EpochInfo]
    restore: RestoreInfo


class DiskUnavailable(BaseModel):
    """A disk of the host that cannot be opened now (damaged, edited outside blocktrail, being
    created): listed with why, so that one such disk hides none of the others."""

    name: str
    error: str
    message: str


class Area(BaseModel):
    offset: int
    length: int


class ChangedAreas(BaseModel):
    start_offset: int
    length: int = Field(description="the answer covers [start_offset, start_offset + length); "
                                    "continue from there")
    changed_areas: list[Area]


class TrackingReset(BaseModel):
    change_id: str = Field(description="the first change ID of the new epoch")


class Removed(BaseModel):
    removed: str


class VmInfo(BaseModel):
    name: str
    disks: list[str]


class VmSnapshots(BaseModel):
    vm: str
    snapshots: dict[str, SnapshotInfo] = Field(description="the snapshot taken, by disk name")


class HostInfo(BaseModel):
    version: str
    nbd: str | None = Field(description="where the host serves NBD: unix:PATH or tcp:HOST:PORT "
                                        "(null: not at all)")
    tls: Literal["off", "allow", "require"] = Field(description="NBD's STARTTLS policy")


def _snapshot_json(snap: Snapshot) -> dict[str, Any]:
    return snap.to_json()


def _disk_json(name: str, disk: Disk) -> dict[str, Any]:
    return {
        "name": name,
        "disk_id": disk.disk_id,
        "size_bytes": disk.size_bytes,
        "granularity": disk.granularity,
        "current_change_id": disk.current_change_id,
        "snapshots": [_snapshot_json(s) for s in disk.snapshots],
        "epochs": [e.to_json() for e in disk.tracker.epochs],
        "restore": restore_status(disk),
    }


def _vm_json(vm: Vm) -> dict[str, Any]:
    return {"name": vm.name, "disks": list(vm.disks)}


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
