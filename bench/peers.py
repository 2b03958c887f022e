"""The peers a backup benchmark runs side by side with blocktrail: restic and borg (Debian)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class PeerRun:
    seconds: float
    output: str


class Peer:
    name = ""

    def __init__(self, repo: str) -> None:
        self.repo = repo

    @staticmethod
    def available(tool: str) -> bool:
        return shutil.which(tool) is not None

    def _run(self, *args: str, cwd: str | None = None) -> PeerRun:
        start = time.perf_counter()
        out = subprocess.run(list(args), env=self.env(), cwd=cwd, capture_output=True,
                             text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {out.stderr.strip()[-2000:]}")
        return PeerRun(time.perf_counter() - start, out.stdout)

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def init(self) -> None:
        raise NotImplementedError

    def backup(self, image: str, tag: str) -> PeerRun:
        raise NotImplementedError

    def restore(self, tag: str, target_dir: str) -> PeerRun:
        raise NotImplementedError


class Restic(Peer):
    name = "restic"

    def env(self) -> dict[str, str]:
        return {**os.environ, "RESTIC_PASSWORD": "bench", "RESTIC_CACHE_DIR":
                self.repo + "-cache"}

    def init(self) -> None:
        self._run("restic", "init", "--repo", self.repo)

    def backup(self, image: str, tag: str) -> PeerRun:
        return self._run("restic", "backup", "--repo", self.repo, "--tag", tag,
                         os.path.basename(image), cwd=os.path.dirname(image))

    def restore(self, tag: str, target_dir: str) -> PeerRun:
        return self._run("restic", "restore", "latest", "--repo", self.repo, "--tag", tag,
                         "--target", target_dir)


class Borg(Peer):
    name = "borg"

    def env(self) -> dict[str, str]:
        return {**os.environ, "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
                "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes", "BORG_BASE_DIR": self.repo + "-base"}

    def init(self) -> None:
        self._run("borg", "init", "--encryption=none", self.repo)

    def backup(self, image: str, tag: str) -> PeerRun:
        return self._run("borg", "create", "--compression", "zstd,3", f"{self.repo}::{tag}",
                         os.path.basename(image), cwd=os.path.dirname(image))

    def restore(self, tag: str, target_dir: str) -> PeerRun:
        os.makedirs(target_dir, exist_ok=True)
        return self._run("borg", "extract", "--sparse", f"{self.repo}::{tag}", cwd=target_dir)
