"""blocktrail: changed-block tracking for virtual disks, and incremental backups built on it."""

__version__ = "0.1.0"
