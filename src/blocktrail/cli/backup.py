"""`blocktrail repo init | repo info | repo key | repo repair | backup | points | restore |
verify | check | forget | prune`. A repository is a directory or ``s3://BUCKET/PREFIX`` (with
--endpoint, --region, --profile, or the AWS environment variables boto3 reads); an encrypted
one's password comes from `cli/password.py` (one function for every command)."""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import click

from blocktrail.cli.disk import json_option
from blocktrail.cli.output import PERCENT, ExitCode, emit, human, printable
from blocktrail.cli.password import (
    KDF_VARIABLE,
    init_password,
    new_password,
    password_options,
    repo_password,
    sources,
)
from blocktrail.cli.progress import progress_bar, spinner
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
    from blocktrail.passwords import PasswordSources
    from blocktrail.repo import KdfParams, Repository, S3Options, Timing
    from blocktrail.repo.prune import PruneReport

repo_option = click.option("--repo", "repo_path", required=True, envvar="BLOCKTRAIL_REPO",
                           help="Repository: a directory, or s3://BUCKET/PREFIX.")


def s3_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--endpoint, --region, --profile: where an s3:// repository is (else where boto3 looks:
    AWS_ENDPOINT_URL, AWS_REGION, AWS_PROFILE, ~/.aws); and --password-file,
    --password-command: an encrypted repository's password."""
    command = password_options(command)
    for option in reversed([
            click.option("--endpoint", default=None, metavar="URL",
                         help="S3 endpoint, e.g. http://127.0.0.1:8333 (overrides "
                              "AWS_ENDPOINT_URL)."),
            click.option("--region", default=None, help="S3 region (default: AWS_REGION, "
                                                         "else us-east-1)."),
            click.option("--profile", default=None, help="AWS profile for the credentials.")]):
        command = option(command)
    return command


def _timing() -> Timing:
    """Lease duration: BLOCKTRAIL_LEASE_SECONDS (default 300 s; short ones for tests)."""
    from blocktrail.repo.leases import timing_from_environment
    return timing_from_environment()


def _s3(location: str, endpoint: str | None, region: str | None,
        profile: str | None) -> S3Options | None:
    from blocktrail.repo import S3Options
    from blocktrail.repo.location import is_s3_url
    if not is_s3_url(location):
        if endpoint or region or profile:
            raise InvalidArgument("--endpoint, --region and --profile are for s3:// "
                                  "repositories")
        return None
    return S3Options(endpoint=endpoint, region=region, profile=profile)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def keep_freed_memory() -> None:
    """Ask glibc's malloc to keep memory that is freed for the next allocation: a backup
    allocates and frees a read buffer of up to 4 MiB, an envelope per chunk and so on at a
    high rate, and a restore a buffer for each run of chunks it reads; by default buffers of
    128 KiB and more are mapped and unmapped each time, and freed memory goes back to the
    kernel, so every reuse costs a page fault per page (half the page faults of a full
    backup, and over a quarter of its CPU time, where measured; a tenth of a restore's CPU
    time). For this one command's process; where mallopt is not there (another libc),
    nothing changes."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # the largest glibc adapts to by itself
    mallopt(_M_TRIM_THRESHOLD, 1 << 30)


def open_repo(location: str, endpoint: str | None = None, region: str | None = None,
              profile: str | None = None,
              password_sources: PasswordSources | None = None, *,
              writes: bool = True) -> Repository:
    """Open a repository for a command: its password (when it is encrypted) from the command's
    --password-file / --password-command, BLOCKTRAIL_PASSWORD, or a prompt; an unencrypted
    one says so on stderr, every time. ``writes`` False: a command that only reads (it works
    on a read-only repository and with S3 credentials that may only read)."""
    from blocktrail.repo import Repository
    repo = Repository.open(location, s3=_s3(location, endpoint, region, profile),
                           timing=_timing(),
                           password=repo_password(password_sources or sources()),
                           writes=writes)
    if not repo.encrypted:
        _say_unencrypted(location)
    return repo


@contextlib.contextmanager
def opening_repo(location: str, endpoint: str | None = None, region: str | None = None,
                 profile: str | None = None, *,
                 writes: bool = True) -> Iterator[Callable[[], Repository]]:
    """`open_repo` begun on a thread: the command imports and opens what else it needs while
    the repository's password is turned into its key (argon2id: ~0.2 s of CPU, in C without
    the GIL). Yields a function that waits for the repository. A password that must be asked
    on a terminal is asked on the command's own thread, once the thread found none."""
    import threading

    from blocktrail.passwords import find_password
    from blocktrail.repo.errors import PasswordRequired
    from blocktrail.repo.location import open_unlocked
    s3, found = _s3(location, endpoint, region, profile), sources()
    outcome: list[Repository | BaseException] = []

    def run() -> None:
        try:
            # The repository's operations are imported once the key is derived (or by the
            # command's thread meanwhile), not before.
            opened = open_unlocked(location, s3=s3, password=lambda: find_password(found),
                                   writes=writes)
            try:
                from blocktrail.repo.repository import Repository
                outcome.append(Repository.on_opened(opened, _timing()))
            except BaseException:
                opened.backend.close()
                raise
        except BaseException as exc:  # handed to the command's thread
            outcome.append(exc)

    thread = threading.Thread(target=run, name="blocktrail-open-repository", daemon=True)
    thread.start()
    taken: list[Repository] = []

    def wait() -> Repository:
        if taken:
            return taken[0]
        thread.join()
        result = outcome[0]
        if isinstance(result, PasswordRequired):
            result = open_repo(location, endpoint, region, profile, found,  # may ask
                               writes=writes)
        elif isinstance(result, BaseException):
            raise result
        elif not result.encrypted:
            _say_unencrypted(location)
        taken.append(result)
        return result

    try:
        yield wait
    finally:
        thread.join()
        if not taken and outcome and not isinstance(outcome[0], BaseException):
            outcome[0].close()  # the command failed before it used the repository


