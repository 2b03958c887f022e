"""Where a repository is: a local directory, or ``s3://BUCKET[/PREFIX]`` on an S3 service."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from blocktrail.errors import InvalidArgument
from blocktrail.fileio import FileIO
from blocktrail.repo import keys
from blocktrail.repo.backend import Backend, BackendDenied
from blocktrail.repo.errors import RepositoryNotFound
from blocktrail.repo.localdir import LocalBackend
from blocktrail.repo.s3options import S3Options
from blocktrail.repo.store import Store

if TYPE_CHECKING:
    from blocktrail.repo.keys import PasswordSource, Unlocked

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def is_s3_url(location: str) -> bool:
    return location.startswith("s3://")


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://BUCKET/PREFIX`` -> (bucket, prefix)."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise InvalidArgument(f"{url}: {bucket!r} is not a valid S3 bucket name (3-63 of "
                              "a-z 0-9 . -)")
    prefix = prefix.strip("/")
    for segment in prefix.split("/") if prefix else []:
        if not segment or segment in (".", "..") or not re.fullmatch(r"[A-Za-z0-9._-]+",
                                                                     segment):
            raise InvalidArgument(f"{url}: the prefix may hold only A-Z a-z 0-9 . _ - and /")
    return bucket, prefix


def open_backend(location: str | os.PathLike[str], *, fileio: FileIO | None = None,
                 s3: S3Options | None = None) -> Backend:
    text = os.fspath(location)
    if is_s3_url(text):
        bucket, prefix = parse_s3_url(text)
        from blocktrail.repo.s3 import S3Backend  # boto3 only for an S3 repository
        return S3Backend(bucket, prefix, s3 or S3Options())
    if "://" in text:
        raise InvalidArgument(f"{text}: a repository is a directory or s3://BUCKET/PREFIX")
    return LocalBackend(text, fileio)


@dataclass(frozen=True, slots=True)
class OpenedStore:
    """A repository's backend, config and keys: what `Repository` is built on. Reached without
    importing the repository's operations, so that a command derives the key (argon2id, the
    slow part of opening) while it imports them."""
    backend: Backend
    config: dict[str, Any]
    unlocked: Unlocked


def open_unlocked(location: str | os.PathLike[str], *, fileio: FileIO | None = None,
                  password: PasswordSource | None = None, s3: S3Options | None = None,
                  writes: bool = True) -> OpenedStore:
    """Open the backend, read the config and unlock the keys; on object storage, then make
    sure the store refuses to overwrite objects. ``writes`` False: for a command that only
    reads, and records at most what it finds (quarantine and verify records, each under a
    name of its own): credentials that may not write the probe are no obstacle to it (a
    store that overwrites is refused all the same). The backend is closed on any failure."""
    backend = open_backend(location, fileio=fileio, s3=s3)
    try:
        if isinstance(backend, LocalBackend) and (file := backend.file_in_the_way()):
            raise RepositoryNotFound(f"{backend.url} is not a blocktrail repository ({file} is "
                                     "a file)")
        config = Store.load_config(backend)
        unlocked = keys.unlock(backend, config, password)
        if backend.remote:
            try:
                Store.probe_conditional_writes(backend)
            except BackendDenied:
                if writes:
                    raise  # else: credentials that may only read, for a command that reads
    except BaseException:
        backend.close()
        raise
    return OpenedStore(backend, config, unlocked)
