"""Kill a real process at every file-system mutation of an operation, one after the other.

A trial forks a child that prepares its state (un-armed), then arms the kill switch and runs the
operation under test: the K-th file-system mutation after arming SIGKILLs the child *before* it
happens (every earlier one happened, every later one never does). The parent then inspects what
is left on disk. Trials K = 1, 2, ... run until the operation completes without reaching K: that
sweeps every crash point of the operation exactly once.

The mutations counted are those of the one file layer (`blocktrail.fileio`): a write (pwrite),
a hole punched (fallocate), a truncate, an fsync/fdatasync, a file created (also one with no
name), a file named (link), a rename, an unlink, a directory made or removed, a directory
fsynced. `test_crash_points.py` checks with strace that nothing the operations do to their
files bypasses this layer.

The child reports to the parent over a pipe, one JSON object per line (`Reporter.send`); the
last line may be missing when the kill came first.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from blocktrail import fileio
from blocktrail.fileio import FileHandle, FileLock, OsFileHandle, OsFileIO


class Reporter:
    """The child's side of the pipe."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def send(self, event: str, **fields: Any) -> None:
        line = (json.dumps({"event": event, **fields}) + "\n").encode()
        view = memoryview(line)
        while view:
            view = view[os.write(self._fd, view):]


@dataclass
class KillSwitch:
    """Counts mutations once armed; SIGKILLs the process at the ``kill_at``-th (0: never)."""

    kill_at: int = 0
    armed: bool = False
    count: int = 0
    points: list[str] = field(default_factory=list)  # what each mutation was (kind and file)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def point(self, kind: str, path: str = "") -> None:
        if not self.armed:
            return
        with self.lock:
            self.count += 1
            self.points.append(f"{kind} {os.path.basename(path)}".rstrip())
            if self.count == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)


SWITCH = KillSwitch()


class _CountedHandle:
    """An OsFileHandle whose mutations pass the kill switch."""

    def __init__(self, inner: FileHandle, path: str) -> None:
        self._inner, self._path = inner, path

    def pread(self, count: int, offset: int) -> bytes:
        return self._inner.pread(count, offset)

    def pwrite(self, data: bytes | bytearray, offset: int) -> None:
        SWITCH.point("write", self._path)
        self._inner.pwrite(data, offset)

    def pwrite_direct(self, data: memoryview, offset: int) -> None:
        SWITCH.point("write", self._path)
        self._inner.pwrite_direct(data, offset)

    def punch_hole(self, offset: int, length: int) -> None:
        if length > 0:
            SWITCH.point("fallocate", self._path)
        self._inner.punch_hole(offset, length)

    def truncate(self, size: int) -> None:
        SWITCH.point("truncate", self._path)
        self._inner.truncate(size)

    def size(self) -> int:
        return self._inner.size()

    def fsync(self) -> None:
        SWITCH.point("fsync", self._path)
        self._inner.fsync()

    def data_extents(self, start: int = 0, end: int | None = None) -> list[Any]:
        return self._inner.data_extents(start, end)

    def dup(self) -> int | None:
        return self._inner.dup()

    def close(self) -> None:
        self._inner.close()


