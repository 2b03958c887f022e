"""Errors of the repository; each says which file and which restore points are affected."""

from __future__ import annotations

from blocktrail.errors import BlocktrailError

EXIT_REPOSITORY_DAMAGED = 12


class RepositoryError(BlocktrailError):
    """The repository is damaged: an object is missing or does not match its name."""

    exit_code = EXIT_REPOSITORY_DAMAGED


class ChunkCorrupt(RepositoryError):
    pass


class ObjectMissing(RepositoryError):
    pass


class ManifestCorrupt(RepositoryError):
    pass


class RepositoryNotFound(BlocktrailError):
    exit_code = 6


class RepositoryExists(BlocktrailError):
    exit_code = 6


class RepositoryBusy(BlocktrailError):
    exit_code = 7


class PointNotFound(BlocktrailError):
    exit_code = 5
