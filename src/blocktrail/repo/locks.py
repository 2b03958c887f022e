"""The repository lock: shared by every writer, exclusive for prune.

flock locks die with their process, so a killed backup never leaves a stale lock behind."""

from __future__ import annotations

import fcntl
import os

from blocktrail.repo.errors import RepositoryBusy


class RepoLock:
    def __init__(self, path: str, *, exclusive: bool, what: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(self._fd, mode | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            self._fd = None
            held = "backups are running" if exclusive else "a prune is running"
            raise RepositoryBusy(
                f"cannot {what}: {held} in this repository; try again later") from None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
