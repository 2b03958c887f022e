"""The control API's request and answer models, path parameters and their JSON forms (the
schema the OpenAPI document states); the routes are in api.py and restore_api.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import Depends, Path, Query
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from blocktrail.disk import Disk, Snapshot
from blocktrail.errors import InvalidArgument
from blocktrail.host.fill import restore_status
from blocktrail.host.registry import Vm
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
    """A JSON integer (``3`` or ``3.0``), never ``true``, ``"3"`` or ``3.5``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be an integer")
        return int(value)
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


class RequestModel(BaseModel):
    """A request body: a key it does not know, or a value of another JSON type (``"yes"`` for
    a boolean, ``"3"`` for a number), is refused (400), never ignored or converted: a typo must
    not silently change what a request does."""

    model_config = ConfigDict(extra="forbid", strict=True)


class DiskCreate(RequestModel):
    name: DiskNameField = Field(examples=["disk0"])
    size_bytes: Integer = Field(ge=0, le=1 << 50)
    granularity: Integer = Field(default=64 * 1024, ge=512, le=1 << 30,
                                 description=_GRANULARITY, json_schema_extra=_GRANULARITY_DOC)


class DiskImport(RequestModel):
    name: DiskNameField
    source_path: str = Field(description="The absolute path of a raw image on the host: a "
                                         "regular file or a block device the host can read, "
                                         "whose size is where its data ends")
    granularity: Integer = Field(default=64 * 1024, ge=512, le=1 << 30,
                                 description=_GRANULARITY, json_schema_extra=_GRANULARITY_DOC)


class Resize(RequestModel):
    size_bytes: Integer = Field(ge=0, le=1 << 50)


class SnapshotCreate(RequestModel):
    name: SnapshotNameField = Field(examples=["nightly-1"])


class VmDefine(RequestModel):
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


class RestoredDisk(DiskInfo):
    """A disk just restored instantly from a restore point, and how it goes on from it."""

    continues: str | None = Field(
        description="the point's change ID, which the disk's tracking goes on from: its next "
                    "backup is an incremental against the point. null: a new tracking epoch "
                    "(see fresh_disk_id; or a point not taken of a blocktrail disk): its first "
                    "backup is full")
    fresh_disk_id: bool = Field(
        description="the host has a disk of the point's disk ID already, so this one got a "
                    "disk ID of its own (its restore points are its own, not the point's disk's)")


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
