"""What the NBD server exports: disks (``NAME``, read-write) and snapshots (``NAME@SNAPSHOT``,
read-only), and how each command is carried out on them.

Meta contexts: ``base:allocation`` and ``qemu:dirty-bitmap:CHANGE_ID`` (areas changed since
CHANGE_ID, up to the snapshot for a snapshot export, up to now for the live one). A dirty-bitmap
question that cannot be answered (stale ID, any error) gets an error reply, never a "clean"
default.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from blocktrail.disk import Disk, Snapshot
from blocktrail.disk.readmap import MappedRead
from blocktrail.errors import (
    BlocktrailError,
    ChangeIdError,
    DiskNotFound,
    NoSpace,
    OutOfRange,
    SnapshotRemoved,
    is_no_space,
)
from blocktrail.names import check_disk_name, check_snapshot_name
from blocktrail.nbd.proto import Command, CommandFlag, Errno, ExportInfo, Request
from blocktrail.nbd.proto.constants import (
    BASE_ALLOCATION,
    DIRTY_BITMAP_PREFIX,
    STATE_DIRTY,
    STATE_HOLE,
    STATE_ZERO,
)
from blocktrail.nbd.proto.errors import RequestFailed
from blocktrail.tracking import ALL_ALLOCATED

_FUA = int(CommandFlag.FUA)
_NOT_NOW = int(CommandFlag.FUA | CommandFlag.NO_HOLE)  # FUA waits for a flush; NO_HOLE writes
_REQ_ONE = int(CommandFlag.REQ_ONE)
MAX_DESCRIPTORS = 1 << 16
REQ_ONE_FIRST_WINDOW = 1 << 20
ZERO_WRITE_BYTES = 1 << 20
# A write up to this size is done on the event loop when the disk can take it at once: a thread
# hand-off costs more than copying it into the page cache (ext4 writes one file one write at a
# time anyway), and workers contending for the GIL cost most. A larger one goes to a worker
# thread, so that the event loop is not held up by one copy for long.
NOW_WRITE_MAX_BYTES = 1 << 20
# A dirty-map question is answered on the event loop when the intervals it joins hold at most
# this many marked granules (1 GiB of changes at 64 KiB): its whole cost (the join, the areas,
# the descriptors) grows with them, and at this bound stays near the cost of a 1 MiB write done
# there (a few tenths of a millisecond). A larger one goes to a worker thread.
NOW_BLOCK_STATUS_GRANULES = 1 << 14
_DESCRIPTOR = np.dtype(">u4")
_PAIR = struct.Struct(">II")


@dataclass(frozen=True, slots=True)
class Target:
    """One export: the live disk (``frozen`` None) or one of its snapshots. A snapshot export
    is bound to the snapshot the connection's negotiation found (the size it was told is that
    one's), not to its name: once that snapshot is removed, every request fails (EIO), also
    after another snapshot of that name is taken. A read mapped before the removal still sends
    that snapshot's bytes (the disk keeps them until the read is closed)."""

    disk: Disk
    frozen: Snapshot | None

    @property
    def snapshot(self) -> str | None:
        return None if self.frozen is None else self.frozen.name

    @property
    def read_only(self) -> bool:
        return self.frozen is not None

    @property
    def size_bytes(self) -> int:
        if self.frozen is None:
            return self.disk.size_bytes
        return self.frozen.size_bytes  # a snapshot's size never changes

    def map_read(self, count: int, offset: int, *, wait: bool) -> MappedRead | None:
        with _as_reply_errors():
            return self.disk.map_read(count, offset, self.frozen, wait=wait)

    def perform(self, request: Request) -> None:
        """A command without a data reply: WRITE, TRIM, WRITE_ZEROES, FLUSH, CACHE."""
        command, offset, length = request.command, request.offset, request.length
        if command in (Command.WRITE, Command.TRIM, Command.WRITE_ZEROES) and self.read_only:
            raise RequestFailed("snapshot exports are read-only", errno=Errno.EPERM)
        if command is not Command.FLUSH:
            self.check_range(command, offset, length)
        with _as_reply_errors():
            disk = self.disk
            if command is Command.WRITE:
                disk.pwrite(request.data, offset)
            elif command is Command.TRIM:
                disk.trim(length, offset)
            elif command is Command.WRITE_ZEROES:
                allocate = bool(request.flags & CommandFlag.NO_HOLE)
                if allocate and request.flags & CommandFlag.FAST_ZERO:  # zeros are written
                    raise RequestFailed("allocated zeros are written, not fast",
                                        errno=Errno.ENOTSUP)
                self._zero(offset, length, allocate=allocate)
            elif command is Command.CACHE:
                self._prefetch(offset, length)
            if command is Command.FLUSH or request.flags & CommandFlag.FUA:
                disk.flush()

    def perform_now(self, request: Request) -> bool:
        """A WRITE, WRITE_ZEROES (that may leave a hole) or TRIM done at once if the disk can
        take it without waiting (`Disk.try_pwrite`, `Disk.try_zero`); on the event loop, for
        every such request: kept short."""
        command = request.command
        if self.snapshot is not None or int.__and__(request.flags, _NOT_NOW):
            return False
        try:
            if command is Command.WRITE:
                return len(request.data) <= NOW_WRITE_MAX_BYTES \
                    and self.disk.try_pwrite(request.data, request.offset)
            if command is Command.WRITE_ZEROES or command is Command.TRIM:
                self.check_range(command, request.offset, request.length)
                return self.disk.try_zero(request.length, request.offset)
        except OutOfRange as exc:  # past the end: NBD says ENOSPC for a write
            raise RequestFailed(exc.message, errno=Errno.ENOSPC) from exc
        except BlocktrailError:
            return False  # the worker's perform answers it, with its errno
        except OSError:
            return False
        return False

    def _zero(self, offset: int, length: int, *, allocate: bool) -> None:
        if not allocate:
            self.disk.zero(length, offset)
            return
        for at in range(offset, offset + length, ZERO_WRITE_BYTES):  # NO_HOLE: write zeros
            self.disk.pwrite(bytes(min(ZERO_WRITE_BYTES, offset + length - at)), at)

    def _prefetch(self, offset: int, length: int) -> None:
        mapped = self.map_read(length, offset, wait=True)
        assert mapped is not None
        with mapped:
            for segment in mapped.segments:
                if segment.fd is not None:
                    os.posix_fadvise(segment.fd, segment.offset, segment.length,
                                     os.POSIX_FADV_WILLNEED)

    def check_range(self, command: Command, offset: int, length: int) -> None:
        size = self.size_bytes
        if length == 0 and command is not Command.WRITE:
            raise RequestFailed(f"{command.name} of 0 bytes", errno=Errno.EINVAL)
        if offset > size or length > size - offset:
            errno = Errno.ENOSPC if command in (Command.WRITE, Command.WRITE_ZEROES) \
                else Errno.EINVAL
            raise RequestFailed(f"request {offset}+{length} is outside the export ({size} "
                                f"bytes)", errno=errno)

    def block_status(self, request: Request, contexts: dict[int, str]) -> list[tuple[int, bytes]]:
        """(context id, descriptors) for every negotiated context."""
        return self._block_status(request, contexts, now=False)

    def block_status_now(self, request: Request,
                         contexts: dict[int, str]) -> list[tuple[int, bytes]] | None:
        """`block_status` answered at once, on the event loop, when every context is a dirty
        bitmap, nothing would make it wait and the answer is small (at most
        `NOW_BLOCK_STATUS_GRANULES` marked granules to join, `Disk.try_query_changed_areas`);
        None otherwise (a worker thread answers). The same answer, or error, either way."""
        if not contexts or not all(name.startswith(DIRTY_BITMAP_PREFIX)
                                   for name in contexts.values()):
            return None
        try:
            return self._block_status(request, contexts, now=True)
        except _NotNow:
            return None

    def _block_status(self, request: Request, contexts: dict[int, str], *,
                      now: bool) -> list[tuple[int, bytes]]:
        if not contexts:
            raise RequestFailed("no meta context was negotiated", errno=Errno.EINVAL)
        self.check_range(Command.BLOCK_STATUS, request.offset, request.length)
        start, end = request.offset, request.offset + request.length
        one = bool(int.__and__(request.flags, _REQ_ONE))  # not Flag's own `&`: per request
        out = []
        for context_id, name in sorted(contexts.items()):
            if name == BASE_ALLOCATION:
                change_id, inside, outside = ALL_ALLOCATED, 0, STATE_HOLE | STATE_ZERO
            elif name.startswith(DIRTY_BITMAP_PREFIX):
                change_id, inside, outside = name.removeprefix(DIRTY_BITMAP_PREFIX), STATE_DIRTY, 0
            else:
                raise RequestFailed(f"unknown meta context {name}", errno=Errno.EINVAL)
            try:  # refused: an error reply, never "clean"
                payload = self._descriptors(change_id, start, end, inside, outside, one=one,
                                            now=now)
            except RequestFailed as failure:
                raise RequestFailed(f"{name}: {failure.message}", errno=failure.errno) from failure
            out.append((context_id, payload))
        return out

    def _descriptors(self, change_id: str, start: int, end: int, inside: int, outside: int, *,
                     one: bool, now: bool) -> bytes:
        if not one:
            lo, hi, covered = self._areas(change_id, start, end, now=now)
            return descriptors((lo, hi), start, covered, inside, outside, one=False)
        # One extent is wanted (QEMU asks so, from each offset to the end of the disk). A
        # snapshot's answer kept whole gives its first area past the offset at once (no
        # arrays). Otherwise (not kept: the first question, the live disk, too large; or the
        # disk is busy) the extent may be shorter than asked: look at a growing window until
        # it ends inside it (the first area found ends before the next one starts, or before
        # the window does). That question joins a snapshot's answer whole and keeps it, when
        # it is not too large to keep.
        if self.frozen is not None and inside != outside:
            with _as_reply_errors():
                area = self.disk.try_first_changed_area(change_id, start, self.frozen,
                                                        end_offset=end)
            if area is not None:
                area_start, area_end = area
                if area_start >= end:  # none before the end
                    return _PAIR.pack(end - start, outside)
                return _PAIR.pack(area_start - start, outside) if area_start > start \
                    else _PAIR.pack(area_end - start, inside)
        window = REQ_ONE_FIRST_WINDOW
        while True:
            stop = min(end, start + window)
            lo, hi, covered = self._areas(change_id, start, stop, now=now, max_extents=1)
            payload = descriptors((lo, hi), start, covered, inside, outside, one=True)
            if covered < stop or covered == end or \
                    int.from_bytes(payload[:4], "big") < covered - start:
                return payload
            window *= 8

    def _areas(self, change_id: str, start: int, end: int, *, now: bool,
               max_extents: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        """Offsets and ends of the marked areas inside [start, covered), and ``covered``: the
        end, or where the ``max_extents``-th area ends when more follow (`MAX_DESCRIPTORS`:
        what one reply carries; the client asks again from where the reply ends). ``now``:
        without waiting and small, else `_NotNow`."""
        los, his = [], []
        pos, areas = start, 0
        max_extents = MAX_DESCRIPTORS if max_extents is None else max_extents
        with _as_reply_errors():
            while pos < end and areas < max_extents:
                if not now:
                    info = self.disk.query_changed_areas(change_id, pos, self.frozen,
                                                         end_offset=end,
                                                         max_extents=max_extents - areas)
                elif (found := self.disk.try_query_changed_areas(
                        change_id, pos, self.frozen, end_offset=end,
                        max_granules=NOW_BLOCK_STATUS_GRANULES,
                        max_extents=max_extents - areas)) is not None:
                    info = found
                else:
                    raise _NotNow
                los.append(info.offsets)
                his.append(info.offsets + info.lengths)
                areas += len(info.offsets)
                pos = info.end
        covered = min(pos, end)
        lo = los[0] if len(los) == 1 else np.concatenate(los)
        hi = his[0] if len(his) == 1 else np.concatenate(his)
        if len(lo) and (lo[0] < start or hi[-1] > covered):  # the wire's bounds, whatever came
            lo, hi = np.clip(lo, start, covered), np.clip(hi, start, covered)
        keep = lo < hi
        return (lo, hi, covered) if keep.all() else (lo[keep], hi[keep], covered)


def descriptors(marked: tuple[np.ndarray, np.ndarray], start: int, end: int, inside: int,
                outside: int, *, one: bool) -> bytes:
    """Block status descriptors (length, flags) covering [start, end): ``inside`` on the
    marked areas (sorted, disjoint, not empty), ``outside`` between them. Written in place as
    the wire carries them: an answer of thousands of areas makes few temporary arrays."""
    lo, hi = marked
    if len(lo) > 1:  # adjacent areas are one: no gap of 0 bytes between them
        apart = lo[1:] != hi[:-1]
        if not apart.all():
            lo, hi = lo[np.concatenate(([True], apart))], hi[np.concatenate((apart, [True]))]
    count = len(lo)
    if not count or inside == outside:
        return _PAIR.pack(end - start, inside if count else outside)
    out = np.empty((2 * count + 1, 2), dtype=_DESCRIPTOR)
    lengths = out[:, 0]
    lengths[0] = int(lo[0]) - start
    lengths[1:-1:2] = hi - lo
    lengths[2:-1:2] = lo[1:] - hi[:-1]
    lengths[-1] = end - int(hi[-1])
    out[0::2, 1], out[1::2, 1] = outside, inside
    first = 0 if lengths[0] else 1  # an area at the start or the end: no empty gap there
    last = len(out) if lengths[-1] else len(out) - 1
    return out[first : min(last, first + (1 if one else MAX_DESCRIPTORS))].tobytes()


class DiskCatalog:
    """Exports the disks a lookup function finds (the host's registry)."""

    def __init__(self, get_disk: Callable[[str], Disk], names: Callable[[], list[str]]) -> None:
        self._get_disk = get_disk
        self._names = names

    @classmethod
    def of(cls, disks: dict[str, Disk]) -> DiskCatalog:
        """A catalog of disks already open, by export name."""
        def get(name: str) -> Disk:
            if name not in disks:
                raise DiskNotFound(f"no disk {name!r} is exported")
            return disks[name]

        return cls(get, lambda: sorted(disks))

    def target(self, name: str) -> Target | None:
        """The export ``name`` names, or None ("no such export"): ``DISK`` or
        ``DISK@SNAPSHOT``, each part a valid name (names.py). ``DISK@`` is no export: a script
        that builds ``DISK@$SNAPSHOT`` from an empty variable must not reach the live disk."""
        disk_name, at, snapshot = name.partition("@")
        try:
            check_disk_name(disk_name)
            if at:
                check_snapshot_name(snapshot)
            disk = self._get_disk(disk_name)
            frozen = None
            if at:
                frozen = next((s for s in disk.snapshots if s.name == snapshot), None)
                if frozen is None:
                    return None
        except BlocktrailError:
            return None
        return Target(disk, frozen)

    def open(self, export: ExportInfo) -> Target | None:
        """The export a connection that chose ``export`` uses (the server's `Catalog`): the
        target its `lookup` found, so that a snapshot replaced under its name in between is
        not served in place of the one whose size the client was told."""
        target = export.binding
        return target if isinstance(target, Target) else self.target(export.name)

    def lookup(self, name: str) -> ExportInfo | None:
        target = self.target(name)
        if target is None:
            return None
        change_ids = [s.change_id for s in target.disk.snapshots]
        contexts = (BASE_ALLOCATION, DIRTY_BITMAP_PREFIX,
                    *(DIRTY_BITMAP_PREFIX + c for c in change_ids))
        # multi-conn: a disk's flush covers the writes of every thread and connection, and
        # snapshot exports take no writes
        return ExportInfo(name, target.size_bytes, target.read_only,
                          f"blocktrail disk {name}", contexts, min_block=1,
                          preferred_block=4096, multi_conn=True, binding=target)

    def names(self) -> list[str]:
        out: list[str] = []
        for name in self._names():
            out.append(name)
            with contextlib.suppress(BlocktrailError):
                out += [f"{name}@{s.name}" for s in self._get_disk(name).snapshots]
        return out


class _NotNow(Exception):
    """A question `Target.block_status_now` leaves to a worker thread."""


@contextlib.contextmanager
def _as_reply_errors() -> Iterator[None]:
    try:
        yield
    except RequestFailed:
        raise
    except SnapshotRemoved as exc:
        raise RequestFailed(f"{exc.message}; this export is gone (connect again to read a "
                            "snapshot taken since)", errno=Errno.EIO) from exc
    except (OutOfRange, ChangeIdError) as exc:
        raise RequestFailed(exc.message, errno=Errno.EINVAL) from exc
    except NoSpace as exc:  # QEMU can pause a guest on ENOSPC (werror=enospc) and go on later
        raise RequestFailed(exc.message, errno=Errno.ENOSPC) from exc
    except BlocktrailError as exc:
        raise RequestFailed(exc.message, errno=Errno.EIO) from exc
    except OSError as exc:
        raise RequestFailed(str(exc), errno=Errno.ENOSPC if is_no_space(exc) else Errno.EIO) \
            from exc