def _say_unencrypted(location: str) -> None:
    click.echo(f"note: repository {location} is not encrypted (created with --encryption "
               "none)", err=True)


def _kdf(text: str | None) -> KdfParams:
    """--kdf, else BLOCKTRAIL_KDF, else the default argon2id parameters."""
    from blocktrail.repo import KdfParams
    return _kdf_given(text) or KdfParams()


def _kdf_given(text: str | None) -> KdfParams | None:
    """--kdf, else BLOCKTRAIL_KDF; None when neither is given (`repo key add|passwd` then
    use the parameters of the key file the repository was opened with)."""
    from blocktrail.repo import KdfParams
    value = text or os.environ.get(KDF_VARIABLE)
    return KdfParams.parse(value) if value else None


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


kdf_option = click.option(
    "--kdf", "kdf", default=None, metavar="t=N,m=KIB,p=N",
    help="argon2id parameters of the new key file (else BLOCKTRAIL_KDF; else t=3,m=65536,p=4 "
         "for `repo init`, about 0.15 s and 64 MiB to open, and for `repo key add|passwd` "
         "those of the key file the repository is opened with).")


@repo_group.command("init")
@click.argument("path", metavar="REPO")
@s3_options
@click.option("--encryption", type=click.Choice(["auto", "aes-256-gcm", "chacha20-poly1305",
                                                 "none"]), default="auto", show_default=True,
              help="auto: AES-256-GCM where the CPU has AES instructions, else "
                   "ChaCha20-Poly1305. none: anyone who can read the storage reads the disks "
                   "(recorded, and said by every command).")
@kdf_option
@json_option
def repo_init(path: str, endpoint: str | None, region: str | None, profile: str | None,
              encryption: str, kdf: str | None, as_json: bool) -> None:
    """Create an empty repository: in the directory REPO, or at s3://BUCKET/PREFIX (the bucket
    is created if it does not exist). Encrypted unless --encryption none: the password comes
    from --password-file, --password-command, BLOCKTRAIL_PASSWORD, or is asked for twice."""
    from blocktrail.repo import Encryption, Repository
    from blocktrail.repo.errors import PasswordRequired
    if encryption == "none":
        spec = Encryption.none()
    else:
        password = init_password(sources())
        if password is None:
            raise PasswordRequired("a new repository is encrypted: give its password "
                                   "(BLOCKTRAIL_PASSWORD, --password-file FILE, "
                                   "--password-command CMD, or on a terminal), or choose "
                                   "--encryption none")
        spec = Encryption(password, encryption, _kdf(kdf))
    with Repository.init(path, encryption=spec, s3=_s3(path, endpoint, region, profile),
                         timing=_timing()) as repo:
        info = {"path": path, "repo_id": repo.repo_id, "chunk_size": repo.chunk_size,
                **repo.encryption_info()}
    what = (f"encrypted with {repo.codec.cipher_name}, key {repo.key_id}, "
            f"{spec.kdf.describe()}" if repo.encrypted else "NOT encrypted")
    emit(as_json, info, f"repository {path} created (chunks of {human(repo.chunk_size)}; "
         f"{what})")


