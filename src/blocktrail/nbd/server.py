"""An asyncio NBD server exporting disks: ``NAME`` read-write, ``NAME@SNAPSHOT`` read-only.

Meta contexts: ``base:allocation`` and ``qemu:dirty-bitmap:CHANGE_ID`` (areas changed since
CHANGE_ID, up to the snapshot for a snapshot export, up to now for the live one). A dirty-bitmap
question that cannot be answered (stale ID, any error) gets an error reply, never a "clean"
default. Disk calls run on worker threads so the event loop keeps serving other connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Callable
from dataclasses import dataclass

from blocktrail.disk import Disk
from blocktrail.errors import BlocktrailError, ChangeIdError, OutOfRange, SnapshotNotFound
from blocktrail.nbd.proto import (
    NEED_DATA,
    Command,
    CommandFlag,
    Disconnect,
    Errno,
    ExportChosen,
    ExportInfo,
    RemoteProtocolError,
    ReplyType,
    Request,
    ServerConnection,
)
from blocktrail.nbd.proto.constants import (
    BASE_ALLOCATION,
    DIRTY_BITMAP_PREFIX,
    STATE_DIRTY,
    STATE_HOLE,
    STATE_ZERO,
)
from blocktrail.tracking import ALL_ALLOCATED

READ_CHUNK = 1 << 20
MAX_DESCRIPTORS = 1 << 16


@dataclass(frozen=True, slots=True)
class Target:
    disk: Disk
    snapshot: str | None

    @property
    def size_bytes(self) -> int:
        if self.snapshot is None:
            return self.disk.size_bytes
        return self.disk.open_snapshot(self.snapshot).size_bytes

    def pread(self, count: int, offset: int) -> bytes:
        if self.snapshot is None:
            return self.disk.pread(count, offset)
        return self.disk.open_snapshot(self.snapshot).pread(count, offset)


class DiskCatalog:
    """Exports the disks a lookup function finds (the host's registry)."""

    def __init__(self, get_disk: Callable[[str], Disk], names: Callable[[], list[str]]) -> None:
        self._get_disk = get_disk
        self._names = names

    def target(self, name: str) -> Target | None:
        disk_name, _, snapshot = name.partition("@")
        try:
            disk = self._get_disk(disk_name)
            if snapshot:
                disk.open_snapshot(snapshot)
        except BlocktrailError:
            return None
        return Target(disk, snapshot or None)

    def lookup(self, name: str) -> ExportInfo | None:
        target = self.target(name)
        if target is None:
            return None
        change_ids = [s.change_id for s in target.disk.snapshots]
        contexts = (BASE_ALLOCATION, DIRTY_BITMAP_PREFIX,
                    *(DIRTY_BITMAP_PREFIX + c for c in change_ids))
        return ExportInfo(name, target.size_bytes, target.snapshot is not None,
                          f"blocktrail disk {name}", contexts, min_block=1,
                          preferred_block=4096)

    def names(self) -> list[str]:
        out: list[str] = []
        for name in self._names():
            out.append(name)
            with contextlib.suppress(BlocktrailError):
                out += [f"{name}@{s.name}" for s in self._get_disk(name).snapshots]
        return out


class _RequestFailed(Exception):
    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno, self.message = errno, message


async def serve_connection(catalog: DiskCatalog, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
    conn = ServerConnection(catalog)
    target: Target | None = None
    chosen: ExportChosen | None = None
    try:
        writer.write(conn.data_to_send())
        while True:
            event = conn.next_event()
            writer.write(conn.data_to_send())
            if event is NEED_DATA:
                await writer.drain()
                conn.receive_data(await reader.read(256 * 1024))
                continue
            if isinstance(event, Disconnect):
                break
            if isinstance(event, ExportChosen):
                chosen = event
                target = catalog.target(event.export.name)
                if target is None:
                    break
                continue
            assert isinstance(event, Request) and target is not None and chosen is not None
            await _answer(conn, target, chosen, event)
            writer.write(conn.data_to_send())
            await writer.drain()
    except (RemoteProtocolError, ConnectionError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.write(conn.data_to_send())
            writer.close()
            await writer.wait_closed()


async def _answer(conn: ServerConnection, target: Target, chosen: ExportChosen,
                  request: Request) -> None:
    try:
        reply = await asyncio.to_thread(_perform, target, chosen, request)
    except _RequestFailed as failure:
        conn.reply_error(request.cookie, failure.errno, failure.message)
        return
    if request.command is Command.READ:
        data = reply[0][1] if reply else b""
        if chosen.structured_replies:
            conn.reply_chunk(request.cookie, ReplyType.OFFSET_DATA,
                             struct.pack(">Q", request.offset) + data, done=True)
        else:
            conn.reply_simple(request.cookie, 0, data)
    elif request.command is Command.BLOCK_STATUS:
        for index, (context_id, payload) in enumerate(reply):
            conn.reply_chunk(request.cookie, ReplyType.BLOCK_STATUS,
                             struct.pack(">I", context_id) + payload,
                             done=index == len(reply) - 1)
    elif chosen.structured_replies:
        conn.reply_chunk(request.cookie, ReplyType.NONE, b"", done=True)
    else:
        conn.reply_simple(request.cookie)


def _perform(target: Target, chosen: ExportChosen,
             request: Request) -> list[tuple[int, bytes]]:
    """Run one request against the disk (on a worker thread)."""
    size = target.size_bytes
    command, offset, length = request.command, request.offset, request.length
    if command not in (Command.FLUSH,) and (offset + length > size or (
            length == 0 and command is not Command.WRITE)):
        raise _RequestFailed(Errno.EINVAL, f"request {offset}+{length} is outside the export "
                                           f"({size} bytes)")
    writes = (Command.WRITE, Command.TRIM, Command.WRITE_ZEROES)
    if command in writes and target.snapshot is not None:
        raise _RequestFailed(Errno.EPERM, "snapshot exports are read-only")
    try:
        disk = target.disk
        if command is Command.READ:
            return [(0, target.pread(length, offset))]
        if command is Command.WRITE:
            disk.pwrite(request.data, offset)
        elif command is Command.TRIM:
            disk.trim(length, offset)
        elif command is Command.WRITE_ZEROES:
            disk.zero(length, offset)
        elif command is Command.BLOCK_STATUS:
            return _block_status(target, chosen, request, size)
        if command is Command.FLUSH or request.flags & CommandFlag.FUA:
            disk.flush()
        return []
    except OutOfRange as exc:
        raise _RequestFailed(Errno.EINVAL, exc.message) from exc
    except BlocktrailError as exc:
        raise _RequestFailed(Errno.EIO, exc.message) from exc
    except OSError as exc:
        raise _RequestFailed(Errno.EIO, str(exc)) from exc


def _block_status(target: Target, chosen: ExportChosen, request: Request,
                  size: int) -> list[tuple[int, bytes]]:
    if not chosen.contexts:
        raise _RequestFailed(Errno.EINVAL, "no meta context was negotiated")
    end = min(size, request.offset + request.length)
    out = []
    for context_id, name in sorted(chosen.contexts.items()):
        if name == BASE_ALLOCATION:
            marked, inside, outside = _areas(target, ALL_ALLOCATED, request.offset, end), 0, \
                STATE_HOLE | STATE_ZERO
        elif name.startswith(DIRTY_BITMAP_PREFIX):
            change_id = name.removeprefix(DIRTY_BITMAP_PREFIX)
            try:  # refused: an error reply, never "clean"
                marked = _areas(target, change_id, request.offset, end)
            except (ChangeIdError, SnapshotNotFound) as exc:
                raise _RequestFailed(Errno.EINVAL, f"{name}: {exc.message}") from exc
            inside, outside = STATE_DIRTY, 0
        else:
            raise _RequestFailed(Errno.EINVAL, f"unknown meta context {name}")
        descriptors = _descriptors(marked, request.offset, end, inside, outside,
                                   one=bool(request.flags & CommandFlag.REQ_ONE))
        out.append((context_id, b"".join(struct.pack(">II", n, f) for n, f in descriptors)))
    return out


def _areas(target: Target, change_id: str, start: int, end: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        info = target.disk.query_changed_areas(change_id, pos, target.snapshot)
        out += [(max(e.offset, start), min(e.end, end)) for e in info.changed_areas
                if e.offset < end and e.end > start]
        pos = info.end
    return out


def _descriptors(marked: list[tuple[int, int]], start: int, end: int, inside: int,
                 outside: int, *, one: bool) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    pos = start
    for lo, hi in marked:
        if lo > pos:
            out.append((lo - pos, outside))
        out.append((hi - max(lo, pos), inside))
        pos = hi
    if pos < end:
        out.append((end - pos, outside))
    if one:
        out = out[:1]
    return out[:MAX_DESCRIPTORS]
