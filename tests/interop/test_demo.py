"""The README's demo (`./run demo`), small: it must end with "identical" and exit 0."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hostproc import require_tools

pytestmark = pytest.mark.interop


def test_the_demo_runs_end_to_end() -> None:
    require_tools("qemu-io", "qemu-img")
    result = subprocess.run([sys.executable, "-m", "blocktrail.cli.demo", "--size-mib", "128",
                             "--rounds", "2"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "identical"
    assert sum("incremental backup" in line for line in lines) == 2
    assert sum("qemu-img compare" in line and line.endswith("identical") for line in lines) == 4
    assert any(line.startswith("instant restore of ") and "first 64 KiB read" in line
               for line in lines)
    assert ", 0 failed;" in lines[-2] and "no problems" in lines[-2]
