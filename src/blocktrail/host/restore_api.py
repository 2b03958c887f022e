"""The host's instant-restore endpoints (included by host/api.py):

- ``POST /disks/restore`` {name, repository, point}: a new disk NAME whose content is the
  restore point, at once: built aside and renamed into place like a create or an import, with
  the point's disk ID (the next backup goes on in its chain) and tracking that continues the
  point's change ID (the next backup is an incremental against it); when the host has a disk of
  that disk ID already, a fresh disk ID and a new epoch instead (points, retention and leases
  go by disk ID: two disks must not share them; its first backup is full). Its base reads from the
  repository on demand; a background fill makes it local (host/fill.py).
- ``POST /disks/{name}/fill`` {paused, rate_bytes_per_second}: pause or resume the fill, or
  limit its rate.

Errors of the repository are answered as the host's own errors the clients know: a point that
does not exist as SnapshotNotFound (exit 5: a snapshot or restore point), a repository that is
not there as DiskNotFound (exit 6: a disk, VM or repository), a prune running as DiskBusy, a
damaged manifest or page as CorruptMetadata; each message names the repository and the point.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import APIRouter
from pydantic import Field

from blocktrail.backup.chunksource import (
    RepositoryChunkSource,
    is_local_location,
    is_repository_location,
)
from blocktrail.disk import Disk
from blocktrail.disk.restoring import ChunkUnavailable
from blocktrail.errors import (
    CorruptMetadata,
    DiskBusy,
    DiskIOFailure,
    DiskNotFound,
    InvalidArgument,
    InvalidChangeId,
    SnapshotNotFound,
)
from blocktrail.host.fill import FillScheduler
from blocktrail.host.registry import DiskRegistry
from blocktrail.host.schema import (
    _GRANULARITY,
    _GRANULARITY_DOC,
    DiskInfo,
    DiskName,
    DiskNameField,
    Integer,
    RequestModel,
    RestoredDisk,
    _disk_json,
)
from blocktrail.passwords import NO_SOURCES, PasswordSources
from blocktrail.repo.backend import BucketNotFound
from blocktrail.repo.errors import (
    PasswordRequired,
    PointNotFound,
    RepositoryBusy,
    RepositoryError,
    RepositoryNotFound,
    WrongPassword,
)
from blocktrail.repo.location import is_s3_url, parse_s3_url
from blocktrail.tracking import ChangeId

_RATE = "bytes per second the fill may copy at most (null: as fast as the guest allows)"


class FillControl(RequestModel):
    """What is left out stays as it is (a new fill: runs, unlimited)."""

    paused: bool | None = Field(default=None, description="hold the fill (reads still fetch "
                                                          "what they need), or let it go on")
    rate_bytes_per_second: Integer | None = Field(default=None, ge=1, description=_RATE)


class DiskRestore(RequestModel):
    name: DiskNameField = Field(examples=["vm1-restored"])
    repository: str = Field(description="The repository, as the host reaches it: an absolute "
                                        "path on the host, or s3://BUCKET/PREFIX (with the "
                                        "host's S3 settings)")
    point: str = Field(description="The restore point's id (`blocktrail points`)")
    granularity: Integer = Field(default=64 * 1024, ge=512, le=1 << 30,
                                 description=_GRANULARITY, json_schema_extra=_GRANULARITY_DOC)
    fill: FillControl = Field(default_factory=FillControl,
                              description="how the background fill starts")


def check_repository_location(location: str) -> str:
    if "\0" in location or not is_repository_location(location) or (
            is_local_location(location) and not os.path.isabs(location)):
        raise InvalidArgument(f"repository {location!r} must be an absolute path on the host "
                              "or s3://BUCKET/PREFIX")
    if is_s3_url(location):
        parse_s3_url(location)  # InvalidArgument naming what is wrong
    return location


@contextmanager
def _repository_errors(location: str, point: str) -> Iterator[None]:
    """The repository's errors as errors a host's client knows (see the module's note)."""
    where = f"(repository {location}, restore point {point})"
    try:
        yield
    except PointNotFound as exc:
        raise SnapshotNotFound(exc.message) from exc
    except (RepositoryNotFound, BucketNotFound) as exc:
        raise DiskNotFound(exc.message) from exc
    except RepositoryBusy as exc:
        raise DiskBusy(f"{exc.message} {where}") from exc
    except (PasswordRequired, WrongPassword) as exc:  # the host's password, not the caller's
        raise InvalidArgument(f"{exc.message} {where}: the host opens an encrypted repository "
                              "with its own password (`blocktrail host --password-file FILE`, "
                              "or BLOCKTRAIL_PASSWORD in its environment)") from exc
    except RepositoryError as exc:
        raise CorruptMetadata(f"{exc.message} {where}") from exc
    except ChunkUnavailable as exc:
        raise DiskIOFailure(exc.message) from exc


def continued_change_id(change_id: str | None) -> str | None:
    """The point's change ID if it is a blocktrail disk's (the restored disk goes on from it);
    None for any other (an NBD bitmap's label: the next backup is full)."""
    if change_id is None:
        return None
    try:
        ChangeId.parse(change_id)
    except InvalidChangeId:
        return None
    return change_id


def _continued(disk: Disk, change_id: str | None) -> str | None:
    """The point's change ID if the restored disk's tracking goes on from it (its epoch
    inherits it), else None: a new epoch (a fresh disk ID, or a point of no blocktrail disk)."""
    continued = continued_change_id(change_id)
    if continued is None:
        return None
    cid = ChangeId.parse(continued)
    return continued if disk.tracker.epochs[-1].inherits == (cid.epoch, cid.seq) else None


def restore_router(registry: DiskRegistry, fills: FillScheduler,
                   repo_password: PasswordSources = NO_SOURCES) -> APIRouter:
    """``repo_password``: where the host finds an encrypted repository's password (its
    --password-file / --password-command, else its environment)."""
    router = APIRouter()

    @router.post("/disks/restore", status_code=201, response_model=RestoredDisk)
    def restore_disk(body: DiskRestore) -> dict[str, Any]:
        """Restore a point instantly into a new disk: readable (and bootable) at once, its
        writes tracked from the first one (against the point, unless ``continues`` is null);
        the rest of the point is filled in the background."""
        location = check_repository_location(body.repository)
        with _repository_errors(location, body.point):
            source = RepositoryChunkSource(location, body.point, password=repo_password)
            try:
                point = source.point
                disk = registry.restore(body.name, source, continued_change_id(point.change_id),
                                        disk_id=point.disk_id, granularity=body.granularity,
                                        successor=source.successor)
            finally:
                source.close()
        fills.start(body.name, paused=bool(body.fill.paused),
                    rate=body.fill.rate_bytes_per_second)
        return {**_disk_json(body.name, disk), "continues": _continued(disk, point.change_id),
                "fresh_disk_id": disk.disk_id != point.disk_id}

    @router.post("/disks/{name}/fill", response_model=DiskInfo)
    def control_fill(name: DiskName, body: FillControl) -> dict[str, Any]:
        """Pause or resume the fill of an instantly restored disk, or limit its rate."""
        fills.control(name, paused=body.paused, rate=body.rate_bytes_per_second,
                      set_rate="rate_bytes_per_second" in body.model_fields_set)
        return _disk_json(name, registry.get(name))

    return router