def _install() -> None:
    """Route every OsFileIO (however it was made) through the kill switch. In the child only."""
    real_open, real_create = OsFileIO.open, OsFileIO.create_empty
    real_rename, real_unlink = OsFileIO.rename, OsFileIO.unlink
    real_makedirs, real_fsync_dir = OsFileIO.makedirs, OsFileIO.fsync_dir
    real_lock, real_rmdir = OsFileIO.lock_exclusive, OsFileIO.rmdir
    real_create_unnamed, real_link_unnamed = OsFileIO.create_unnamed, OsFileIO.link_unnamed

    def open_(self: OsFileIO, path: str, *, create: bool = False) -> FileHandle:
        if create and not os.path.exists(path):
            SWITCH.point("create", path)
        return _CountedHandle(real_open(self, path, create=create), path)

    def create_unnamed(self: OsFileIO, directory: str) -> FileHandle | None:
        SWITCH.point("create", directory)  # a file with no name: nothing a kill leaves
        made = real_create_unnamed(self, directory)
        return None if made is None else _CountedHandle(made, directory)

    def link_unnamed(self: OsFileIO, handle: FileHandle, path: str) -> None:
        SWITCH.point("link", path)
        real_link_unnamed(self, handle, path)

    def create_empty(self: OsFileIO, path: str) -> FileHandle:
        SWITCH.point("create", path)
        return _CountedHandle(real_create(self, path), path)

    def rename(self: OsFileIO, src: str, dst: str) -> None:
        SWITCH.point("rename", dst)
        real_rename(self, src, dst)

    def unlink(self: OsFileIO, path: str) -> None:
        SWITCH.point("unlink", path)
        real_unlink(self, path)

    def rmdir(self: OsFileIO, path: str) -> None:
        SWITCH.point("rmdir", path)
        real_rmdir(self, path)

    def makedirs(self: OsFileIO, path: str) -> None:
        if not os.path.isdir(path):
            SWITCH.point("mkdir", path)
        real_makedirs(self, path)

    def fsync_dir(self: OsFileIO, path: str) -> None:
        SWITCH.point("fsync-dir", path)
        real_fsync_dir(self, path)

    def lock_exclusive(self: OsFileIO, path: str) -> FileLock:
        if not os.path.exists(path):
            SWITCH.point("create", path)
        return real_lock(self, path)

    OsFileIO.open = open_  # type: ignore[method-assign]
    OsFileIO.create_empty = create_empty  # type: ignore[method-assign]
    OsFileIO.create_unnamed = create_unnamed  # type: ignore[method-assign]
    OsFileIO.link_unnamed = link_unnamed  # type: ignore[method-assign]
    OsFileIO.rename = rename  # type: ignore[method-assign]
    OsFileIO.unlink = unlink  # type: ignore[method-assign]
    OsFileIO.makedirs = makedirs  # type: ignore[method-assign]
    OsFileIO.rmdir = rmdir  # type: ignore[method-assign]
    OsFileIO.fsync_dir = fsync_dir  # type: ignore[method-assign]
    OsFileIO.lock_exclusive = lock_exclusive  # type: ignore[method-assign]
    assert fileio.OsFileHandle is OsFileHandle


@contextlib.contextmanager
def armed(kill_at: int) -> Iterator[KillSwitch]:
    SWITCH.kill_at, SWITCH.count, SWITCH.points, SWITCH.armed = kill_at, 0, [], True
    try:
        yield SWITCH
    finally:
        SWITCH.armed = False


@dataclass(frozen=True)
class Trial:
    kill_at: int
    killed: bool
    events: list[dict[str, Any]]
    error: str | None  # the child failed (a bug in the operation or the test)

    @property
    def completed(self) -> bool:
        return not self.killed and self.error is None

    def events_of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind]

    @property
    def mutations(self) -> list[str]:
        done = self.events_of("done")
        return list(done[-1]["points"]) if done else []


Prepare = Callable[[Reporter], Any]
Operate = Callable[[Any], None]  # runs on what Prepare returned


def run_trial(prepare: Prepare, operate: Operate, kill_at: int) -> Trial:
    """One child: ``prepare`` un-armed, then ``operate`` killed at mutation ``kill_at``."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.close(read_fd)
            _install()
            reporter = Reporter(write_fd)
            state = prepare(reporter)
            with armed(kill_at) as switch:
                operate(state)
            reporter.send("done", points=switch.points)
        except BaseException:
            with contextlib.suppress(BaseException):
                Reporter(write_fd).send("error", traceback=traceback.format_exc())
            code = 3
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks = []
    with os.fdopen(read_fd, "rb") as pipe:
        while data := pipe.read(65536):
            chunks.append(data)
    _, status = os.waitpid(pid, 0)
    lines = b"".join(chunks).decode().split("\n")
    events = []
    for line in lines:
        with contextlib.suppress(ValueError):  # a line the kill cut short
            events.append(json.loads(line))
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    errors = [e["traceback"] for e in events if e["event"] == "error"]
    error = errors[0] if errors else (None if killed or os.WEXITSTATUS(status) == 0
                                       else f"child exited with status {status}")
    return Trial(kill_at, killed, events, error)


@dataclass
class SweepResult:
    crash_points: int  # mutations of the operation: each was a kill point
    trials: int
    mutations: list[str]


def sweep(prepare: Prepare, operate: Operate, check: Callable[[Trial], None], *,
          limit: int = 5000) -> SweepResult:
    """Kill the operation at every one of its mutations in turn; ``check`` each outcome (also
    the completed run). -> how many crash points the operation has."""
    for kill_at in range(1, limit + 1):
        trial = run_trial(prepare, operate, kill_at)
        if trial.error is not None:
            raise AssertionError(f"the child failed at kill point {kill_at}:\n{trial.error}")
        check(trial)
        if trial.completed:
            return SweepResult(kill_at - 1, kill_at, trial.mutations)
    raise AssertionError(f"the operation did not complete within {limit} mutations")
