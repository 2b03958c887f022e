"""Where an encrypted repository's password comes from, for every path that opens one (the
CLI's commands, a worker's job, a host serving restore points, an instant restore): a password
file, a password command, or the environment (``BLOCKTRAIL_PASSWORD``). Resolved when it is
needed (never for an unencrypted repository). Asking on a terminal is the CLI's (cli/password.py).
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from blocktrail.errors import InvalidArgument

PASSWORD_VARIABLE = "BLOCKTRAIL_PASSWORD"
PASSWORD_FILE_VARIABLE = "BLOCKTRAIL_PASSWORD_FILE"
PASSWORD_COMMAND_VARIABLE = "BLOCKTRAIL_PASSWORD_COMMAND"


@dataclass(frozen=True, slots=True)
class PasswordSources:
    """Where to look, in order: ``file`` (its first line), ``command`` (run without a shell;
    the first line it prints), then the environment: BLOCKTRAIL_PASSWORD_FILE,
    BLOCKTRAIL_PASSWORD_COMMAND, BLOCKTRAIL_PASSWORD."""

    file: str | None = None
    command: str | None = None


NO_SOURCES = PasswordSources()  # the environment only


def read_password_file(path: str) -> bytes:
    """A password file's first line (a trailing newline is not part of the password)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise InvalidArgument(f"password file {path}: {exc.strerror or exc}") from exc
    line = data.split(b"\n", 1)[0].removesuffix(b"\r")
    if not line:
        raise InvalidArgument(f"password file {path} is empty")
    return line


def run_password_command(command: str) -> bytes:
    """The first line a password command prints (run without a shell)."""
    try:
        done = subprocess.run(shlex.split(command), capture_output=True, check=False,
                              timeout=60)
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        raise InvalidArgument(f"password command {command!r} failed: {exc}") from exc
    if done.returncode != 0:
        raise InvalidArgument(f"password command {command!r} exited with {done.returncode}: "
                              f"{done.stderr.decode(errors='replace').strip()[:200]}")
    line = done.stdout.split(b"\n", 1)[0].removesuffix(b"\r")
    if not line:
        raise InvalidArgument(f"password command {command!r} printed no password")
    return line


def find_password(sources: PasswordSources, environ: Mapping[str, str] | None = None,
                  variable: str = PASSWORD_VARIABLE) -> bytes | None:
    """The password the sources give; None when none does."""
    env = os.environ if environ is None else environ
    file = sources.file or env.get(PASSWORD_FILE_VARIABLE) or None
    command = sources.command or env.get(PASSWORD_COMMAND_VARIABLE) or None
    if sources.file and sources.command:
        raise InvalidArgument("give a password file or a password command, not both")
    if file and not sources.command:
        return read_password_file(file)
    if command:
        return run_password_command(command)
    value = env.get(variable)
    return value.encode() if value else None


def password_source(sources: PasswordSources,
                    environ: Mapping[str, str] | None = None) -> Callable[[], bytes | None]:
    """What `Repository.open` takes: the password, looked for only when it is needed."""
    return lambda: find_password(sources, environ)
