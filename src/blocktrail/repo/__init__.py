"""The backup repository: packed, compressed, deduplicated chunks and restore point manifests."""

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

__all__ = ["CheckReport", "DamagedCopy", "Encryption", "ForgetResult", "KdfParams", "KeyFile",
           "Problem", "PruneReport", "RepairReport", "Repository", "RestorePoint",
           "RetentionPolicy", "S3Options", "Timing", "UnrestorablePoint"]
