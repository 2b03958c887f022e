"""`blocktrail`: thin commands over the library; every error becomes an exit code here only.

Every error reaches the user as one line and a documented exit code (errors.ExitCode, README):
a typed error its own code; a usage error 2; an OS error 15 when a file system is full, else 11;
an interrupt 130; anything else 1, as "internal error" (a bug; BLOCKTRAIL_DEBUG=1 prints the
traceback). With --json the error is also a JSON object on stdout.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import traceback
from collections.abc import Sequence

# numpy (the tracker's bitmaps) does no linear algebra here; OpenBLAS's worker threads would only
# spin beside a backup's hashing and compressing. Set before anything imports numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import click

from blocktrail.cli.backup import (
    backup,
    check,
    forget,
    points,
    prune,
    repo_group,
    restore,
    verify,
)
from blocktrail.cli.cbt import cbt
from blocktrail.cli.disk import disk
from blocktrail.cli.host import host
from blocktrail.cli.output import ExitCode, printable
from blocktrail.cli.serve import serve
from blocktrail.cli.snapshot import snapshot
from blocktrail.cli.vm import vm
from blocktrail.cli.worker import worker
from blocktrail.errors import BlocktrailError, is_no_space
from blocktrail.errors import ExitCode as Exit

DEBUG_VARIABLE = "BLOCKTRAIL_DEBUG"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="blocktrail")
def cli() -> None:
    """Changed-block tracking for virtual disks, and backups that are never silently wrong."""


cli.add_command(disk)
cli.add_command(snapshot)
cli.add_command(cbt)
cli.add_command(host)
cli.add_command(vm)
cli.add_command(worker)
for command in (repo_group, backup, points, restore, verify, check, forget, prune, serve):
    cli.add_command(command)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; -> the exit code (0 ok; each error type has its own, see errors.ExitCode)."""
    args = list(argv) if argv is not None else sys.argv[1:]
    try:
        result = cli.main(args=args, prog_name="blocktrail", standalone_mode=False)
    except BlocktrailError as exc:
        return _fail(args, type(exc).__name__, exc.message, exc.exit_code)
    except ExitCode as exc:
        return exc.code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return Exit.INTERRUPTED
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.NoArgsIsHelpError as exc:  # a group alone: its help, on stderr
        exc.show()
        return Exit.USAGE
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "blocktrail"
        what = exc.format_message().rstrip(".")
        return _fail(args, "UsageError", f"{where}: {what} (see {where} --help)", Exit.USAGE,
                     "usage")
    except click.ClickException as exc:
        return _fail(args, type(exc).__name__, exc.format_message(), Exit.USAGE)
    except KeyboardInterrupt:
        click.echo("aborted", err=True)
        return Exit.INTERRUPTED
    except UnicodeEncodeError as exc:  # only what was typed holds what Unicode cannot encode
        shown = repr(exc.object)[:80]
        return _fail(args, "InvalidArgument", f"{shown} cannot be used: it is not valid Unicode",
                     Exit.USAGE)
    except OSError as exc:
        if is_no_space(exc):
            return _fail(args, "NoSpace", f"the file system is full: {_os_error(exc)}; free "
                         "space and retry", Exit.NO_SPACE)
        return _fail(args, "IOFailure", _os_error(exc), Exit.IO_FAILURE)
    except Exception as exc:
        _debug_traceback()
        return _fail(args, "InternalError", f"{type(exc).__name__}: {exc} (a bug; "
                     f"{DEBUG_VARIABLE}=1 prints the traceback)", Exit.INTERNAL, "internal error")
    return result if isinstance(result, int) else Exit.OK


def _fail(args: list[str], kind: str, message: str, code: int, label: str = "") -> int:
    """One line on stderr (and the error as JSON on stdout with --json)."""
    message = " ".join(message.split("\n"))
    if "--json" in args:
        click.echo(json.dumps({"error": kind, "message": message}))
    click.echo(printable(f"error: {label or kind}: {message}"), err=True)
    return code


def _os_error(exc: OSError) -> str:
    """``strerror: file`` (or ``file -> other``), the way the OS names the failure."""
    text = exc.strerror or type(exc).__name__
    if exc.filename is not None:
        text += f": {os.fsdecode(exc.filename)}"
        if exc.filename2 is not None:
            text += f" -> {os.fsdecode(exc.filename2)}"
    return text


def _debug_traceback() -> None:
    if os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
        click.echo(printable(traceback.format_exc()), err=True)


def entry() -> None:
    # A command allocates in bursts (the modules it imports, a chunk index of 10^5 entries):
    # at the collector's default threshold (700 allocations) it walks those young objects
    # again and again, as long as reading an index takes without it. 10,000 still bounds
    # what a cycle can hold before it is collected.
    gc.set_threshold(10_000, 10, 10)
    code = main()
    # Past this point nothing of the command's is written or closed by a finalizer: its files
    # are synced and closed. Frozen, its objects are freed without a last full collection
    # over them as the interpreter exits (tens of ms after a backup read its chunk index).
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
