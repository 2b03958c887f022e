"""The host's HTTP control API (FastAPI): disks, VMs, snapshots, changed areas, tracking reset.

Changed areas follow QueryDiskChangedAreas: one answer may cover a prefix of the disk; the
caller continues from ``start_offset + length``. Errors are JSON ``{"error", "message"}`` with a
status code per error type; no endpoint ever answers a refused change ID with an empty list.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

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
)
from blocktrail.host.registry import DiskRegistry, Vm, VmNotFound

_STATUS: list[tuple[type[BlocktrailError], int]] = [
    (DiskNotFound, 404), (SnapshotNotFound, 404), (VmNotFound, 404),
    (DiskExists, 409), (SnapshotExists, 409), (DiskBusy, 409),
    (ChangeIdError, 422), (OutOfRange, 416), (InvalidArgument, 400),
]


BearerCredentials = Annotated[HTTPAuthorizationCredentials | None,
                              Depends(HTTPBearer(auto_error=False))]


class Unauthorized(BlocktrailError):
    exit_code = 9


class DiskCreate(BaseModel):
    name: str = Field(examples=["disk0"])
    size_bytes: int = Field(ge=0, le=1 << 50)
    granularity: int = Field(default=64 * 1024, ge=512, le=1 << 30)


class DiskImport(BaseModel):
    name: str
    source_path: str = Field(description="A raw image readable by the host")
    granularity: int = Field(default=64 * 1024, ge=512, le=1 << 30)


class Resize(BaseModel):
    size_bytes: int = Field(ge=0, le=1 << 50)


class SnapshotCreate(BaseModel):
    name: str


class VmDefine(BaseModel):
    name: str
    disks: list[str]


class ErrorBody(BaseModel):
    error: str
    message: str


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


def create_app(registry: DiskRegistry, token: str | None = None) -> FastAPI:
    """The control API over ``registry``; with ``token``, every call needs
    ``Authorization: Bearer <token>``."""
    def authorize(creds: BearerCredentials) -> None:
        if token is None:
            return
        given = "" if creds is None else creds.credentials
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise Unauthorized("missing or wrong API token")

    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorBody} for code in (400, 401, 404, 409, 416, 422)}
    app = FastAPI(title="blocktrail host", version=__version__,
                  dependencies=[Depends(authorize)], responses=errors)

    @app.exception_handler(BlocktrailError)
    async def _error(_request: Request, exc: BlocktrailError) -> JSONResponse:
        status = 401 if isinstance(exc, Unauthorized) else next(
            (code for kind, code in _STATUS if isinstance(exc, kind)), 500)
        return JSONResponse({"error": type(exc).__name__, "message": exc.message}, status)

    @app.get("/disks")
    def list_disks() -> list[dict[str, Any]]:
        return [_disk_json(n, registry.get(n)) for n in registry.names()]

    @app.post("/disks", status_code=201)
    def create_disk(body: DiskCreate) -> dict[str, Any]:
        return _disk_json(body.name, registry.create(body.name, body.size_bytes,
                                                     body.granularity))

    @app.post("/disks/import", status_code=201)
    def import_disk(body: DiskImport) -> dict[str, Any]:
        disk = registry.import_raw(body.name, body.source_path, body.granularity)
        return _disk_json(body.name, disk)

    @app.get("/disks/{name}")
    def disk_info(name: str) -> dict[str, Any]:
        return _disk_json(name, registry.get(name))

    @app.post("/disks/{name}/resize")
    def resize(name: str, body: Resize) -> dict[str, Any]:
        disk = registry.get(name)
        disk.resize(body.size_bytes)
        return _disk_json(name, disk)

    @app.get("/disks/{name}/snapshots")
    def list_snapshots(name: str) -> list[dict[str, Any]]:
        return [_snapshot_json(s) for s in registry.get(name).snapshots]

    @app.post("/disks/{name}/snapshots", status_code=201)
    def create_snapshot(name: str, body: SnapshotCreate) -> dict[str, Any]:
        return _snapshot_json(registry.get(name).create_snapshot(body.name))

    @app.delete("/disks/{name}/snapshots/{snapshot}")
    def remove_snapshot(name: str, snapshot: str) -> dict[str, Any]:
        registry.get(name).remove_snapshot(snapshot)
        return {"removed": snapshot}

    @app.post("/disks/{name}/snapshots/{snapshot}/revert")
    def revert(name: str, snapshot: str) -> dict[str, Any]:
        disk = registry.get(name)
        disk.revert_to_snapshot(snapshot)
        return _disk_json(name, disk)

    @app.get("/disks/{name}/changed-areas")
    def changed_areas(name: str, since: str, start_offset: int = 0,
                      snapshot: str | None = None) -> dict[str, Any]:
        """QueryDiskChangedAreas: areas changed after ``since`` up to ``snapshot`` (or now);
        ``since=*`` gives all allocated areas."""
        return registry.get(name).query_changed_areas(since, start_offset, snapshot).to_json()

    @app.post("/disks/{name}/tracking/reset")
    def reset_tracking(name: str) -> dict[str, Any]:
        return {"change_id": registry.get(name).reset_tracking()}

    @app.get("/vms")
    def list_vms() -> list[dict[str, Any]]:
        return [_vm_json(vm) for vm in registry.vms()]

    @app.post("/vms", status_code=201)
    def define_vm(body: VmDefine) -> dict[str, Any]:
        return _vm_json(registry.define_vm(body.name, body.disks))

    @app.post("/vms/{vm}/snapshots", status_code=201)
    def vm_snapshot(vm: str, body: SnapshotCreate) -> dict[str, Any]:
        taken = registry.vm_snapshot(vm, body.name)
        return {"vm": vm, "snapshots": {disk: _snapshot_json(s) for disk, s in taken}}

    @app.delete("/vms/{vm}/snapshots/{snapshot}")
    def vm_remove_snapshot(vm: str, snapshot: str) -> dict[str, Any]:
        registry.vm_remove_snapshot(vm, snapshot)
        return {"removed": snapshot}

    return app