@repo_group.command("info")
@click.argument("path", metavar="REPO")
@s3_options
@json_option
def repo_info(path: str, endpoint: str | None, region: str | None, profile: str | None,
              as_json: bool) -> None:
    """The repository's identity, format, encryption, KDF parameters and key files."""
    with open_repo(path, endpoint, region, profile, writes=False) as repo:
        info = {"path": path, "repo_id": repo.repo_id, "version": repo.config.get("version"),
                "chunk_size": repo.chunk_size, "page_chunks": repo.page_chunks,
                **repo.encryption_info()}
    lines = [f"repository {path}", f"  id          {repo.repo_id}",
             f"  version     {info['version']}", f"  chunk size  {human(repo.chunk_size)}"]
    if info["encryption"] == "none":
        lines.append("  encryption  none (anyone who can read the storage reads the disks)")
    else:
        lines += [f"  encryption  {info['encryption']}, chunk IDs keyed blake3, "
                  "every object authenticated"]
        for key in info["key_files"]:
            kdf = key["kdf"]
            mark = "  (opened with this one)" if key["id"] == info["key_in_use"] else ""
            lines.append(f"  key {key['id']}  {kdf['algorithm']} t={kdf['time_cost']} "
                         f"m={kdf['memory_kib']} KiB p={kdf['parallelism']}  created "
                         f"{key['created_at']} on {key['host']}{mark}")
    emit(as_json, info, "\n".join(lines))


@repo_group.group("key")
def key_group() -> None:
    """The key files of an encrypted repository: each opens it with its own password."""


@key_group.command("list")
@click.argument("path", metavar="REPO")
@s3_options
@json_option
def key_list(path: str, endpoint: str | None, region: str | None, profile: str | None,
             as_json: bool) -> None:
    """List the key files."""
    with open_repo(path, endpoint, region, profile, writes=False) as repo:
        found = [k.describe() | {"in_use": k.id == repo.key_id} for k in repo.key_files()]
    emit(as_json, found, "\n".join(
        f"{'*' if k['in_use'] else ' '} {k['id']}  {k['created_at']}  {k['host']}"
        for k in found) or "(no key files: the repository is not encrypted)")


new_password_option = click.option(
    "--new-password-file", "new_password_file", default=None, metavar="FILE",
    help="The new password, from FILE (else BLOCKTRAIL_NEW_PASSWORD, or asked twice).")


def _new_password(repo: Repository) -> bytes:
    from blocktrail.repo.errors import PasswordRequired
    if not repo.encrypted:
        raise InvalidArgument(f"repository {repo.location} is not encrypted: it has no keys")
    ctx = click.get_current_context()
    password = new_password(ctx.params.get("new_password_file"))
    if password is None:
        raise PasswordRequired("give the new password: --new-password-file FILE, "
                               "BLOCKTRAIL_NEW_PASSWORD, or on a terminal")
    return password


@key_group.command("add")
@click.argument("path", metavar="REPO")
@s3_options
@new_password_option
@kdf_option
@json_option
def key_add(path: str, endpoint: str | None, region: str | None, profile: str | None,
            new_password_file: str | None, kdf: str | None, as_json: bool) -> None:
    """Add a key file: the repository opens with a new password too."""
    with open_repo(path, endpoint, region, profile) as repo:
        key = repo.add_key(_new_password(repo), _kdf_given(kdf))
    emit(as_json, key.describe(), f"key {key.id} added")


@key_group.command("remove")
@click.argument("path", metavar="REPO")
@click.argument("key_id", metavar="KEY")
@s3_options
@json_option
def key_remove(path: str, key_id: str, endpoint: str | None, region: str | None,
               profile: str | None, as_json: bool) -> None:
    """Remove key file KEY (never the last one, nor the one this opens the repository with)."""
    with open_repo(path, endpoint, region, profile) as repo:
        repo.remove_key(key_id)
    emit(as_json, {"removed": key_id}, f"key {key_id} removed")


