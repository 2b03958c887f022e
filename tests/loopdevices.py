"""Loop devices for the tests that need a real block device (root and losetup; skipped where
none can be made)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def loop_device(backing: Path, *, read_only: bool = False) -> Iterator[str]:
    """A loop device over the file ``backing``, detached after."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("loop devices need root and losetup")
    made = subprocess.run(["losetup", "--find", "--show",
                           *(["--read-only"] if read_only else []), str(backing)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"no loop device here: {made.stderr.strip()}")
    device = made.stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", device], check=True)
