"""One backup job per repository and disk: an ``flock`` on ``REPO/locks/job-<hash of disk>.lock``,
taken by the worker's runs and by the host's "back up now".

The kernel drops the lock when its holder dies (SIGKILL included), so a killed worker never
blocks the next. It guards against two workers (or two job files) backing up the same disk into
the same repository at once on this machine; a repository on a network file system shared by
several machines needs a lease in the repository (S3 repositories) instead.
"""

from __future__ import annotations

import fcntl
import hashlib
import os

from blocktrail.errors import BlocktrailError, ExitCode


class DiskJobBusy(BlocktrailError):
    """Another worker is backing up this disk into this repository."""

    exit_code = ExitCode.BUSY


class DiskJobLock:
    def __init__(self, repository: str, disk_key: str) -> None:
        digest = hashlib.sha256(disk_key.encode()).hexdigest()[:32]
        self.path = os.path.join(repository, "locks", f"job-{digest}.lock")
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            self._fd = None
            raise DiskJobBusy(f"another worker is backing up {disk_key} into {repository} "
                              f"(it holds {self.path}); this run waits for the next") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock
            self._fd = None

    def __enter__(self) -> DiskJobLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
