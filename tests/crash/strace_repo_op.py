"""Run the repository crash sweep's operations once each, every one between two markers strace
can see, and print the mutations the file layer counted (run by test_repository_crash_points
under strace)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import crashpoints
import test_repository_crash_points as cases

BEGIN, END = "/blocktrail-mark-begin-", "/blocktrail-mark-end-"


def main(root: str, names: list[str]) -> None:
    crashpoints._install()
    golden = cases.build_golden(Path(root) / "golden")
    counted: dict[str, list[str]] = {}
    with open(os.devnull, "wb") as sink:
        reporter = crashpoints.Reporter(sink.fileno())
        for operation in [o for o in cases.OPERATIONS if o.name in names]:
            repo = cases.lay_out_trial(golden, operation, Path(root) / operation.name)
            os.access(BEGIN + operation.name, os.F_OK)
            with crashpoints.armed(0) as switch:
                operation.operate(golden, repo, reporter)
            os.access(END + operation.name, os.F_OK)
            counted[operation.name] = switch.points
    print(json.dumps(counted))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
