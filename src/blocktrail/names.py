"""The one grammar for the names users give: disks, VMs and snapshots (docs/names.md).

Checked once, here, below the library, the host's API and the CLI: a name that passes can be a
directory name, a URL path segment (percent-encoded), part of an NBD export name
(``DISK@SNAPSHOT``) and a JSON string, and a name that fails is refused before anything changes.
"""

from __future__ import annotations

import re

from blocktrail.errors import InvalidArgument

DISK_NAME_MAX = 64
DISK_NAME_PATTERN = f"[A-Za-z0-9][A-Za-z0-9._-]{{0,{DISK_NAME_MAX - 1}}}"
DISK_NAME_RULE = f"1-{DISK_NAME_MAX} of A-Z a-z 0-9 . _ -, starting with a letter or digit"
SNAPSHOT_NAME_MAX = 128
SNAPSHOT_NAME_RULE = (f"1-{SNAPSHOT_NAME_MAX} printable characters; no '/' or '@', no "
                      "control or format characters, no spaces at either end, not '.' or '..'")
# For documents (OpenAPI): what the rule above allows, as far as a regular expression can say.
SNAPSHOT_NAME_SCHEMA_PATTERN = r"^[^/@\s](?:[^/@]*[^/@\s])?$"
_DISK_NAME = re.compile(DISK_NAME_PATTERN)


def check_disk_name(name: str, kind: str = "disk") -> str:
    """A disk (or VM) name: it is a directory name on the host, so plain ASCII."""
    if not isinstance(name, str) or not _DISK_NAME.fullmatch(name):
        raise InvalidArgument(f"invalid {kind} name {_shown(name)}: {DISK_NAME_RULE}")
    return name


def is_valid_disk_name(name: object) -> bool:
    return isinstance(name, str) and _DISK_NAME.fullmatch(name) is not None


def check_vm_name(name: str) -> str:
    return check_disk_name(name, "VM")


def snapshot_name_problem(name: object) -> str | None:
    """Why ``name`` is not a valid snapshot name, or None."""
    if not isinstance(name, str):
        return "not a string"
    if not name:
        return "empty"
    if len(name) > SNAPSHOT_NAME_MAX:
        return f"longer than {SNAPSHOT_NAME_MAX} characters"
    if name in (".", ".."):
        return "'.' and '..' are not names"
    if "/" in name or "@" in name:
        return "contains '/' or '@'"
    if name != name.strip():
        return "begins or ends with a space"
    if not name.isprintable():  # control, format (bidi), surrogate, unassigned, line breaks
        return "contains a character that is not printable"
    return None


def check_snapshot_name(name: str) -> str:
    problem = snapshot_name_problem(name)
    if problem is not None:
        raise InvalidArgument(f"invalid snapshot name {_shown(name)} ({problem}): "
                              f"{SNAPSHOT_NAME_RULE}")
    return name


def is_valid_snapshot_name(name: object) -> bool:
    return snapshot_name_problem(name) is None


def legacy_snapshot_name(name: str, taken: set[str]) -> str:
    """A valid name for a snapshot an older blocktrail let through (a lone surrogate, a control
    character, '.'): its characters escaped, made unique among ``taken``."""
    escaped = "".join(ch if (ch.isprintable() and ch not in "/@") else
                      f"\\u{ord(ch):04x}" for ch in name).strip() or "unnamed"
    if escaped in (".", ".."):
        escaped = f"dot{len(escaped)}"
    base = escaped[: SNAPSHOT_NAME_MAX - 8]
    candidate, n = base, 1
    while candidate in taken or not is_valid_snapshot_name(candidate):
        n += 1
        candidate = f"{base}~{n}"
    return candidate


def _shown(name: object) -> str:
    """A name in an error message: always printable (no terminal escapes), never too long."""
    text = repr(name)
    return text if len(text) <= 80 else text[:77] + "..."