@key_group.command("passwd")
@click.argument("path", metavar="REPO")
@s3_options
@new_password_option
@kdf_option
@json_option
def key_passwd(path: str, endpoint: str | None, region: str | None, profile: str | None,
               new_password_file: str | None, kdf: str | None, as_json: bool) -> None:
    """Change the password of the key file this opens with: a new key file wraps the same
    keys, then the old one is deleted (nothing is re-encrypted)."""
    with open_repo(path, endpoint, region, profile) as repo:
        old = repo.key_id
        key = repo.change_password(_new_password(repo), _kdf_given(kdf))
    emit(as_json, key.describe() | {"replaced": old},
         f"password changed: key {key.id} replaces {old}")


@repo_group.command("repair")
@click.argument("path", metavar="REPO")
@s3_options
@json_option
def repo_repair(path: str, endpoint: str | None, region: str | None, profile: str | None,
                as_json: bool) -> None:
    """Read every pack, put damaged copies in quarantine, rebuild the index from the intact
    objects, delete stray temporary files, and name every restore point that cannot be fully
    restored (exit 12). Runs only while no backup does (exit 7 otherwise)."""
    with open_repo(path, endpoint, region, profile) as repo, spinner("repair", as_json):
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
    lines += [f"  pack {p} was gone when it was to be read" for p in report.packs_gone]
    if report.ok:
        lines.append(f"all {report.points} restore points can be restored")
    else:
        lines.append(f"{len(report.unrestorable)} of {report.points} restore points CANNOT be "
                     "fully restored:")
        for point in report.unrestorable:
            shown = "; ".join(point.missing[:5])
            more = f" (and {len(point.missing) - 5} more)" if len(point.missing) > 5 else ""
            lines.append(f"  {point.point_id}: lacks {shown}{more}")
        from blocktrail.repo.repair import ADVICE
        lines.append(ADVICE)
    emit(as_json, report.to_json(), "\n".join(lines))
    if not report.ok:
        raise ExitCode(Exit.REPOSITORY_DAMAGED)


@click.command("backup")
@click.argument("disk_path", metavar="DISK")
@repo_option
@s3_options
@host_option
@nbd_tls_options
@click.option("--bitmap", default=None, metavar="NAME",
              help="NBD URIs: a QEMU dirty bitmap the export offers (qemu:dirty-bitmap:NAME) "
                   "that has recorded every write since the previous backup of this disk.")
@click.option("--disk-id", "disk_id", default=None, metavar="ID",
              help="NBD URIs: the disk's identity in the repository (default: the URI).")
@click.option("--snapshot", default=None, metavar="NAME",
              help="Back up this existing snapshot of the disk as it is (a VM snapshot, say: "
                   "every disk of the VM at one instant), and keep it. Default: take a snapshot "
                   "and remove it afterwards.")
@click.option("--full", is_flag=True, help="Read everything, whatever the tracker says.")
@click.option("--audit-sample", "audit_pct", default=1.0, show_default=True, type=PERCENT,
              help="Percent of unchanged chunks re-read and compared (at least 16).")
