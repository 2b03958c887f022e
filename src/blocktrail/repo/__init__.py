"""The backup repository: packed, compressed, deduplicated chunks and restore point manifests."""

from blocktrail.repo.manifest import RestorePoint
from blocktrail.repo.repository import CheckReport, Problem, Repository
from blocktrail.repo.retention import RetentionPolicy

__all__ = ["CheckReport", "Problem", "Repository", "RestorePoint", "RetentionPolicy"]
