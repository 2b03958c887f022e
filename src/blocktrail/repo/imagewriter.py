"""Writing a restored image: its chunks gathered into runs and written past the page cache.

A restore writes every chunk of an image once, mostly in order. Written one by one through the
page cache, each chunk is copied into pages the kernel has just allocated (and, where memory
comes from a hypervisor, faulted in from it: the slowest part of a restore, where measured) and
later written back; the restored image also pushes out of the cache what the machine uses.
Here consecutive chunks are copied into one of two page-aligned buffers of our own, reused for
the whole image, and each full run is written on a thread of its own with
`FileHandle.pwrite_direct` (O_DIRECT where the file system allows it) while the next run fills.
A run ends where the image skips a place (a hole, or a chunk that comes later) or the buffer is
full. Writes reach the file in the order they were given; a failed one surfaces at the next
`pwrite`, or at the end. Every `WRITEBACK_BYTES` written, the kernel is asked to start writing
back what went through the page cache (a file system that refuses O_DIRECT, or ``cached``),
so that the final fsync finds little left.
"""

from __future__ import annotations

import contextlib
import mmap
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType

from blocktrail.fileio import FileHandle, start_writeback

RUN_BYTES = 8 << 20  # one buffer: one write
WRITEBACK_BYTES = 64 << 20


class ImageWriter:
    """Writes of one image file (`pwrite`), gathered; a context manager: on leaving it every
    write given is in the file (not yet durable: the caller fsyncs), or, after an error, none
    is in flight any more. ``cached``: the runs are written through the page cache, for a
    file that is read again at once."""

    def __init__(self, handle: FileHandle, run_bytes: int = RUN_BYTES, *,
                 cached: bool = False) -> None:
        self._handle = handle
        # ``cached``: through the page cache all the same (a file that is read again at once)
        self._write = handle.pwrite if cached else handle.pwrite_direct
        self._run_bytes = run_bytes
        self._free = [memoryview(mmap.mmap(-1, run_bytes)) for _ in range(2)]
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="image-writer")
        self._in_flight: deque[tuple[Future[None], memoryview]] = deque()
        self._run: memoryview | None = None  # the buffer filling, from `_start`
        self._start = self._used = 0
        self._unflushed = 0  # bytes written since the last write-back hint (`_count`)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        size = len(data)
        if self._run is not None and (offset != self._start + self._used
                                      or self._used + size > len(self._run)):
            self._hand_over()
        if size > self._run_bytes:
            self._drain()  # bigger than a buffer: written as it is, in its turn
            self._handle.pwrite(data, offset)
            self._count(size)
            return
        if self._run is None:
            self._run, self._start, self._used = self._take(), offset, 0
        self._run[self._used : self._used + size] = data
        self._used += size

    def _take(self) -> memoryview:
        while not self._free:
            self._wait_one()
        return self._free.pop()

    def _hand_over(self) -> None:
        run, self._run = self._run, None
        if run is not None and self._used:
            self._in_flight.append((self._writer.submit(self._write_run,
                                                        run[: self._used], self._start), run))
        elif run is not None:
            self._free.append(run)

    def _write_run(self, run: memoryview, offset: int) -> None:
        self._write(run, offset)
        self._count(len(run))

    def _count(self, written: int) -> None:
        """(From one thread at a time: the writer's, or the caller's with none in flight.)"""
        self._unflushed += written
        if self._unflushed >= WRITEBACK_BYTES:
            start_writeback(self._handle)
            self._unflushed = 0

    def _wait_one(self) -> None:
        future, run = self._in_flight.popleft()
        try:
            future.result()
        finally:
            self._free.append(run)

    def _drain(self) -> None:
        self._hand_over()
        while self._in_flight:
            self._wait_one()

    def __enter__(self) -> ImageWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        try:
            if kind is None:
                self._drain()  # a failed write is this block's error
            else:
                self._run = None  # not written: the image is given up
                for future, _ in self._in_flight:
                    future.cancel()
                for future, _ in self._in_flight:
                    with contextlib.suppress(BaseException):
                        future.result()  # the first error is the one raised
                self._in_flight.clear()
        finally:
            self._writer.shutdown(wait=True)
