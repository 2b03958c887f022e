"""A restore to a qcow2 file: the raw image, converted by qemu-img, reaches the target as every
restored file does (written beside it, fsynced, renamed over it, the directory fsynced).

Both the raw image and the converted one are files with no name (O_TMPFILE) that qemu-img reads
and writes as ``/proc/self/fd/N``: a killed restore leaves nothing; the converted file is named
``TARGET.partial-*`` only once whole, just before the rename. Where the file system has no such
files, both are made in a private temporary directory beside the target instead (a killed
restore leaves that directory). Either way the file gets the permissions a raw restore's gets
(`replace_target`): its owner's alone, or those of the file it replaces.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import tempfile
from collections.abc import Iterator

from blocktrail.errors import InvalidArgument, NoSpace, is_no_space
from blocktrail.fileio import FileHandle, OsFileIO
from blocktrail.repo import Repository
from blocktrail.repo.restore import (
    Progress,
    partial_name,
    replace_target,
    restore_target,
    target_directory,
)

QCOW2_SECTOR = 512  # qemu-img rounds a qcow2 image's size up to whole sectors
_NO_SPACE_MESSAGES = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT),
                      "No space left on device", "Disk quota exceeded")


def restore_qcow2(repo: Repository, point_id: str, target: str,
                  progress: Progress | None) -> int:
    """-> bytes of data restored. On any failure the target is as it was."""
    fio = OsFileIO()  # the file layer, as every write of a restore: the crash sweeps see it
    target = restore_target(target)
    size = repo.point(point_id).size_bytes
    if size % QCOW2_SECTOR:
        raise InvalidArgument(f"restore point {point_id} holds {size} bytes, not whole "
                              f"{QCOW2_SECTOR}-byte sectors: a qcow2 image of it would be "
                              "larger than the disk was; restore it as raw")
    directory, partial = target_directory(target), partial_name(target)
    raw = fio.create_unnamed(directory)
    if raw is None:
        return _restore_in_scratch_directory(repo, point_id, target, progress)
    try:
        with _target_full_named(target):
            written = repo.restore_into(point_id, raw, progress, cached=True)  # read next
        converted = fio.create_unnamed(directory)
        if converted is None:
            raise OSError(errno.EOPNOTSUPP, f"{directory} made one file with no name, and "
                                            "then no more")
        try:
            with _fd(raw) as raw_fd, _fd(converted) as out_fd:
                _convert(f"/proc/self/fd/{raw_fd}", f"/proc/self/fd/{out_fd}", target,
                         (raw_fd, out_fd))
            with _target_full_named(target):
                replace_target(fio, converted, partial, target, named=False)
        finally:
            converted.close()
    finally:
        raw.close()
    return written


def _restore_in_scratch_directory(repo: Repository, point_id: str, target: str,
                                  progress: Progress | None) -> int:
    fio = OsFileIO()
    directory = target_directory(target)
    partial_name(target)  # a name too long: refused before anything is written
    with tempfile.TemporaryDirectory(dir=directory) as d:
        raw, converted = os.path.join(d, "image.raw"), os.path.join(d, "image.qcow2")
        with _target_full_named(target):
            written = repo.restore(point_id, raw, progress)
            fio.open(converted, create=True).close()  # mode 0600: qemu-img keeps it
        _convert(raw, converted, target)
        with _target_full_named(target):
            handle = fio.open(converted)
            try:
                replace_target(fio, handle, converted, target, named=True)
            finally:
                handle.close()
    return written


def _convert(raw: str, converted: str, target: str, fds: tuple[int, ...] = ()) -> None:
    try:
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, converted],
                       check=True, capture_output=True, text=True, pass_fds=fds)
    except FileNotFoundError as exc:
        if exc.filename == "qemu-img":
            raise InvalidArgument("--format qcow2 needs qemu-img (Debian package "
                                  "qemu-utils)") from None
        raise
    except subprocess.CalledProcessError as exc:
        detail = exc.stderr.strip()
        if any(why in detail for why in _NO_SPACE_MESSAGES):
            raise _target_full(target, detail) from exc
        raise InvalidArgument(f"qemu-img convert failed: {detail}; the target {target} was "
                              "left as it was") from exc


@contextlib.contextmanager
def _fd(handle: FileHandle) -> Iterator[int]:
    """An OS descriptor of ``handle``'s file, for qemu-img to open as ``/proc/self/fd/N``
    (which `OsFileIO.create_unnamed` made sure there is)."""
    fd = handle.dup()
    if fd is None:
        raise ValueError("a file with no OS descriptor")
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _target_full_named(target: str) -> Iterator[None]:
    """A full file system, named for the target (not for a scratch file)."""
    try:
        yield
    except NoSpace as exc:
        raise _target_full(target, None) from exc
    except OSError as exc:
        if is_no_space(exc):
            raise _target_full(target, exc.strerror) from exc
        raise


def _target_full(target: str, detail: str | None) -> NoSpace:
    why = f" ({detail})" if detail else ""
    return NoSpace(f"the file system of the restore target {target} is full{why}: free space "
                   "there, or restore elsewhere, and retry; the target was left as it was")
