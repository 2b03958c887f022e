"""The password of the repository a command opens (one function for every command:
`repo_password`): --password-file, --password-command, the environment (passwords.py),
else asked on a terminal. Asked for only when the repository turns out to be encrypted."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from blocktrail.passwords import PasswordSources, find_password

NEW_PASSWORD_VARIABLE = "BLOCKTRAIL_NEW_PASSWORD"
KDF_VARIABLE = "BLOCKTRAIL_KDF"
_META = "blocktrail.password"


def _ask(prompt: str, confirm: bool) -> bytes | None:
    if not sys.stdin.isatty():
        return None
    text: str = click.prompt(prompt, hide_input=True, confirmation_prompt=confirm, err=True)
    return text.encode()


def repo_password(sources: PasswordSources) -> Callable[[], bytes | None]:
    """The password of the repository being opened, resolved when it is needed (never for
    an unencrypted one)."""
    return lambda: find_password(sources) or _ask("repository password", False)


def new_password(path: str | None) -> bytes | None:
    """A password being set (key add, key passwd): ``path``, else BLOCKTRAIL_NEW_PASSWORD,
    else asked twice on a terminal."""
    if path:
        return find_password(PasswordSources(file=path), {})
    return find_password(PasswordSources(), {}) or _from_env_new() or _ask("new password", True)


def _from_env_new() -> bytes | None:
    import os
    value = os.environ.get(NEW_PASSWORD_VARIABLE)
    return value.encode() if value else None


def init_password(sources: PasswordSources) -> bytes | None:
    """The password of a new repository: as for opening one, but asked twice."""
    return find_password(sources) or _ask("password for the new repository", True)


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    sources = ctx.meta.get(_META, PasswordSources())
    if param.name == "password_file":
        sources = PasswordSources(value, sources.command)
    else:
        sources = PasswordSources(sources.file, value)
    ctx.meta[_META] = sources
    return value


def password_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--password-file, --password-command: kept for `sources`, not passed to the command
    (their environment variables are read by blocktrail/passwords.py)."""
    for option in reversed([
            click.option("--password-file", "password_file", default=None, metavar="FILE",
                         expose_value=False, callback=_remember,
                         help="Encrypted repositories: read the password from FILE (its first "
                              "line; also BLOCKTRAIL_PASSWORD_FILE). Else --password-command, "
                              "BLOCKTRAIL_PASSWORD, or a prompt."),
            click.option("--password-command", "password_command", default=None,
                         metavar="CMD", expose_value=False, callback=_remember,
                         help="Encrypted repositories: run CMD (no shell) and use the first "
                              "line it prints as the password (also "
                              "BLOCKTRAIL_PASSWORD_COMMAND).")]):
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
