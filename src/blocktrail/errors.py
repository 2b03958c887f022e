"""The typed errors users see.

Every error carries the message a user needs to act and the exit code the CLI maps it to.
Lower layers raise these; the CLI translates them to exit codes in one place.
"""

from __future__ import annotations


class BlocktrailError(Exception):
    """Base of every error blocktrail raises on purpose."""

    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(BlocktrailError):
    """A caller passed a value that can never be right (bad size, bad name, ...)."""

    exit_code = 2


class OutOfRange(BlocktrailError):
    """An offset or length lies outside the disk."""

    exit_code = 3


class ChangeIdError(BlocktrailError):
    """A change ID cannot be answered; the backup must fall back to a full read."""

    exit_code = 4


class StaleChangeId(ChangeIdError):
    """The change ID belongs to an earlier tracking epoch (reset, unsafe crash, revert past it,
    tracker upgrade, disk file changed outside blocktrail)."""


class InvalidChangeId(ChangeIdError):
    """The change ID is malformed, belongs to another disk, or lies in the future."""


class SnapshotNotFound(BlocktrailError):
    exit_code = 5


class SnapshotExists(BlocktrailError):
    exit_code = 5


class DiskNotFound(BlocktrailError):
    exit_code = 6


class DiskExists(BlocktrailError):
    exit_code = 6


class DiskBusy(BlocktrailError):
    """Another process or handle has the disk open."""

    exit_code = 7


class DiskClosed(BlocktrailError):
    exit_code = 7


class ReadOnly(BlocktrailError):
    exit_code = 2


class UnsupportedFormat(BlocktrailError):
    """A file was written by a newer blocktrail, or is not a blocktrail file at all."""

    exit_code = 8


class DiskIOFailure(BlocktrailError):
    """The operating system failed an I/O of a disk file (full file system, EIO, ...). The
    disk handle is closed; reopening the disk recovers it from its files."""

    exit_code = 11


class CorruptMetadata(BlocktrailError):
    """A disk's metadata cannot be decoded; nothing was changed."""

    exit_code = 8
