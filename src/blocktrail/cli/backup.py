"""`blocktrail repo init | repo repair | backup | points | restore | verify | check | forget`."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import click

from blocktrail.cli.disk import json_option
from blocktrail.cli.output import PERCENT, ExitCode, emit, human
from blocktrail.cli.target import host_option, nbd_tls_options, tls_parameters
from blocktrail.errors import ExitCode as Exit
from blocktrail.errors import InvalidArgument
from blocktrail.names import check_disk_name, check_snapshot_name
from blocktrail.nbd.uri import is_nbd_uri

# Each command imports the heavy parts (the engine, NBD, the repository, rich) when it runs:
# `blocktrail --help` and `blocktrail points` stay quick.
if TYPE_CHECKING:
    from blocktrail.backup.source import Source
    from blocktrail.nbd.uri import TlsParameters

repo_option = click.option("--repo", "repo_path", required=True, type=click.Path(),
                           envvar="BLOCKTRAIL_REPO", help="Repository directory.")


@contextlib.contextmanager
def progress_bar(label: str, quiet: bool) -> Iterator[Callable[[int, int], None] | None]:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if quiet or not console.is_terminal:
        yield None
        return
    with Progress("[progress.description]{task.description}", BarColumn(), TaskProgressColumn(),
                  TimeRemainingColumn(), transient=True, console=console) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@contextlib.contextmanager
def open_source(disk: str, host: str | None, *, bitmap: str | None = None,
                disk_id: str | None = None, tls: TlsParameters | None = None
                ) -> Iterator[Source]:
    """DISK as a backup source: an NBD URI (any NBD export), NAME on the host ``host``, or a
    local disk directory."""
    if not is_nbd_uri(disk) and (bitmap or disk_id):
        raise InvalidArgument("--bitmap and --disk-id are for NBD URIs (nbd://, nbd+unix://)")
    if tls is not None and host is None:
        raise InvalidArgument("--tls-* options are for a host's disks (--host); an nbds:// URI "
                              "carries its own (tls-certificates=DIR, tls-psk-file=FILE)")
    if is_nbd_uri(disk):
        from blocktrail.backup.sources.nbd import NbdExportSource
        with contextlib.closing(NbdExportSource(disk, bitmap=bitmap, disk_id=disk_id)) as src:
            yield src
    elif host is not None:
        from blocktrail.backup.sources.host import HostDiskSource
        from blocktrail.host.client import HostClient
        check_disk_name(disk)
        client = HostClient.from_env(host)
        try:
            with contextlib.closing(HostDiskSource(client, disk, api_host=client.endpoint.host,
                                                   tls=tls)) as src:
                yield src
        finally:
            client.close()
    else:
        from blocktrail.backup.sources.local import LocalDiskSource
        with contextlib.closing(LocalDiskSource(disk)) as src:
            yield src


@click.group("repo")
def repo_group() -> None:
    """Backup repositories."""


@repo_group.command("init")
@click.argument("path", type=click.Path())
@json_option
def repo_init(path: str, as_json: bool) -> None:
    """Create an empty repository in the directory PATH."""
    from blocktrail.repo import Repository
    with Repository.init(path) as repo:
        info = {"path": path, "repo_id": repo.repo_id, "chunk_size": repo.chunk_size}
    emit(as_json, info, f"repository {path} created (chunks of {human(repo.chunk_size)})")


@repo_group.command("repair")
@click.argument("path", metavar="REPO", type=click.Path())
@json_option
def repo_repair(path: str, as_json: bool) -> None:
    """Read every pack, put damaged copies in quarantine, rebuild the index from the intact
    objects, delete stray temporary files, and name every restore point that cannot be fully
    restored (exit 12). Takes the repository lock exclusively, like prune."""
    from blocktrail.repo import Repository
    from blocktrail.repo.repair import ADVICE
    with Repository.open(path) as repo, progress_bar("repair", as_json):
        report = repo.repair()
    lines = [f"read {report.packs_read} packs: {report.objects_intact} intact objects, "
             f"{len(report.damaged)} damaged copies put in quarantine"
             + (f", {report.objects_copied} objects copied out of "
                f"{len(report.damaged_trailers)} packs with a damaged trailer"
                if report.damaged_trailers else "")
             + f"; {report.index_files_replaced} index files replaced by one"
             + (f", {report.temp_files_deleted} temporary files deleted"
                if report.temp_files_deleted else "")]
    lines += [f"  damaged {c.kind_name} {c.digest.hex()} in pack {c.pack_id} at offset "
              f"{c.offset}" for c in report.damaged]
    if report.ok:
        lines.append(f"all {report.points} restore points can be restored")
    else:
        lines.append(f"{len(report.unrestorable)} of {report.points} restore points CANNOT be "
                     "fully restored:")
        for point in report.unrestorable:
            shown = "; ".join(point.missing[:5])
            more = f" (and {len(point.missing) - 5} more)" if len(point.missing) > 5 else ""
            lines.append(f"  {point.point_id}: lacks {shown}{more}")
        lines.append(ADVICE)
    emit(as_json, report.to_json(), "\n".join(lines))
    if not report.ok:
        raise ExitCode(Exit.REPOSITORY_DAMAGED)


@click.command("backup")
@click.argument("disk_path", metavar="DISK")
@repo_option
@host_option
@nbd_tls_options
@click.option("--bitmap", default=None, metavar="NAME",
              help="NBD URIs: a QEMU dirty bitmap the export offers (qemu:dirty-bitmap:NAME) "
                   "that has recorded every write since the previous backup of this disk.")
@click.option("--disk-id", "disk_id", default=None, metavar="ID",
              help="NBD URIs: the disk's identity in the repository (default: the URI).")
@click.option("--full", is_flag=True, help="Read everything, whatever the tracker says.")
@click.option("--audit-sample", "audit_pct", default=1.0, show_default=True, type=PERCENT,
              help="Percent of unchanged chunks re-read and compared (at least 16).")
@json_option
def backup(disk_path: str, repo_path: str, host: str | None, tls_certificates: str | None,
           tls_psk_file: str | None, tls_username: str | None, bitmap: str | None,
           disk_id: str | None, full: bool, audit_pct: float, as_json: bool) -> None:
    """Back up DISK: a disk directory, NAME on a host (--host), or an NBD URI
    (nbd+unix:///EXPORT?socket=PATH, nbd://HOST[:PORT]/EXPORT). Incremental when the changes
    since the last restore point can be trusted; otherwise full, and the output says why."""
    from blocktrail.backup.engine import BackupOptions, run_backup
    from blocktrail.repo import Repository
    with Repository.open(repo_path) as repo, \
            open_source(disk_path, host, bitmap=bitmap, disk_id=disk_id,
                        tls=tls_parameters(tls_certificates, tls_psk_file, tls_username)) as src, \
            progress_bar("backup", as_json) as progress:
        report = run_backup(src, repo, BackupOptions(force_full=full, audit_percent=audit_pct),
                            progress)
    audit = report.audit
    out = {"point": report.point.summary(), "kind": report.kind,
           "fallback_reason": report.fallback_reason, "chunks_read": report.chunks_read,
           "bytes_read": report.bytes_read, "bytes_stored": report.point.stats["bytes_stored"],
           "seconds": round(report.seconds, 3), "passed_over": list(report.passed_over),
           "chunks_read_again": report.chunks_read_again,
           "audit": {"sampled_chunks": audit.sampled_chunks, "tracker_trusted":
                     audit.tracker_trusted, "mismatches": [list(e) for e in
                                                           audit.mismatched_areas],
                     "damaged_in_repository": [list(e) for e in audit.damaged_areas]}}
    lines = [f"{report.kind} backup {report.point.id}: read {human(report.bytes_read)}, "
             f"stored {human(report.point.stats['bytes_stored'])} in {report.seconds:.2f} s"]
    lines += [f"not based on {why}" for why in report.passed_over]
    if report.chunks_read_again:
        lines.append(f"{report.chunks_read_again} chunks of the base point that the repository "
                     "lost were read from the disk again")
    if report.fallback_reason:
        lines.append(f"full, because {report.fallback_reason}")
    if audit.sampled_chunks:
        lines.append(f"audit: {audit.sampled_chunks} unchanged chunks re-read, "
                     + ("all match" if audit.tracker_trusted else
                        f"MISMATCH at {[list(e) for e in audit.mismatched_areas]}: the tracker "
                        "missed changes; stored the right data; the next backup is full"))
    if audit.damaged_areas:
        lines.append(f"audit: the stored copies of {[list(e) for e in audit.damaged_areas]} "
                     "were DAMAGED in the repository: put in quarantine and stored again from "
                     "the disk (run `blocktrail check --read-data`)")
    emit(as_json, out, "\n".join(lines))


@click.command("points")
@click.argument("repo_path", metavar="REPO", type=click.Path())
@click.option("--disk", "disk_id", default=None, help="Only this disk id.")
@json_option
def points(repo_path: str, disk_id: str | None, as_json: bool) -> None:
    """List restore points, oldest first."""
    from blocktrail.repo import Repository
    with Repository.open(repo_path) as repo:
        intact, damaged = repo.scan_points()
    found = [p.summary() for p in intact if disk_id is None or p.disk_id == disk_id]
    text = "\n".join(f"{p['id']}  {p['kind']:<11} {p['verify_state']:<10} {p['disk_id']}  "
                     f"{p['change_id']}" for p in found) or "(no restore points)"
    emit(as_json, found, text)
    for name, message in damaged:  # never left out silently
        click.echo(f"warning: points/{name} is not listed: {message}", err=True)


@click.command("restore")
@click.argument("repo_path", metavar="REPO", type=click.Path())
@click.argument("point_id", metavar="POINT")
@click.option("--to", "target", default=None, type=click.Path(dir_okay=False),
              help="The file to write (not with --instant).")
@click.option("--format", "fmt", type=click.Choice(["raw", "qcow2"]), default=None,
              help="Of the file --to: raw (the default) or qcow2.")
@click.option("--instant", is_flag=True,
              help="Create the disk --disk on the host --host whose content is POINT at once "
                   "(readable and bootable over NBD now, its writes tracked; the rest is copied "
                   "in the background; REPO is a path on the host).")
@host_option
@click.option("--disk", "disk_name", default=None, metavar="NAME",
              help="--instant: the new disk's name on the host.")
@click.option("--fill-rate", "fill_rate", default=None, metavar="RATE",
              help="--instant: copy at most RATE per second in the background, e.g. 50M.")
@json_option
def restore(repo_path: str, point_id: str, target: str | None, fmt: str | None, instant: bool,
            host: str | None, disk_name: str | None, fill_rate: str | None,
            as_json: bool) -> None:
    """Write restore point POINT to the file --to (every chunk's hash is checked), or, with
    --instant, restore it into a new disk on a host that is usable at once."""
    if instant:
        _restore_instantly(repo_path, point_id, target, fmt, host, disk_name, fill_rate,
                           as_json)
        return
    if target is None:
        raise InvalidArgument("give --to FILE (or --instant --host API --disk NAME)")
    if disk_name is not None or fill_rate is not None:
        raise InvalidArgument("--disk and --fill-rate go with --instant")
    fmt = fmt or "raw"
    from blocktrail.repo import Repository
    with Repository.open(repo_path) as repo, progress_bar("restore", as_json) as progress:
        if fmt == "raw":
            written = repo.restore(point_id, target, progress)
        else:
            with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(target))) as d:
                raw = os.path.join(d, "image.raw")
                written = repo.restore(point_id, raw, progress)
                _convert_qcow2(raw, target)
    emit(as_json, {"point": point_id, "target": target, "format": fmt, "data_bytes": written},
         f"restored {point_id} to {target} ({fmt}, {human(written)} of data)")


def _restore_instantly(repo_path: str, point_id: str, target: str | None, fmt: str | None,
                       host: str | None, disk_name: str | None, fill_rate: str | None,
                       as_json: bool) -> None:
    import time

    from blocktrail.cli.output import parse_size
    from blocktrail.cli.target import call, with_host

    if target is not None or fmt is not None:
        raise InvalidArgument("--instant restores into a disk on a host, not to a file: leave "
                              "out --to and --format")
    if host is None or disk_name is None:
        raise InvalidArgument("--instant needs --host API and --disk NAME")
    check_disk_name(disk_name)
    repository = repo_path if "://" in repo_path else os.path.abspath(repo_path)
    body: dict[str, Any] = {"name": disk_name, "repository": repository, "point": point_id}
    if fill_rate is not None:
        body["fill"] = {"rate_bytes_per_second": parse_size(fill_rate)}
    started = time.perf_counter()
    info = with_host(host, call("POST", "disks", "restore", json=body))
    seconds = time.perf_counter() - started
    emit(as_json, {**info, "seconds": round(seconds, 3)},
         f"disk {disk_name} restored instantly from {point_id} in {seconds:.2f} s: usable now "
         f"(NBD export {disk_name}), its writes tracked against the point; "
         f"{info['restore']['summary']} in the background (`blocktrail disk info {disk_name} "
         "--host ...` shows how far)")


def _convert_qcow2(raw: str, target: str) -> None:
    try:
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, target],
                       check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise InvalidArgument("--format qcow2 needs qemu-img (Debian package qemu-utils)") from None
    except subprocess.CalledProcessError as exc:
        raise InvalidArgument(f"qemu-img convert failed: {exc.stderr.strip()}") from exc


@click.command("verify")
@click.argument("repo_path", metavar="REPO", type=click.Path())
@click.argument("point_id", metavar="POINT")
@click.option("--against", required=True, metavar="DISK[@SNAPSHOT]|NBD-URI",
              help="What the point was taken from: a disk directory or NAME on a host (--host), "
                   "and its snapshot; or an NBD URI (the export as it is now).")
@host_option
@nbd_tls_options
@click.option("--heal", is_flag=True, help="Write a corrected restore point if they differ.")
@json_option
def verify(repo_path: str, point_id: str, against: str, host: str | None,
           tls_certificates: str | None, tls_psk_file: str | None, tls_username: str | None,
           heal: bool, as_json: bool) -> None:
    """Compare POINT with its source chunk by chunk, without trusting the tracker."""
    from blocktrail.backup.verify import verify_point
    from blocktrail.repo import Repository
    disk_path, snapshot = against, ""
    if not is_nbd_uri(against):  # an export name may hold "@" itself
        disk_path, at, snapshot = against.partition("@")
        if at:
            check_snapshot_name(snapshot)
    with Repository.open(repo_path) as repo, \
            open_source(disk_path, host,
                        tls=tls_parameters(tls_certificates, tls_psk_file, tls_username)) as src, \
            progress_bar("verify", as_json) as progress:
        report = verify_point(repo, point_id, src, snapshot or None, heal=heal,
                              progress=progress)
    out: dict[str, Any] = {
        "point": point_id, "identical": report.identical,
        "chunks_compared": report.chunks_compared,
        "differing_areas": [list(e) for e in report.differing_areas],
        "healed_point": report.healed_point.id if report.healed_point else None,
        "damaged_areas": [list(e) for e in report.damaged_areas],
        "damaged_objects": [c.to_json() for c in report.damaged_copies],
        "restored_bytes": report.restored_bytes}
    lines = []
    if report.identical:
        lines.append(f"{point_id} equals {against} ({report.chunks_compared} chunks, every "
                     "stored chunk read)")
    if report.differing_areas:
        lines.append(f"{point_id} DIFFERS from {against} in {len(report.differing_areas)} "
                     f"areas: {[list(e) for e in report.differing_areas][:20]}"
                     + (f"; healed as {report.healed_point.id}" if report.healed_point else ""))
    if report.damaged_areas:
        lines.append(f"{point_id} is DAMAGED in the repository in "
                     f"{len(report.damaged_areas)} areas: "
                     f"{[list(e) for e in report.damaged_areas][:20]}; "
                     + ("stored again from the source: it restores again" if heal else
                        "the damaged copies are in quarantine; --heal stores them again from "
                        "the source"))
    emit(as_json, out, "\n".join(lines))
    if report.differing_areas:
        raise ExitCode(Exit.VERIFY_DIFFERENCES)
    if report.damaged_areas:
        raise ExitCode(Exit.REPOSITORY_DAMAGED)


@click.command("check")
@click.argument("repo_path", metavar="REPO", type=click.Path())
@click.option("--read-data", is_flag=True, help="Read and rehash every chunk.")
@click.option("--read-data-subset", "subset", default=None, type=PERCENT, metavar="PCT",
              help="Read and rehash the chunks of PCT percent of the packs.")
@json_option
def check(repo_path: str, read_data: bool, subset: float | None, as_json: bool) -> None:
    """Check the repository's structure (and data); name what is damaged and what it affects."""
    from blocktrail.repo import Repository
    with Repository.open(repo_path) as repo:
        report = repo.check(read_data=read_data, read_data_subset_pct=subset)
    out = {"ok": report.ok, "points": report.points, "chunks_referenced":
           report.chunks_referenced, "chunks_read": report.chunks_read,
           "unreferenced_packs": report.unreferenced_files, "temp_files": report.temp_files,
           "quarantined_before": report.quarantined_before,
           "damaged_objects": [c.to_json() for c in report.quarantined],
           "problems": [p.to_json() for p in report.problems]}
    lines = [f"{report.points} restore points, {report.chunks_referenced} chunks referenced, "
             f"{report.chunks_read} read: " + ("no problems" if report.ok else
                                               f"{len(report.problems)} PROBLEMS")]
    lines += [f"  {p.kind} {p.name}: {p.detail}; affects {', '.join(p.affected_points) or '-'}"
              for p in report.problems]
    if report.quarantined:
        lines.append(f"{len(report.quarantined)} damaged copies put in quarantine: no backup "
                     "deduplicates against them; the next backup stores their content again")
    if report.unreferenced_files or report.temp_files:
        lines.append(f"reclaimable, not damage: {report.unreferenced_files} unused packs, "
                     f"{report.temp_files} temporary files (`blocktrail forget ... --prune` "
                     "deletes them)")
    emit(as_json, out, "\n".join(lines))
    if not report.ok:
        raise ExitCode(Exit.REPOSITORY_DAMAGED)


@click.command("forget")
@click.argument("repo_path", metavar="REPO", type=click.Path())
@click.option("--keep-last", default=0, type=click.IntRange(min=0))
@click.option("--keep-daily", default=0, type=click.IntRange(min=0))
@click.option("--keep-weekly", default=0, type=click.IntRange(min=0))
@click.option("--keep-monthly", default=0, type=click.IntRange(min=0))
@click.option("--disk", "disk_id", default=None, help="Only this disk id.")
@click.option("--prune", "do_prune", is_flag=True, help="Then delete unreferenced data.")
@click.option("--dry-run", is_flag=True)
@json_option
def forget(repo_path: str, keep_last: int, keep_daily: int, keep_weekly: int,
           keep_monthly: int, disk_id: str | None, do_prune: bool, dry_run: bool,
           as_json: bool) -> None:
    """Forget restore points a retention policy does not keep (per disk)."""
    from blocktrail.repo import Repository, RetentionPolicy
    policy = RetentionPolicy(keep_last, keep_daily, keep_weekly, keep_monthly)
    if policy.empty:
        raise InvalidArgument("give at least one --keep-* option (forget keeps nothing else)")
    with Repository.open(repo_path) as repo:
        gone = repo.forget(policy, disk_id, dry_run=dry_run)
        pruned = repo.prune() if do_prune and not dry_run else None
    out = {"forgotten": [p.id for p in gone], "dry_run": dry_run,
           "prune": None if pruned is None else vars(pruned)}
    text = f"{'would forget' if dry_run else 'forgot'} {len(gone)} restore points"
    if pruned is not None:
        text += (f"; pruned {pruned.packs_deleted} packs "
                 f"({human(pruned.bytes_freed)})")
    emit(as_json, out, text)