@json_option
def backup(disk_path: str, repo_path: str, endpoint: str | None, region: str | None,
           profile: str | None, host: str | None, tls_certificates: str | None,
           tls_psk_file: str | None, tls_username: str | None, bitmap: str | None,
           disk_id: str | None, snapshot: str | None, full: bool, audit_pct: float,
           as_json: bool) -> None:
    """Back up DISK: a disk directory, NAME on a host (--host), or an NBD URI
    (nbd+unix:///EXPORT?socket=PATH, nbd://HOST[:PORT]/EXPORT). Incremental when the changes
    since the last restore point can be trusted; otherwise full, and the output says why.
    Any number of backups of different disks may run into one repository at once; a second
    backup of the same disk is refused (exit 7) while the first holds the disk's lease."""
    keep_freed_memory()
    if snapshot is not None:
        if is_nbd_uri(disk_path):
            raise InvalidArgument("--snapshot is for a disk directory or a host's disk; an NBD "
                                  "URI names its export (a host's snapshot: NAME@SNAPSHOT)")
        check_snapshot_name(snapshot)
    tls = tls_parameters(tls_certificates, tls_psk_file, tls_username)
    # The engine is imported and the disk opened while the repository's key is derived.
    with opening_repo(repo_path, endpoint, region, profile) as repository:
        from blocktrail.backup.engine import BackupOptions, run_backup
        with open_source(disk_path, host, bitmap=bitmap, disk_id=disk_id, tls=tls) as src, \
                repository() as repo, \
                progress_bar("backup", as_json, unit_bytes=repo.chunk_size) as progress:
            report = run_backup(src, repo, BackupOptions(force_full=full,
                                                         audit_percent=audit_pct,
                                                         snapshot=snapshot), progress)
    audit = report.audit
    out = {"point": report.point.summary(), "kind": report.kind,
           "fallback_reason": report.fallback_reason, "chunks_read": report.chunks_read,
           "bytes_read": report.bytes_read, "bytes_stored": report.point.stats["bytes_stored"],
           "seconds": round(report.seconds, 3), "passed_over": list(report.passed_over),
           "chunks_read_again": report.chunks_read_again,
           "audit": {"sampled_chunks": audit.sampled_chunks,
                     "stored_copies_checked": audit.stored_copies_checked, "tracker_trusted":
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
                        "missed changes; stored the right data; the next backup is full")
                     + f"; {audit.stored_copies_checked} stored copies checked")
    if audit.damaged_areas:
        lines.append(f"audit: the stored copies of {[list(e) for e in audit.damaged_areas]} "
                     "were DAMAGED in the repository: put in quarantine and stored again from "
                     "the disk (run `blocktrail check --read-data`)")
    emit(as_json, out, "\n".join(lines))


@click.command("points")
@click.argument("repo_path", metavar="REPO")
@s3_options
@click.option("--disk", "disk_id", default=None, help="Only this disk id.")
@host_option
@json_option
def points(repo_path: str, endpoint: str | None, region: str | None, profile: str | None,
           disk_id: str | None, host: str | None, as_json: bool) -> None:
    """List restore points, oldest first (with --host, the host's disk names too)."""
    with opening_repo(repo_path, endpoint, region, profile, writes=False) as repository:
        from blocktrail.cli.tables import points_table  # while the key is derived
        with repository() as repo:
            intact, damaged = repo.scan_points()
    mine = [p for p in intact if disk_id is None or p.disk_id == disk_id]
    found = [p.summary() for p in mine]
    if as_json:
        emit(as_json, found, "")
    else:
        rows = [{**p.summary(), "bytes_stored": p.stats.get("bytes_stored")} for p in mine]
        emit(as_json, found, points_table(rows, _disk_names(host) if host and mine else {}))
    for name, message in damaged:  # never left out silently
        click.echo(f"warning: points/{name} is not listed: {message}", err=True)


def _disk_names(host: str) -> dict[str, str]:
    """disk ID -> name on the host; a host that cannot be asked leaves the IDs as they are."""
    from blocktrail.cli.target import call, with_host
    from blocktrail.errors import BlocktrailError
    try:
        disks = with_host(host, call("GET", "disks"))
    except BlocktrailError as exc:
        click.echo(f"warning: disk names not shown: {exc.message}", err=True)
        return {}
    return {str(d["disk_id"]): str(d["name"]) for d in disks if "disk_id" in d}


@click.command("restore")
@click.argument("repo_path", metavar="REPO")
@click.argument("point_id", metavar="POINT")
@s3_options
@click.option("--to", "target", default=None, type=click.Path(dir_okay=False),
              help="The file to write: a new one, or one replaced whole, whose permissions "
                   "and owner the image takes (a symbolic link is written through); or a "
                   "block device (raw only) of at least the point's size, written in place. "
                   "Not with --instant.")
@click.option("--format", "fmt", type=click.Choice(["raw", "qcow2"]), default=None,
              help="Of the file --to: raw (the default) or qcow2 (a name ending in .qcow2 "
                   "needs it said).")
@click.option("--instant", is_flag=True,
              help="Create the disk --disk on the host --host whose content is POINT at once "
                   "(readable and bootable over NBD now, its writes tracked; the rest is copied "
                   "in the background; REPO is a path on the host, or s3://BUCKET/PREFIX "
                   "reached with the host's own S3 settings).")
@host_option
@click.option("--disk", "disk_name", default=None, metavar="NAME",
              help="--instant: the new disk's name on the host.")
