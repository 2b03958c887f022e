"""Errors of the repository; each says which file and which restore points are affected."""

from __future__ import annotations

from blocktrail.errors import BlocktrailError, ExitCode


class RepositoryError(BlocktrailError):
    """The repository is damaged: an object is missing or does not match its name."""

    exit_code = ExitCode.REPOSITORY_DAMAGED


class ChunkCorrupt(RepositoryError):
    pass


class ObjectMissing(RepositoryError):
    pass


class ManifestCorrupt(RepositoryError):
    pass


class RepositoryNotFound(BlocktrailError):
    exit_code = ExitCode.NOT_FOUND_OR_EXISTS


class RepositoryExists(BlocktrailError):
    exit_code = ExitCode.NOT_FOUND_OR_EXISTS


class RepositoryBusy(BlocktrailError):
    exit_code = ExitCode.BUSY


class PointNotFound(BlocktrailError):
    exit_code = ExitCode.SNAPSHOT_OR_POINT
