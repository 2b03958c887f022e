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


AUTH_FAILED = "authentication failed: the object was altered or the key is wrong"


class AuthenticationFailed(RepositoryError):
    """An object of an encrypted repository does not authenticate: someone who holds the
    storage (or a fault) altered it, moved it to another name or role, or it was written with
    another key. Distinct from accidental damage of an unencrypted repository."""

    exit_code = ExitCode.AUTHENTICATION_FAILED


class DowngradeRefused(AuthenticationFailed):
    """config.json says the repository is not encrypted, but the repository holds what only
    an encrypted one writes (key files, sealed index files or manifests): the config was
    altered, and nothing is written in the clear beside encrypted data."""


class ObjectAuthenticationFailed(AuthenticationFailed, ChunkCorrupt):
    """A chunk, page or page table (or a pack trailer) fails authentication: its copy is
    handled like a damaged one (quarantine, a spare copy is read)."""


class IndexAuthenticationFailed(AuthenticationFailed, ObjectMissing):
    """An object is in no index file that authenticates, and some index file does not: the
    object may be one of those it names."""


class ManifestAuthenticationFailed(AuthenticationFailed, ManifestCorrupt):
    """A manifest fails authentication (altered, or another point's moved to its name)."""


class PasswordRequired(BlocktrailError):
    """The repository is encrypted and no password was given."""

    exit_code = ExitCode.UNAUTHORIZED


class WrongPassword(BlocktrailError):
    """No key file of the repository opens with the password given."""

    exit_code = ExitCode.UNAUTHORIZED


class KeyNotFound(BlocktrailError):
    exit_code = ExitCode.NOT_FOUND_OR_EXISTS


class LastKeyRefused(BlocktrailError):
    """Removing the key file that was used to open the repository, or its last one."""

    exit_code = ExitCode.USAGE


class PasswordInUse(BlocktrailError):
    """A new password (`repo key add`, `passwd`) already opens another key file."""

    exit_code = ExitCode.USAGE


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
