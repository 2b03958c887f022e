"""How the CLI prints: JSON for machines, short lines for people."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import click

from blocktrail.errors import InvalidArgument

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str) -> int:
    """'4G', '64K', '1048576', '2TiB' -> bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGTP]?)(?:I?B)?\s*", text.upper())
    if not match:
        raise InvalidArgument(f"invalid size {text!r}: a number with an optional K/M/G/T suffix")
    return int(match.group(1)) * _UNITS[match.group(2)]


class Percent(click.ParamType[float]):
    """A percentage from 0 to 100 (never NaN or infinite)."""

    name = "percent"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not 0 <= number <= 100:
            self.fail(f"{value!r} is not a percentage from 0 to 100", param, ctx)
        return number


PERCENT = Percent()


def human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def emit(as_json: bool, obj: Any, text: str) -> None:
    if as_json:
        click.echo(json.dumps(obj, indent=2, default=str))
    else:
        click.echo(printable(text))


def printable(text: str) -> str:
    """``text`` as any terminal can take it: a character Unicode cannot encode (a lone surrogate,
    from a file name that is not UTF-8) as an escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class ExitCode(Exception):
    """Leave the CLI with this exit code; what it means was already printed."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code
