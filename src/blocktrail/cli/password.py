"""Where a repository's password comes from, for every command that opens a repository (one
function: `repo_password`): ``--password-file FILE``, ``--password-command CMD``,
``BLOCKTRAIL_PASSWORD``, else a prompt on a terminal. The password is asked for only when the
repository turns out to be encrypted."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from blocktrail.errors import InvalidArgument

PASSWORD_VARIABLE = "BLOCKTRAIL_PASSWORD"
NEW_PASSWORD_VARIABLE = "BLOCKTRAIL_NEW_PASSWORD"
KDF_VARIABLE = "BLOCKTRAIL_KDF"
_META = "blocktrail.password"


@dataclass(frozen=True, slots=True)
class PasswordSources:
    """What the command line and the environment say about the password."""

    file: str | None = None
    command: str | None = None


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


def _from(sources: PasswordSources, variable: str, prompt: str,
          confirm: bool) -> bytes | None:
    if sources.file and sources.command:
        raise InvalidArgument("give --password-file or --password-command, not both")
    if sources.file:
        return read_password_file(sources.file)
    if sources.command:
        return run_password_command(sources.command)
    value = os.environ.get(variable)
    if value:
        return value.encode()
    if sys.stdin.isatty():
        text: str = click.prompt(prompt, hide_input=True, confirmation_prompt=confirm,
                                 err=True)
        return text.encode()
    return None


def repo_password(sources: PasswordSources) -> Callable[[], bytes | None]:
    """The password of the repository being opened, resolved when it is needed (never for
    an unencrypted one)."""
    return lambda: _from(sources, PASSWORD_VARIABLE, "repository password", False)


def new_password(path: str | None) -> bytes | None:
    """A password being set (init, key add, key passwd): ``path``, else
    BLOCKTRAIL_NEW_PASSWORD, else asked twice on a terminal."""
    return _from(PasswordSources(file=path), NEW_PASSWORD_VARIABLE, "new password", True)


def init_password(sources: PasswordSources) -> bytes | None:
    """The password of a new repository: as for opening one, but asked twice."""
    return _from(sources, PASSWORD_VARIABLE, "password for the new repository", True)


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    sources = ctx.meta.get(_META, PasswordSources())
    if param.name == "password_file":
        sources = PasswordSources(value, sources.command)
    else:
        sources = PasswordSources(sources.file, value)
    ctx.meta[_META] = sources
    return value


def password_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--password-file, --password-command (also BLOCKTRAIL_PASSWORD_FILE,
    BLOCKTRAIL_PASSWORD_COMMAND): kept for `sources`, not passed to the command."""
    for option in reversed([
            click.option("--password-file", "password_file", default=None, metavar="FILE",
                         envvar="BLOCKTRAIL_PASSWORD_FILE", expose_value=False,
                         callback=_remember,
                         help="Encrypted repositories: read the password from FILE (its first "
                              "line). Else --password-command, BLOCKTRAIL_PASSWORD, or a "
                              "prompt."),
            click.option("--password-command", "password_command", default=None,
                         metavar="CMD", envvar="BLOCKTRAIL_PASSWORD_COMMAND",
                         expose_value=False, callback=_remember,
                         help="Encrypted repositories: run CMD (no shell) and use the first "
                              "line it prints as the password.")]):
        command = option(command)
    return command


def sources() -> PasswordSources:
    """The password options of the command running now."""
    ctx = click.get_current_context(silent=True)
    while ctx is not None:
        if _META in ctx.meta:
            found: PasswordSources = ctx.meta[_META]
            return found
        ctx = ctx.parent
    return PasswordSources()
