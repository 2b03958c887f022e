"""Errors of the repository; each says which file and which restore points are affected."""

from __future__ import annotations

from blocktrail.errors import BlocktrailError, ExitCode, NoSpace


class RepositoryError(BlocktrailError):
    """The repository is damaged: an object is missing or does not match its name."""

    exit_code = ExitCode.REPOSITORY_DAMAGED


class ChunkCorrupt(RepositoryError):
    """A stored object (chunk, page, page table) or a pack does not match its name."""


class ObjectMissing(RepositoryError):
    """No usable copy of an object: in no index file, its pack gone, or in quarantine."""


class ManifestCorrupt(RepositoryError):
    """A manifest does not decode, fails its checksum, or is not the point its name says."""


class RepositoryNoSpace(NoSpace):
    """The repository's file system (or quota) is full. What was being written was removed
    again; nothing was published."""


class RepositoryNotFound(BlocktrailError):
    exit_code = ExitCode.NOT_FOUND_OR_EXISTS


class RepositoryExists(BlocktrailError):
    exit_code = ExitCode.NOT_FOUND_OR_EXISTS


class RepositoryBusy(BlocktrailError):
    exit_code = ExitCode.BUSY


class PointNotFound(BlocktrailError):
    exit_code = ExitCode.SNAPSHOT_OR_POINT


class LeaseLost(RepositoryBusy):
    """This process's lease (on a disk, or as a writer) is lost: it expired, or another
    process took it over. It stops before it publishes anything."""


class ConditionalWritesUnsupported(BlocktrailError):
    """The object store does not enforce create-only writes (If-None-Match)."""

    exit_code = ExitCode.FORMAT
