"""The repository: what callers use. Opening and creating one on its backend (a local directory
or S3), and the operations built on the store (repo/store.py): writing a restore point
(writer.py), storing lost chunks again, recording a verify state, restore (restore.py), check,
repair, forget and prune (each in its own module).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from blocktrail.errors import InvalidArgument, NoSpace, is_no_space
from blocktrail.fileio import FileHandle, FileIO, is_zeros
from blocktrail.repo import crypto, keys, layout
from blocktrail.repo.backend import (
    Backend,
    BackendDenied,
    BackendError,
    BackendReadOnly,
    ObjectNotFound,
)
from blocktrail.repo.check import CheckReport, check_repository
from blocktrail.repo.errors import (
    PasswordRequired,
    RepositoryExists,
    RepositoryNoSpace,
)
from blocktrail.repo.forget import ForgetResult, forget_points
from blocktrail.repo.keys import Encryption, KeyFile, PasswordSource, Unlocked
from blocktrail.repo.leases import DEFAULT_TIMING, Lease, Timing
from blocktrail.repo.localdir import HOST_LOCK_NAME, LOCK_NAME, LocalBackend
from blocktrail.repo.location import OpenedStore, open_backend, open_unlocked
from blocktrail.repo.manifest import RestorePoint
from blocktrail.repo.objects import KIND_CHUNK, Buffer, EncryptedCodec, PlainCodec
from blocktrail.repo.prune import PruneReport, prune_repository
from blocktrail.repo.repair import RepairReport, repair_repository
from blocktrail.repo.restore import restore_into, restore_point, restore_target
from blocktrail.repo.retention import RetentionPolicy
from blocktrail.repo.s3options import S3Options
from blocktrail.repo.sink import PackSink
from blocktrail.repo.store import Store
from blocktrail.repo.writer import PointWriter, check_parent

log = logging.getLogger("blocktrail.restore")
Progress = Callable[[int, int], None]
LOCAL_DIRECTORIES = ("packs", "index", "points", "locks", "quarantine", "verify", "leases",
                     "gc", "keys")
# What a directory may hold that a repository is made in: what an init cut short left, and what
# a new file system holds
_INIT_OVER = frozenset((*LOCAL_DIRECTORIES, layout.CONFIG + ".tmp", "lost+found"))


class Repository(Store):
    """A repository of restore points. Safe for any number of concurrent writers (processes
    or threads, on one machine or many); `prune` runs beside them (docs/storage.md)."""

    def __init__(self, backend: Backend, config: dict[str, Any], timing: Timing,
                 unlocked: Unlocked) -> None:
        super().__init__(backend, config, timing, unlocked.codec, unlocked.key_id)
        self._master = unlocked.keys

    @classmethod
    def init(cls, location: str | os.PathLike[str], fileio: FileIO | None = None, *,
             encryption: Encryption, s3: S3Options | None = None,
             timing: Timing = DEFAULT_TIMING) -> Repository:
        """Create an empty repository: a directory, or ``s3://BUCKET/PREFIX`` (the bucket is
        created if it does not exist). ``encryption``: `Encryption(password)`, or
        `Encryption.none()` (an explicit choice, recorded in its config)."""
        if encryption.enabled:
            if encryption.password is None:
                raise PasswordRequired("a new repository is encrypted: give it a password (or "
                                       "choose no encryption explicitly)")
            crypto.choose_cipher(encryption.cipher)  # a bad name: refused before anything
        backend = open_backend(location, fileio=fileio, s3=s3)
        try:
            if isinstance(backend, LocalBackend):
                config, unlocked = _init_local(backend, encryption)
            else:
                if backend.remote:
                    from blocktrail.repo.s3 import S3Backend
                    if isinstance(backend, S3Backend):
                        backend.create_bucket()
                Store.probe_conditional_writes(backend)
                config, unlocked = _create(backend, encryption,
                                           _refuse_data_without_config(backend))
        except BaseException:
            backend.close()
            raise
        return cls(backend, config, timing, unlocked)

    @classmethod
    def open(cls, location: str | os.PathLike[str], fileio: FileIO | None = None, *,
             password: PasswordSource | None = None, s3: S3Options | None = None,
             timing: Timing = DEFAULT_TIMING, writes: bool = True) -> Repository:
        """Open a repository; on object storage, first make sure the store refuses to
        overwrite objects (a probe object written twice; ``writes`` False: a command that only
        reads, which credentials that may only read can open, `open_unlocked`). An encrypted
        one needs ``password`` (a callable is called only then): `WrongPassword` if no key
        file opens with it."""
        return cls.on_opened(open_unlocked(location, fileio=fileio, password=password, s3=s3,
                                           writes=writes), timing)

    @classmethod
    def on_opened(cls, opened: OpenedStore, timing: Timing = DEFAULT_TIMING) -> Repository:
        """The repository on what `open_unlocked` opened."""
        return cls(opened.backend, opened.config, timing, opened.unlocked)

    @classmethod
    def on(cls, backend: Backend, timing: Timing = DEFAULT_TIMING,
           password: PasswordSource | None = None) -> Repository:
        """The repository on an open backend (tests wrap backends to inject faults)."""
        config = Store.load_config(backend)
        return cls(backend, config, timing, keys.unlock(backend, config, password))

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ encryption and keys

    @property
    def encrypted(self) -> bool:
        return self.codec.encrypted

    def key_files(self) -> list[KeyFile]:
        return keys.key_files(self.backend)

    def _master_keys(self) -> crypto.MasterKeys:
        if self._master is None:
            raise InvalidArgument(f"repository {self.location} is not encrypted: it has no keys")
        return self._master

    def add_key(self, password: PasswordSource, kdf: crypto.KdfParams | None = None) -> KeyFile:
        """A new key file: the repository opens with ``password`` too (`PasswordInUse` if it
        already does)."""
        master, secret = self._master_keys(), _new_password(password)
        with self._keys_lease("add a key file"):
            existing = keys.key_files(self.backend)
            return keys.add_key(self.backend, self.repo_id, master, secret,
                                kdf or self._kdf_in_use(existing), existing)

    def remove_key(self, key_id: str) -> None:
        """Delete a key file (never the one this opened with, nor the last)."""
        self._master_keys()
        with self._keys_lease(f"remove key {key_id}"):
            keys.remove_key(self.backend, key_id, self.key_id)

    def change_password(self, password: PasswordSource,
                        kdf: crypto.KdfParams | None = None) -> KeyFile:
        """Re-wrap the master keys of the key file this opened with under ``password``: the
        new key file is written, then the old one deleted. Nothing is re-encrypted."""
        master = self._master_keys()
        if self.key_id is None:
            raise InvalidArgument("no key file is in use")
        secret = _new_password(password)
        with self._keys_lease("change the password"):
            new = keys.change_password(
                self.backend, self.repo_id, master, self.key_id, secret,
                kdf or self._kdf_in_use(keys.key_files(self.backend)))
        self.key_id = new.id
        return new

    def _keys_lease(self, what: str) -> Lease:
        """Key files change one command at a time: two removals that each list the other's key
        as removable would otherwise remove both."""
        return self._lease(layout.KEYS_LEASE, "keys", None, what)

    def _kdf_in_use(self, found: Iterable[KeyFile]) -> crypto.KdfParams:
        for key in found:
            if key.id == self.key_id:
                return key.kdf
        return crypto.KdfParams()

    def encryption_info(self) -> dict[str, Any]:
        """What `repo info` shows."""
        if not self.encrypted:
            return {"encryption": "none"}
        return {"encryption": self.codec.cipher_name, "chunk_ids": "blake3-keyed",
                "kdf": "argon2id", "key_in_use": self.key_id,
                "key_files": [k.describe() for k in self.key_files()]}

    # ------------------------------------------------------------------ local paths

    @property
    def path(self) -> str:
        return self.location

    def pack_path(self, pack_id: str) -> str:
        """The file of a pack (a local repository only)."""
        if not isinstance(self.backend, LocalBackend):
            raise TypeError(f"{self.location} is not a local directory")
        return self.backend.path(layout.pack(pack_id))

    # ------------------------------------------------------------------ writing

    def begin(self, disk_id: str, size_bytes: int, parent: str | None,
              lease: Lease | None = None, *, reload: bool = True) -> PointWriter:
        """Start a restore point of ``disk_id`` (an incremental when ``parent`` is given),
        under the disk's lease: the caller's, or one taken here (`RepositoryBusy` while another
        process backs the disk up) and released when the writer closes. ``reload``: read the
        index again (False: the caller just did, after taking the lease)."""
        own = lease is None
        held = lease if lease is not None else self.disk_lease(disk_id)
        try:
            if reload:  # a prune may have run since it was read: dedup against the truth
                self.reload_index()
            parent_point = self.point(parent) if parent else None
            check_parent(self, disk_id, size_bytes, parent_point)
        except BaseException:
            if own:
                held.release()
            raise
        return PointWriter(self, disk_id, size_bytes, parent_point, held, self.seal_pool,
                           release_lease=own)

    def store_chunks(self, chunks: Iterable[Buffer]) -> int:
        """Store chunks again whose stored copies were lost (damaged, in quarantine): a pack
        and an index file, no restore point. -> bytes stored."""
        with self.writer_lease("store chunks again") as lease:
            self.reload_index()
            sink = PackSink(self, self.has_chunk, consequence="nothing was stored again",
                            lease=lease)
            try:
                for data in chunks:
                    if not is_zeros(data):
                        name, envelope = self.codec.seal(KIND_CHUNK, data)
                        sink.add(name, envelope, len(data))
                sink.publish()
            finally:
                sink.close()
            return sink.bytes_stored

    def set_verify_state(self, point_id: str, state: str) -> RestorePoint:
        """Record a verify state (a new verify record; the manifest is never rewritten)."""
        point = self.point(point_id)
        self.record_verify(point.id, state)
        return point.with_verify_state(state)

    # ------------------------------------------------------------------ restore

    def restore(self, point_id: str, target: str, progress: Progress | None = None,
                fileio: FileIO | None = None) -> int:
        """Write the point's disk image to ``target`` (sparse). Every chunk is checked; on
        any damage nothing is left at ``target``. A block device is written in place. A target
        that is neither is refused before anything is read. -> bytes of data written."""
        target = restore_target(target, fileio, devices=True)
        with self.reading(point_id) as point:
            return restore_point(self, point, target, progress, fileio)

    def restore_into(self, point_id: str, handle: FileHandle,
                     progress: Progress | None = None, *, cached: bool = False) -> int:
        """Write the point's disk image into an open file (sparse, every chunk checked; not
        fsynced). -> bytes of data written. ``cached``: through the page cache (a file read
        again at once, such as the raw image a qcow2 restore converts)."""
        with self.reading(point_id) as point:
            return restore_into(self, handle, point, progress, cached=cached)

    @contextlib.contextmanager
    def reading(self, point_id: str) -> Iterator[RestorePoint]:
        """The point, kept from `forget` and `prune` while the caller reads it (a reader
        lease, `reader_lease`)."""
        lease = self.reader_lease(point_id)
        try:
            yield self.point(point_id)  # read once its lease names it: a forget puts it back
        finally:
            if lease is not None:
                lease.release()

    def reader_lease(self, point_id: str) -> Lease | None:
        """A writer lease naming the point as its base, as a running incremental's does: no
        forget removes the point and no prune sweeps while it is held. None where none can be
        written (a read-only repository, no write permission, a full one): then a forget and
        prune may remove the point meanwhile, and what reads it fails rather than make
        anything up."""
        try:
            lease = self.writer_lease(f"read restore point {point_id}")
        except (BackendDenied, BackendReadOnly, NoSpace) as exc:
            log.info("reading restore point %s in %s without a lease (%s): a forget and prune "
                     "there may remove it meanwhile", point_id, self.location, exc)
            return None
        try:
            self.record_base(lease, point_id)
        except BaseException:
            lease.release()
            raise
        return lease

    # ------------------------------------------------------------------ check, repair, prune

    def check(self, *, read_data: bool = False, read_data_subset_pct: float | None = None,
              seed: int | None = None) -> CheckReport:
        return check_repository(self, read_data=read_data,
                                read_data_subset_pct=read_data_subset_pct, seed=seed)

    def repair(self) -> RepairReport:
        return repair_repository(self)

    def forget(self, policy: RetentionPolicy, disk_id: str | None = None,
               dry_run: bool = False) -> list[RestorePoint]:
        """Delete the manifests the policy does not keep (per disk). -> the forgotten (a point
        a running backup builds on is kept: `forget_points` says which)."""
        return list(self.forget_points(policy, disk_id, dry_run).forgotten)

    def forget_points(self, policy: RetentionPolicy, disk_id: str | None = None,
                      dry_run: bool = False) -> ForgetResult:
        return forget_points(self, policy, disk_id, dry_run)

    def prune(self, wait_s: float = 0.0) -> PruneReport:
        """Delete what no manifest references (garbage collection; repo/prune.py), waiting up
        to ``wait_s`` for the backups running now to finish."""
        return prune_repository(self, wait_s)


def _new_password(password: PasswordSource) -> bytes:
    secret = keys.password_bytes(password)
    if secret is None:
        raise PasswordRequired("no password was given")
    if not secret:
        raise InvalidArgument("the password is empty")
    return secret


def _create(backend: Backend, encryption: Encryption,
            strays: list[str]) -> tuple[dict[str, Any], Unlocked]:
    """Write the key file (encrypted), then the config: once the config exists, so does the
    repository, and it opens. The key files an init cut short left (written before a config
    that was not) go: they wrap keys no data was written with; left, the old password would
    open one of them after a `passwd` (a key of no repository), and an unencrypted config
    beside them would look like a downgrade. An encrypted init deletes them only once its
    config won (another init may be writing its key and config at this moment); an
    unencrypted one before its config, which cannot be opened beside them. ``strays``: the
    key files `_refuse_data_without_config` found."""
    if not encryption.enabled:
        for name in strays:
            backend.delete(name)
        return Store.create_config(backend, Store.new_config(False)), Unlocked(PlainCodec())
    if encryption.password is None:
        raise PasswordRequired("a new encrypted repository needs a password")
    password = _new_password(encryption.password)
    cipher = crypto.choose_cipher(encryption.cipher)
    master = crypto.MasterKeys.generate()
    config = keys.encrypted_config(Store.new_config(True), master, cipher)
    key = keys.add_key(backend, str(config["repo_id"]), master, password, encryption.kdf)
    try:
        Store.create_config(backend, config)
    except BaseException:
        backend.delete(key.name)
        raise
    for name in strays:  # the repository exists now: one left (a store that failed) is
        with contextlib.suppress(BackendError, OSError):  # harmless, a key of no repository
            backend.delete(name)
    return config, Unlocked(EncryptedCodec(master, cipher), key.id, master)


# What a repository holds besides its config and key files, by the names each may have:
# manifests and index files first (every repository has some; they are few to list).
_DATA: tuple[tuple[str, Callable[[str], object]], ...] = (
    (layout.POINTS, layout.point_id_of), (layout.INDEX, layout.index_filename_of),
    (layout.PACKS, layout.pack_id_of), (layout.VERIFY, layout.verify_record_of),
    (layout.GC, layout.gc_run_of), (layout.LEASES, layout.is_lease_name),
    (layout.QUARANTINE, lambda name: name.endswith(".json")))


def _refuse_data_without_config(backend: Backend) -> list[str]:
    """Refuse a location with a config, and one with a repository's data but no config.json:
    that is no new repository (its config lost?); a new config there would make its data
    unreadable, and the next prune would delete it. -> the key files there (an init cut
    short left them)."""
    try:
        backend.info(layout.CONFIG)
    except ObjectNotFound:
        pass
    else:
        raise RepositoryExists(f"{backend.url} already holds a repository")
    for prefix, names_one in _DATA:
        found = next((info.name for info in backend.list(prefix) if names_one(info.name)), None)
        if found is not None:
            raise RepositoryExists(
                f"{backend.url} holds a repository's objects ({found}) but no config.json: it "
                "is not new. If its config.json was lost, put it back from a copy; a new "
                "repository here would make its data unreadable. Nothing was written")
    return [info.name for info in backend.list(layout.KEYS)
            if layout.key_id_of(info.name) is not None]


def _refuse_foreign_files(backend: LocalBackend) -> None:
    """A repository is made in a new or empty directory: files of others there would be mixed
    with its own (and a mistyped path, a home or a VM image directory, would get nine
    directories of a repository added to it)."""
    try:
        names = backend.fio.listdir(backend.root)
    except FileNotFoundError:
        return
    foreign = [name for name in names if name not in _INIT_OVER]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5
                                          else "")
        raise InvalidArgument(f"{backend.root} is not empty ({shown}): a repository is made in "
                              "a new or empty directory (give a new one, such as "
                              f"{os.path.join(backend.root, 'repo')}); nothing was written")


def _init_local(backend: LocalBackend,
                encryption: Encryption) -> tuple[dict[str, Any], Unlocked]:
    fio = backend.fio
    in_the_way = backend.file_in_the_way()
    if in_the_way is not None:
        raise InvalidArgument(f"{in_the_way} is a file: a repository is made in a new or empty "
                              "directory; nothing was written")
    try:
        strays = _refuse_data_without_config(backend)  # before a directory is made
        _refuse_foreign_files(backend)
        for sub in LOCAL_DIRECTORIES:
            fio.makedirs(os.path.join(backend.root, sub))
        for lock in (LOCK_NAME, HOST_LOCK_NAME):
            fio.open(os.path.join(backend.root, lock), create=True).close()
        created = _create(backend, encryption, strays)
        fio.fsync_dir(os.path.dirname(os.path.abspath(backend.root)))
    except OSError as exc:
        if not is_no_space(exc):
            raise
        raise RepositoryNoSpace(f"the file system of repository {backend.root} is full "
                                f"(creating it: {exc.strerror or exc}): free space and retry; "
                                "no repository was created") from exc
    return created

