"""Run one crash-point case's operation once, between two markers strace can see, and print
the mutations the file layer counted (run by test_crash_points under strace)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import crashpoints
import test_crash_points as cases

BEGIN, END = "/blocktrail-mark-begin", "/blocktrail-mark-end"


def main(case_name: str, root: str) -> None:
    case = next(c for c in cases.CASES if c.name == case_name)
    crashpoints._install()
    with open(os.devnull, "wb") as sink:
        state = cases._prepare(case.prepare, Path(root), 1)(crashpoints.Reporter(sink.fileno()))
        os.access(BEGIN, os.F_OK)
        with crashpoints.armed(0) as switch:
            case.operate(state)
        os.access(END, os.F_OK)
    print(json.dumps(switch.points))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
