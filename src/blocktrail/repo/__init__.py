"""The backup repository: packed, compressed, deduplicated chunks and restore point manifests.

The names below load their modules on first use (PEP 562): a command that opens a repository
starts deriving its key before the code of check, prune, restore and the rest is imported."""

from __future__ import annotations

from typing import TYPE_CHECKING

from blocktrail.lazy import lazy_names

if TYPE_CHECKING:
    from blocktrail.repo.check import CheckReport, Problem
    from blocktrail.repo.crypto import KdfParams
    from blocktrail.repo.forget import ForgetResult
    from blocktrail.repo.keys import Encryption, KeyFile
    from blocktrail.repo.leases import Timing
    from blocktrail.repo.manifest import RestorePoint
    from blocktrail.repo.prune import PruneReport
    from blocktrail.repo.quarantine import DamagedCopy
    from blocktrail.repo.repair import RepairReport, UnrestorablePoint
    from blocktrail.repo.repository import Repository
    from blocktrail.repo.retention import RetentionPolicy
    from blocktrail.repo.s3options import S3Options

_WHERE = {"CheckReport": "check", "Problem": "check", "KdfParams": "crypto",
          "ForgetResult": "forget", "Encryption": "keys", "KeyFile": "keys", "Timing": "leases",
          "RestorePoint": "manifest", "PruneReport": "prune", "DamagedCopy": "quarantine",
          "RepairReport": "repair", "UnrestorablePoint": "repair", "Repository": "repository",
          "RetentionPolicy": "retention", "S3Options": "s3options"}
__all__ = ["CheckReport", "DamagedCopy", "Encryption", "ForgetResult", "KdfParams", "KeyFile",
           "Problem", "PruneReport", "RepairReport", "Repository", "RestorePoint",
           "RetentionPolicy", "S3Options", "Timing", "UnrestorablePoint"]


__getattr__ = lazy_names(__name__, globals(), _WHERE)