@click.option("--fill-rate", "fill_rate", default=None, metavar="RATE",
              help="--instant: copy at most RATE per second in the background, e.g. 50M.")
@json_option
def restore(repo_path: str, point_id: str, endpoint: str | None, region: str | None,
            profile: str | None, target: str | None, fmt: str | None, instant: bool,
            host: str | None, disk_name: str | None, fill_rate: str | None,
            as_json: bool) -> None:
    """Write restore point POINT to the file or block device --to (every chunk's hash is
    checked), or, with --instant, restore it into a new disk on a host that is usable at
    once."""
    if instant:
        if endpoint or region or profile:
            raise InvalidArgument("--instant: the host reaches an s3:// repository with its own "
                                  "S3 settings (AWS_ENDPOINT_URL, AWS_REGION, AWS_PROFILE in "
                                  "its environment); leave out --endpoint, --region, --profile")
        if sources().file or sources().command:
            raise InvalidArgument("--instant: the host opens the repository with its own "
                                  "password (`blocktrail host --password-file FILE`, or "
                                  "BLOCKTRAIL_PASSWORD in its environment); leave out "
                                  "--password-file and --password-command")
        _restore_instantly(repo_path, point_id, target, fmt, host, disk_name, fill_rate,
                           as_json)
        return
    if target is None:
        raise InvalidArgument("give --to FILE (or --instant --host API --disk NAME)")
    if disk_name is not None or fill_rate is not None:
        raise InvalidArgument("--disk and --fill-rate go with --instant")
    if fmt is None and target.lower().endswith(".qcow2"):  # raw bytes under that name: a
        raise InvalidArgument(f"--to {target}: its name says qcow2; give --format qcow2 for "
                              "a qcow2 image, or --format raw for a raw one of that name")
    fmt = fmt or "raw"
    keep_freed_memory()  # each run of chunks is read into a buffer of a few MiB, then freed
    with open_repo(repo_path, endpoint, region, profile, writes=False) as repo, \
            progress_bar("restore", as_json, unit_bytes=repo.chunk_size) as progress:
        if fmt == "raw":
            written = repo.restore(point_id, target, progress)
        else:
            from blocktrail.cli.qcow2 import restore_qcow2
            written = restore_qcow2(repo, point_id, target, progress)
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
         f"(NBD export {disk_name}), {_restored_tracking(info)}; "
         f"{info['restore']['summary']} in the background (`blocktrail disk info {disk_name} "
         "--host ...` shows how far)")


def _restored_tracking(info: dict[str, Any]) -> str:
    """How an instantly restored disk's writes are tracked, as the host's answer says."""
    if "continues" not in info:  # a host of an earlier version does not say
        return "its writes tracked from the first one"
    if info["continues"]:
        return "its writes tracked against the point (its next backup is an incremental)"
    if info.get("fresh_disk_id"):
        return (f"with a disk ID of its own ({info['disk_id']}: the host has a disk of the "
                "point's disk ID already) and new change tracking: its first backup is full")
    return ("with new change tracking (the point has no change ID of a blocktrail disk): its "
            "first backup is full")


@click.command("verify")
@click.argument("repo_path", metavar="REPO")
@click.argument("point_id", metavar="POINT")
@s3_options
@click.option("--against", required=True, metavar="DISK[@SNAPSHOT]|NBD-URI",
              help="What the point was taken from: a disk directory or NAME on a host (--host), "
                   "and its snapshot; or an NBD URI (the export as it is now).")
@host_option
@nbd_tls_options
@click.option("--bitmap", default=None, metavar="NAME",
              help="NBD URIs: the dirty bitmap the point was backed up with (--heal writes a "
                   "corrected point only against the point's own state).")
@click.option("--disk-id", "disk_id", default=None, metavar="ID",
              help="NBD URIs: the disk's identity in the repository, as given to its backup "
                   "(default: the URI). A point is verified only against its own disk.")
@click.option("--heal", is_flag=True,
              help="Store lost chunks again; write a corrected restore point if they differ "
                   "and the source is the point's own snapshot.")
