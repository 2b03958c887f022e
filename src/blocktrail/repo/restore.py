"""Restore: a restore point's disk image written to a file, every chunk checked.

Chunks that lie close together in one pack (a full backup stores a disk's chunks in disk order)
are fetched with one ranged read, also where an incremental's changes come between them; many
such reads are in flight at once, so a restore from object storage is bound by the link, not by
round trips. Consecutive chunks are written together, past the page cache where the file
system allows it (blocktrail.repo.imagewriter). The image is written through the file layer
(blocktrail.fileio): a file beside the target with no name until it is whole (a killed restore
leaves nothing), fsync, named ``.partial-*``, renamed over the target, fsync the directory; on
any damage (or a full file system) nothing is left at the target. A target that is no regular
file is refused first (`restore_target`), and a file replaced hands its permissions and owner to
the image. A block device is written in place instead (blocktrail.repo.device).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable

from blocktrail.errors import BlocktrailError, FileInUse, InvalidArgument, NoSpace, is_no_space
from blocktrail.extents import consecutive
from blocktrail.fileio import (
    FileHandle,
    FileIO,
    OsFileIO,
    file_kind,
    locked_by_another,
)
from blocktrail.pipeline import read_ahead
from blocktrail.repo.device import open_device
from blocktrail.repo.errors import ChunkCorrupt, ObjectMissing
from blocktrail.repo.imagewriter import ImageWriter
from blocktrail.repo.manifest import RestorePoint
from blocktrail.repo.objects import KIND_CHUNK, ZERO_DIGEST
from blocktrail.repo.quarantine import DamagedCopy
from blocktrail.repo.runs import Run, ranged_runs, read_run
from blocktrail.repo.store import Store

Progress = Callable[[int, int], None]
REPEAT_BYTES = 256 << 20  # chunks that recur in the image, kept in memory to write again


def restore_point(store: Store, point: RestorePoint, target: str,
                  progress: Progress | None = None, fileio: FileIO | None = None) -> int:
    """Write ``point``'s image to ``target`` (as `restore_target` gives it: checked; sparse).
    -> bytes of data written.

    The image is written to a file with no name in the target's directory (O_TMPFILE), which
    a killed restore leaves nowhere; once whole and fsynced it is named ``TARGET.partial-*``
    and renamed over the target. Where the file system has no such files, it is written under
    that name from the start. A block device is written in place (`restore_to_device`)."""
    if is_block_device(target):
        return restore_to_device(store, point, target, progress)
    fio = fileio or OsFileIO()
    partial = partial_name(target)
    try:
        handle = fio.create_unnamed(target_directory(target))
        named = handle is None  # ``partial`` is its name from the start: removed on failure
        if handle is None:
            handle = fio.open(partial, create=True)
        try:
            written = restore_into(store, handle, point, progress)
            replace_target(fio, handle, partial, target, named=named)
        except BaseException:
            if named:
                with contextlib.suppress(OSError):
                    fio.unlink(partial)
            raise
        finally:
            handle.close()
    except OSError as exc:
        if is_no_space(exc):
            raise _target_full(target, exc) from exc
        raise
    return written


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def restore_to_device(store: Store, point: RestorePoint, device: str,
                      progress: Progress | None = None) -> int:
    """Write ``point``'s image onto the block device ``device``, in place: its holes zeroed,
    the rest of a larger device left as it is, fsynced. Refused before the first write where
    the device is in use or too small, or a chunk has no copy (blocktrail.repo.device); an
    error after it says the device holds part of the image. -> bytes of data written."""
    handle = open_device(device, point.size_bytes)
    try:
        written = restore_into(store, handle, point, progress, in_place=True)
        handle.fsync()
    except (BlocktrailError, OSError) as exc:
        if not handle.changed:
            raise
        partly = (f"{device} holds part of the image now (a device is written in place): "
                  "restore again once this is fixed")
        if isinstance(exc, BlocktrailError):
            raise type(exc)(f"{exc.message}; {partly}") from exc
        raise OSError(exc.errno, f"{exc.strerror}; {partly}") from exc
    finally:
        handle.close()
    return written


def replace_target(fio: FileIO, handle: FileHandle, partial: str, target: str, *,
                   named: bool) -> None:
    """Put a file written whole over ``target``: fsync it, name it ``partial`` (a file of
    `FileIO.create_unnamed`; ``named``: it has that name already), rename it over the target,
    fsync the directory. A name given here is taken back if the rename fails; the caller
    closes ``handle``, and removes ``partial`` on failure when it was ``named``. A directory
    this user may write but not read (a drop box, mode 1733) cannot be opened to be synced:
    the new name there is written back by the kernel in its own time, as one `cp` makes."""
    fio.take_access(handle, target)
    handle.fsync()
    if not named:
        fio.link_unnamed(handle, partial)
    try:
        fio.rename(partial, target)
    except BaseException:
        if not named:
            with contextlib.suppress(OSError):
                fio.unlink(partial)
        raise
    with contextlib.suppress(PermissionError):
        fio.fsync_dir(target_directory(target))


def restore_target(target: str, fio: FileIO | None = None, *, devices: bool = False) -> str:
    """Where a restore to ``target`` puts its image: ``target`` when it is missing or a
    regular file; through a symbolic link, the regular file it leads to (the link stays, as
    `cp` writes through one); with ``devices``, a block device (also through a link, as
    /dev/VG/LV leads to /dev/dm-N), written in place. Anything else is refused
    here, before anything is read or written (`InvalidArgument`): renamed over, a character
    device or a FIFO would be replaced by a file, and a link that leads nowhere may be a typo;
    so is a name that cannot be named beside (`partial_name`). A file another process holds a
    lock on (a running VM's image) is refused (`FileInUse`): the VM's writes would go on into
    the file replaced. ``fio``: the file layer the target's directory is looked up in (the
    kinds and locks are the system's)."""
    try:
        found: os.stat_result | OSError = os.stat(target)
    except OSError as exc:
        found = exc
    if devices and isinstance(found, os.stat_result) and stat.S_ISBLK(found.st_mode):
        return target  # opened through a link, never replaced: named as it was given
    partial_name(target)  # a name that cannot be named beside it: refused first
    if isinstance(found, OSError):
        if os.path.islink(target):
            raise InvalidArgument(f"restore target {target} is a symbolic link to "
                                  f"{os.readlink(target)!r}, which leads to no file "
                                  f"({found.strerror})") from None
        if not (fio or OsFileIO()).isdir(target_directory(target)):
            raise InvalidArgument(f"restore target {target}: its directory "
                                  f"{target_directory(target)} does not exist") from None
        return target  # missing: it is made
    if stat.S_ISREG(found.st_mode):
        if os.path.islink(target):
            target = os.path.realpath(target)
            partial_name(target)
        if locked_by_another(target):
            raise FileInUse(f"restore target {target} is in use: another process holds a lock "
                            "on it (QEMU locks the image of a running VM, which would go on "
                            "writing into the file replaced, and lose those writes). Stop it "
                            "first, or restore to another file")
        return target
    kind = file_kind(found.st_mode)
    if stat.S_ISBLK(found.st_mode):
        raise InvalidArgument(f"restore target {target} is a block device: this restore writes "
                              "an image file only (a raw restore writes onto a device)")
    what = "an image file, or onto a block device" if devices else "an image file"
    raise InvalidArgument(f"restore target {target} is {kind}: a restore writes {what}, and "
                          "would replace it")


def target_directory(target: str) -> str:
    """The directory ``target`` is in, as the kernel finds it (``a/link/../b``: where ``link``
    leads, then up), where its file is made, named and renamed, and which is fsynced."""
    return os.path.dirname(target) or "."


def partial_name(target: str) -> str:
    """``TARGET.partial-TOKEN``, the name an image gets beside its target once it is whole,
    before it is renamed over it; the target's name cut short (never inside a character) where
    the whole would be longer than a file name may be there. A target that cannot be named
    (empty, its own name or its path too long) is refused here, before anything is written
    (`InvalidArgument`)."""
    suffix = f".partial-{secrets.token_hex(4)}"
    directory, name = os.path.split(target)
    if not name:
        raise InvalidArgument(f"restore target {target!r}: give a file name")
    longest = _limit(directory, "PC_NAME_MAX", 255)
    encoded = os.fsencode(name)
    if len(encoded) > longest:
        raise InvalidArgument(f"restore target {target}: its name has {len(encoded)} bytes, "
                              f"and a file name there has at most {longest}")
    head = encoded[: longest - len(suffix)]
    with contextlib.suppress(UnicodeDecodeError):
        encoded.decode()  # UTF-8: cut at a character, not inside one
        head = head.decode(errors="ignore").encode()
    partial = os.path.join(directory, os.fsdecode(head) + suffix)
    longest_path = _limit(directory, "PC_PATH_MAX", 4096)
    if len(os.fsencode(partial)) >= longest_path:
        raise InvalidArgument(f"restore target {target}: its path is too long to name the "
                              f"image beside it (a path there has under {longest_path} bytes)")
    return partial


def _limit(directory: str, name: str, default: int) -> int:
    """A file system's limit (`os.pathconf`), or ``default`` where it says none or nonsense
    (no more than the room a partial name's suffix takes)."""
    try:
        value = os.pathconf(directory or ".", name)
    except (OSError, ValueError):
        return default
    return value if value > 32 else default


def restore_into(store: Store, handle: FileHandle, point: RestorePoint,
                 progress: Progress | None, *, in_place: bool = False,
                 cached: bool = False) -> int:
    """Write ``point``'s image into an open file (sparse; not fsynced). -> bytes of data
    written. ``in_place``: into a file (a device) that holds something already and keeps its
    size: the point's holes are zeroed (`FileHandle.punch_hole`) and the rest is left as it
    is, once every chunk is known to have a copy (found missing, nothing was written).
    ``cached``: written through the page cache (`ImageWriter`), for a file read again at
    once."""
    entries: list[tuple[int, bytes]] = []
    holes: list[int] = []
    for index, name in store.page_entries(point):
        if name == ZERO_DIGEST:
            holes.append(index)
        else:
            entries.append((index, name))
    fetched, repeats = _split_repeats(entries, point.chunk_size)
    where = f"restore point {point.id}"
    if in_place:
        for _, name in fetched:
            if store.index.get(name) is None:
                store.read_chunk(name, where)  # ObjectMissing, before the device is touched
        for first, count in consecutive(holes):
            offset = first * point.chunk_size  # the last chunk may end inside the device
            handle.punch_hole(offset, min(count * point.chunk_size, point.size_bytes - offset))
    else:
        handle.truncate(point.size_bytes)
    window = 16 if store.backend.remote else 4
    runs = read_ahead(ranged_runs(store, fetched), lambda run: fetch_run(store, run, where),
                      window=window, executor=store.io_pool)
    kept: dict[bytes, bytes] = {}
    wanted = {name for _, name in repeats}
    names = dict(fetched)
    written = done = 0
    with ImageWriter(handle, cached=cached) as image:

        def write(index: int, data: bytes) -> None:
            nonlocal written, done
            expected = min(point.chunk_size, point.size_bytes - index * point.chunk_size)
            if len(data) != expected:
                raise ChunkCorrupt(f"chunk {index} of {where} has {len(data)} bytes, not "
                                   f"{expected}")
            image.pwrite(data, index * point.chunk_size)
            written += len(data)
            done += 1

        for chunks in runs:
            for index, data in chunks:
                write(index, data)
                if names[index] in wanted:
                    kept[names[index]] = data
            if progress is not None:
                progress(done, len(entries))
        for index, name in repeats:  # a chunk that recurs: read once, written again from memory
            write(index, kept[name])
    if progress is not None:
        progress(done, len(entries))
    return written


def _split_repeats(entries: list[tuple[int, bytes]], chunk_size: int
                   ) -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]]:
    """-> (entries to fetch, later occurrences of chunks fetched once and kept in memory, up
    to REPEAT_BYTES of them): an image with the same block in many places (deduplicated)
    costs one read of it, not a read per place."""
    seen: set[bytes] = set()
    keep: set[bytes] = set()
    fetched, repeats = [], []
    for index, name in entries:
        if name in keep or (name in seen and (len(keep) + 1) * chunk_size <= REPEAT_BYTES):
            keep.add(name)
            repeats.append((index, name))
        else:
            seen.add(name)
            fetched.append((index, name))
    return fetched, repeats


