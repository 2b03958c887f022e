"""What several benchmarks measure the same way: a process's CPU time, and a count option."""

from __future__ import annotations

import argparse
import os


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far, every thread (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def count(text: str) -> int:
    """An argparse type: a count of 1 or more (rounds, pairs)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count") from None
    if value < 1:
        raise argparse.ArgumentTypeError("takes a count of 1 or more")
    return value


def count_or_none(text: str) -> int:
    """An argparse type: 0 (not run) or a `count`."""
    if text.strip() == "0":
        return 0
    try:
        return count(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r}: takes 0 (not run) or a count of 1 or "
                                         "more") from None
