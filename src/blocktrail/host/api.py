"""The host's HTTP control API (FastAPI): disks, VMs, snapshots, changed areas, tracking reset.

Changed areas follow QueryDiskChangedAreas: one answer may cover a prefix of the disk; the
caller continues from ``start_offset + length``. Errors are JSON ``{"error", "message"}`` with a
status code per error type; no endpoint ever answers a refused change ID with an empty list.
"""

from __future__ import annotations

import hmac
from http import HTTPStatus
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, BeforeValidator, Field
from starlette.exceptions import HTTPException
from starlette.routing import Match

from blocktrail import __version__
from blocktrail.disk import Disk, Snapshot
from blocktrail.errors import (
    BlocktrailError,
    ChangeIdError,
    DiskBusy,
    DiskExists,
    DiskNotFound,
    InvalidArgument,
    OutOfRange,
    SnapshotExists,
    SnapshotNotFound,
    Unauthorized,
    VmNotFound,
)
from blocktrail.host.registry import NAME_PATTERN, DiskRegistry, Vm

_STATUS: list[tuple[type[BlocktrailError], int]] = [
    (DiskNotFound, 404), (SnapshotNotFound, 404), (VmNotFound, 404),
    (DiskExists, 409), (SnapshotExists, 409), (DiskBusy, 409),
    (ChangeIdError, 422), (OutOfRange, 416), (InvalidArgument, 400),
]


BearerCredentials = Annotated[HTTPAuthorizationCredentials | None,
                              Depends(HTTPBearer(auto_error=False))]


_NAME_RULE = "1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit"
# Names are documented here and checked by the registry, whose message says what a name may be.
_NAME_DOC: dict[str, Any] = {"pattern": f"^{NAME_PATTERN}$"}
_SNAPSHOT_RULE = "1-255 characters, no '/' or '@', no surrounding spaces"
_SNAPSHOT_DOC: dict[str, Any] = {"minLength": 1, "maxLength": 255, "pattern": "^[^/@]*$"}
_GRANULARITY = "bytes tracked as one unit: a power of two from 512"
_GRANULARITY_DOC: dict[str, Any] = {"enum": [1 << bits for bits in range(9, 31)]}


def _name_field(**kwargs: Any) -> Any:
    return Field(description=_NAME_RULE, json_schema_extra=_NAME_DOC, **kwargs)


def _json_integer(value: Any) -> Any:
    """A JSON integer (``3`` or ``3.0``), never ``true`` or ``"3"``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be an integer")
    return value


Integer = Annotated[int, BeforeValidator(_json_integer)]
DiskName = Annotated[str, Path(description=_NAME_RULE, json_schema_extra=_NAME_DOC)]
VmName = Annotated[str, Path(description=_NAME_RULE, json_schema_extra=_NAME_DOC)]
SnapshotName = Annotated[str, Path(description=_SNAPSHOT_RULE, json_schema_extra=_SNAPSHOT_DOC)]


class DiskCreate(BaseModel):
    name: str = _name_field(examples=["disk0"])
    size_bytes: Integer = Field(ge=0, le=1 << 50)
    granularity: Integer = Field(default=64 * 1024, ge=512, le=1 << 30,
                                 description=_GRANULARITY, json_schema_extra=_GRANULARITY_DOC)


class DiskImport(BaseModel):
    name: str = _name_field()
    source_path: str = Field(description="The absolute path of a raw image on the host: a "
                                         "regular file the host can read")
    granularity: Integer = Field(default=64 * 1024, ge=512, le=1 << 30,
                                 description=_GRANULARITY, json_schema_extra=_GRANULARITY_DOC)


class Resize(BaseModel):
    size_bytes: Integer = Field(ge=0, le=1 << 50)


class SnapshotCreate(BaseModel):
    name: str = Field(examples=["nightly-1"], description=_SNAPSHOT_RULE,
                      json_schema_extra=_SNAPSHOT_DOC)


class VmDefine(BaseModel):
    name: str = _name_field()
    disks: list[Annotated[str, Field(json_schema_extra=_NAME_DOC)]] = Field(
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


class DiskInfo(BaseModel):
    name: str
    disk_id: str
    size_bytes: int
    granularity: int
    current_change_id: str
    snapshots: list[SnapshotInfo]
    epochs: list[EpochInfo]


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
    }


def _vm_json(vm: Vm) -> dict[str, Any]:
    return {"name": vm.name, "disks": list(vm.disks)}


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


def create_app(registry: DiskRegistry, token: str | None = None, *, nbd: str | None = None,
               nbd_tls: str = "off") -> FastAPI:
    """The control API over ``registry``; with ``token``, every call needs
    ``Authorization: Bearer <token>``. ``nbd``/``nbd_tls``: where and how the host serves the
    disks over NBD (GET /host tells clients)."""
    def authorize(creds: BearerCredentials) -> None:
        if token is None:
            return
        given = "" if creds is None else creds.credentials
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise Unauthorized("missing or wrong API token")

    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorBody} for code in (400, 401, 404, 409, 416, 422, 500)}
    app = FastAPI(title="blocktrail host", version=__version__,
                  dependencies=[Depends(authorize)], responses=errors)

    @app.exception_handler(BlocktrailError)
    async def _error(_request: Request, exc: BlocktrailError) -> JSONResponse:
        status = 401 if isinstance(exc, Unauthorized) else next(
            (code for kind, code in _STATUS if isinstance(exc, kind)), 500)
        return JSONResponse({"error": type(exc).__name__, "message": exc.message}, status)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": InvalidArgument.__name__,
                             "message": _validation_message(exc)}, 400)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        phrase = HTTPStatus(exc.status_code).phrase
        message = f"{request.method} {request.url.path}: {exc.detail}"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names the methods of the first route on the path only.
            headers["Allow"] = ", ".join(_allowed_methods(app, request))
        return JSONResponse({"error": phrase.replace(" ", ""), "message": message},
                            exc.status_code, headers=headers)

    @app.get("/host", response_model=HostInfo)
    def host_info() -> dict[str, Any]:
        return {"version": __version__, "nbd": nbd, "tls": nbd_tls}

    @app.get("/disks", response_model=list[DiskInfo])
    def list_disks() -> list[dict[str, Any]]:
        return [_disk_json(n, registry.get(n)) for n in registry.names()]

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
        return _snapshot_json(registry.get(name).create_snapshot(body.name))

    @app.delete("/disks/{name}/snapshots/{snapshot}", response_model=Removed)
    def remove_snapshot(name: DiskName, snapshot: SnapshotName) -> dict[str, Any]:
        registry.get(name).remove_snapshot(snapshot)
        return {"removed": snapshot}

    @app.post("/disks/{name}/snapshots/{snapshot}/revert", response_model=DiskInfo)
    def revert(name: DiskName, snapshot: SnapshotName) -> dict[str, Any]:
        disk = registry.get(name)
        disk.revert_to_snapshot(snapshot)
        return _disk_json(name, disk)

    @app.get("/disks/{name}/changed-areas", response_model=ChangedAreas)
    def changed_areas(name: DiskName, since: str, start_offset: int = 0,
                      snapshot: str | None = None) -> dict[str, Any]:
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
        return {"vm": vm, "snapshots": {disk: _snapshot_json(s) for disk, s in taken}}

    @app.delete("/vms/{vm}/snapshots/{snapshot}", response_model=Removed)
    def vm_remove_snapshot(vm: VmName, snapshot: SnapshotName) -> dict[str, Any]:
        registry.vm_remove_snapshot(vm, snapshot)
        return {"removed": snapshot}

    return app
