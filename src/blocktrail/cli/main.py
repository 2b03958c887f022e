"""`blocktrail`: thin commands over the library; typed errors become exit codes here only."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

import click

from blocktrail.cli.backup import backup, check, forget, points, repo_group, restore, verify
from blocktrail.cli.cbt import cbt
from blocktrail.cli.disk import disk
from blocktrail.cli.host import host
from blocktrail.cli.output import ExitCode
from blocktrail.cli.snapshot import snapshot
from blocktrail.errors import BlocktrailError

EXIT_USAGE = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="blocktrail")
def cli() -> None:
    """Changed-block tracking for virtual disks, and backups that are never silently wrong."""


cli.add_command(disk)
cli.add_command(snapshot)
cli.add_command(cbt)
cli.add_command(host)
for command in (repo_group, backup, points, restore, verify, check, forget):
    cli.add_command(command)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; -> the exit code (0 ok; each error type has its own, see errors.py)."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="blocktrail",
                 standalone_mode=False)
    except BlocktrailError as exc:
        want_json = "--json" in (argv if argv is not None else sys.argv)
        if want_json:
            click.echo(json.dumps({"error": type(exc).__name__, "message": exc.message}))
        else:
            click.echo(f"error: {type(exc).__name__}: {exc.message}", err=True)
        return exc.exit_code
    except ExitCode as exc:
        return exc.code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return EXIT_USAGE
    except OSError as exc:
        click.echo(f"error: {exc}", err=True)
        return 1
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