@json_option
def verify(repo_path: str, point_id: str, endpoint: str | None, region: str | None,
           profile: str | None, against: str, host: str | None,
           tls_certificates: str | None, tls_psk_file: str | None, tls_username: str | None,
           bitmap: str | None, disk_id: str | None, heal: bool, as_json: bool) -> None:
    """Compare POINT with its source chunk by chunk, without trusting the tracker."""
    from blocktrail.backup.verify import verify_point
    disk_path, snapshot = against, ""
    if not is_nbd_uri(against):  # an export name may hold "@" itself
        disk_path, at, snapshot = against.partition("@")
        if at:
            check_snapshot_name(snapshot)
    with open_repo(repo_path, endpoint, region, profile, writes=heal) as repo, \
            open_source(disk_path, host, bitmap=bitmap, disk_id=disk_id,
                        tls=tls_parameters(tls_certificates, tls_psk_file, tls_username)) as src, \
            progress_bar("verify", as_json, unit_bytes=repo.chunk_size) as progress:
        report = verify_point(repo, point_id, src, snapshot or None, heal=heal,
                              progress=progress)
    out: dict[str, Any] = {
        "point": point_id, "identical": report.identical,
        "chunks_compared": report.chunks_compared,
        "differing_areas": [list(e) for e in report.differing_areas],
        "healed_point": report.healed_point.id if report.healed_point else None,
        "damaged_areas": [list(e) for e in report.damaged_areas],
        "damaged_objects": [c.to_json() for c in report.damaged_copies],
        "restored_bytes": report.restored_bytes,
        "recorded": report.not_recorded is None, "not_recorded": report.not_recorded,
        "not_healed": report.not_healed}
    if report.not_recorded is not None:
        click.echo(printable(f"warning: the verify state of {point_id} was not recorded: "
                             f"{report.not_recorded}"), err=True)
    lines = []
    if report.identical:
        lines.append(f"{point_id} equals {against} ({report.chunks_compared} chunks, every "
                     "stored chunk read)")
    if report.differing_areas:
        lines.append(f"{point_id} DIFFERS from {against} in {len(report.differing_areas)} "
                     f"areas: {[list(e) for e in report.differing_areas][:20]}"
                     + (f"; healed as {report.healed_point.id}" if report.healed_point else "")
                     + (f"; NOT HEALED: {report.not_healed}" if report.not_healed else ""))
    if report.damaged_areas:
        lines.append(f"{point_id} is DAMAGED in the repository in "
                     f"{len(report.damaged_areas)} areas: "
                     f"{[list(e) for e in report.damaged_areas][:20]}; "
                     + ("stored again from the source: it restores again" if heal else
                        "the damaged copies are in quarantine; --heal stores them again from "
                        "the source" if all(copy.not_recorded is None
                                            for copy in report.damaged_copies) else
                        "the damaged copies could not be put in quarantine (their records "
                        "could not be written)"))
    emit(as_json, out, "\n".join(lines))
    if report.differing_areas:
        raise ExitCode(Exit.VERIFY_DIFFERENCES)
    if report.damaged_areas:
        raise ExitCode(Exit.REPOSITORY_DAMAGED)


@click.command("check")
@click.argument("repo_path", metavar="REPO")
@s3_options
@click.option("--read-data", is_flag=True, help="Read and rehash every chunk.")
@click.option("--read-data-subset", "subset", default=None, type=PERCENT, metavar="PCT",
              help="Read and rehash the chunks of PCT percent of the packs.")
@json_option
def check(repo_path: str, endpoint: str | None, region: str | None, profile: str | None,
          read_data: bool, subset: float | None, as_json: bool) -> None:
    """Check the repository's structure (and data); name what is damaged and what it affects."""
    with open_repo(repo_path, endpoint, region, profile,
                   writes=False) as repo, spinner("check", as_json):
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
    recorded = [copy for copy in report.quarantined if copy.not_recorded is None]
    if recorded:
        lines.append(f"{len(recorded)} damaged copies put in quarantine: no backup "
                     "deduplicates against them; the next backup stores their content again")
    if len(recorded) < len(report.quarantined):
        lines.append(f"{len(report.quarantined) - len(recorded)} damaged copies NOT put in "
                     "quarantine (their records could not be written): check the repository "
                     "again where it can be written")
    if report.unreferenced_files or report.temp_files:
        lines.append(f"reclaimable, not damage: {report.unreferenced_files} unused packs, "
                     f"{report.temp_files} temporary files (`blocktrail forget ... --prune` "
                     "deletes them)")
    emit(as_json, out, "\n".join(lines))
    if report.authentication_failures:
        raise ExitCode(Exit.AUTHENTICATION_FAILED)
    if not report.ok:
        raise ExitCode(Exit.REPOSITORY_DAMAGED)