def fetch_run(store: Store, run: Run, where: str,
              found: list[DamagedCopy] | None = None) -> list[tuple[int, bytes]]:
    """The plain bytes of a run's chunks: one ranged read, each envelope checked; a damaged
    copy is put in quarantine (and appended to ``found``) and the next copy read
    (`Store.read_object`)."""
    if run[0][2] is None:  # no usable copy: a run of its own, read (and refused) alone
        return [(index, store.read_chunk(name, where, found)) for index, name, _ in run]
    out = []
    for index, name, loc, envelope in read_run(store, run, f"chunks of {where}"):
        chunk_label = f"chunk {name.hex()} ({where})"
        try:
            plain = store.codec.open(envelope, KIND_CHUNK, name,
                                     f"{chunk_label} in pack {loc.pack_id}")
        except ChunkCorrupt as exc:
            note = store.damaged(name, KIND_CHUNK, loc, exc, found)
            try:
                plain = store.read_chunk(name, where, found)  # a spare, or ChunkCorrupt
            except ObjectMissing:  # no spare: the damage found is the error
                raise type(exc)(f"{note}; no intact copy is left") from exc
        out.append((index, plain))
    return out


def _target_full(target: str, exc: OSError) -> NoSpace:
    return NoSpace(f"the file system of the restore target {target} is full "
                   f"({exc.strerror or exc}): free space there, or restore elsewhere, and "
                   "retry; nothing was left at the target")