wait_option = click.option("--wait", "wait_s", default=0.0, show_default=True,
                           type=click.FloatRange(min=0), metavar="SECONDS",
                           help="How long to wait for the backups running now to finish, so "
                                "that what they might still use can be deleted too (else a "
                                "later prune deletes it).")


def _prune_text(pruned: PruneReport) -> str:
    text = f"pruned {pruned.packs_deleted} packs ({human(pruned.bytes_freed)})"
    if pruned.packs_waiting:
        text += (f"; {pruned.packs_waiting} unused packs will be deleted by a later prune, once "
                 f"these backups have finished: {'; '.join(pruned.waiting_for)}")
    if pruned.damaged_copies:
        text += (f"; {len(pruned.damaged_copies)} damaged copies found (an intact copy of "
                 f"each is kept, else all): {'; '.join(pruned.damaged_copies[:5])}")
    return text


@click.command("prune")
@click.argument("repo_path", metavar="REPO")
@s3_options
@wait_option
@json_option
def prune(repo_path: str, endpoint: str | None, region: str | None, profile: str | None,
          wait_s: float, as_json: bool) -> None:
    """Delete what no restore point needs (garbage collection). Backups go on meanwhile; what
    a running backup might still use is deleted by a later prune, after it finished."""
    with open_repo(repo_path, endpoint, region, profile) as repo, spinner("prune", as_json):
        pruned = repo.prune(wait_s)
    emit(as_json, vars(pruned), _prune_text(pruned))


@click.command("forget")
@click.argument("repo_path", metavar="REPO")
@s3_options
@click.option("--keep-last", default=0, type=click.IntRange(min=0))
@click.option("--keep-daily", default=0, type=click.IntRange(min=0))
@click.option("--keep-weekly", default=0, type=click.IntRange(min=0))
@click.option("--keep-monthly", default=0, type=click.IntRange(min=0))
@click.option("--disk", "disk_id", default=None, help="Only this disk id.")
@click.option("--prune", "do_prune", is_flag=True, help="Then delete unreferenced data.")
@wait_option
@click.option("--dry-run", is_flag=True)
@json_option
def forget(repo_path: str, endpoint: str | None, region: str | None, profile: str | None,
           keep_last: int, keep_daily: int, keep_weekly: int, keep_monthly: int,
           disk_id: str | None, do_prune: bool, wait_s: float, dry_run: bool,
           as_json: bool) -> None:
    """Forget restore points a retention policy does not keep (per disk). A point a running
    backup builds on is kept until a later forget; so is one that failed verification (or
    caught the change tracker missing changes) while a point kept builds on it."""
    from blocktrail.repo import RetentionPolicy
    policy = RetentionPolicy(keep_last, keep_daily, keep_weekly, keep_monthly)
    if policy.empty:
        raise InvalidArgument("give at least one --keep-* option (forget keeps nothing else)")
    with open_repo(repo_path, endpoint, region, profile) as repo:
        result = repo.forget_points(policy, disk_id, dry_run=dry_run)
        with spinner("prune", as_json):
            pruned = repo.prune(wait_s) if do_prune and not dry_run else None
    gone = result.forgotten
    out = {"forgotten": [p.id for p in gone], "dry_run": dry_run,
           "kept_as_base": [p.id for p in result.kept_as_base],
           "kept_for_taint": [p.id for p in result.kept_for_taint],
           "prune": None if pruned is None else vars(pruned)}
    text = f"{'would forget' if dry_run else 'forgot'} {len(gone)} restore points"
    if result.kept_as_base:
        text += (f" (kept {', '.join(p.id for p in result.kept_as_base)}: a running backup "
                 "builds on it)")
    if result.kept_for_taint:
        text += (f" (kept {', '.join(p.id for p in result.kept_for_taint)}: a point kept "
                 "builds on a restore point that failed verification, caught the change "
                 "tracker missing changes or records a dirty bitmap the NBD server refused; "
                 "they go once no point kept does)")
    if pruned is not None:
        text += "; " + _prune_text(pruned)
    emit(as_json, out, text)
