"""Leases: when a holder counts as gone, the margin a lease duration gets, and a renewal that
meets a transient failure while it recovers from its own reported failure."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blocktrail.repo import leases
from blocktrail.repo.backend import BackendUnavailable, ObjectInfo, PreconditionFailed
from blocktrail.repo.leases import Lease, LeaseRecord, Timing, read_lease, timing_from_environment
from blocktrail.repo.localdir import LocalBackend

NAME = "leases/disk-x.json"


def _held_by(record: LeaseRecord, pid: int) -> LeaseRecord:
    """The record as if the process ``pid`` of this machine held it."""
    return dataclasses.replace(record, pid=pid, process=leases.process_identity(pid))


@pytest.fixture
def record(tmp_path: Path) -> LeaseRecord:
    backend = LocalBackend(str(tmp_path))
    lease = Lease.acquire(backend, NAME, purpose="backup", timing=Timing(lease_s=300))
    found = read_lease(backend, NAME)
    lease.release()
    assert found is not None
    return found


def test_a_holder_counts_as_gone_only_when_its_process_is_seen_gone(
        record: LeaseRecord, monkeypatch: pytest.MonkeyPatch) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = _held_by(record, child.pid)
        assert not live.holder_dead() and not live.expired(2.0)
        real = leases._start_time

        def unreadable(pid: int) -> str:  # hidepid=1: the entry is there, not readable
            if pid == child.pid:
                raise PermissionError(13, "Permission denied", f"/proc/{pid}/stat")
            return real(pid)

        monkeypatch.setattr(leases, "_start_time", unreadable)
        assert not live.holder_dead()  # cannot be told: only expiry tells
        monkeypatch.undo()
    finally:
        child.kill()
        child.wait()
    gone = dataclasses.replace(live)
    assert gone.holder_dead() and gone.expired(2.0)  # its PID has no process any more
    monkeypatch.setattr(leases, "proc_hides_processes", lambda: True)
    assert not gone.holder_dead()  # /proc hides other users' processes: absence proves nothing


def test_hidepid_is_read_from_the_proc_mount(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    import builtins

    real_open = builtins.open
    for options, hides in (("rw", False), ("rw,hidepid=0", False), ("rw,hidepid=off", False),
                           ("rw,hidepid=2", True), ("rw,hidepid=invisible", True)):
        mountinfo = tmp_path / "mountinfo"
        mountinfo.write_text("22 27 0:21 / /sys rw,relatime - sysfs sysfs rw\n"
                             f"23 27 0:22 / /proc rw,relatime shared:5 - proc proc {options}\n")

        def fake_open(path: object, *args: object, _info: Path = mountinfo,
                      **kwargs: object) -> object:
            return real_open(_info if path == "/proc/self/mountinfo" else path,  # type: ignore[call-overload]
                             *args, **kwargs)

        monkeypatch.setattr(builtins, "open", fake_open)
        leases.proc_hides_processes.cache_clear()
        try:
            assert leases.proc_hides_processes() is hides, options
        finally:
            monkeypatch.setattr(builtins, "open", real_open)
            leases.proc_hides_processes.cache_clear()


@pytest.mark.parametrize("seconds", ["3", "5", "8", "300"])
def test_a_lease_duration_from_the_environment_keeps_the_margin_at_least_2_s(
        seconds: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """S3's Last-Modified and Date are whole seconds: M >= 2 s covers both (docs/storage.md)."""
    monkeypatch.setenv(leases.LEASE_VARIABLE, seconds)
    timing = timing_from_environment()
    assert timing.lease_s == float(seconds)
    assert 2.0 <= timing.margin < timing.lease_s - timing.renew_every


class _ReportedFailure(LocalBackend):
    """The second renewal is written but reported as refused (a retried PUT that met its own
    write), and reading the lease back then fails once, transiently."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.replaces = 0
        self.info_failures = 0

    def replace(self, name: str, data: bytes, etag: str) -> ObjectInfo:
        self.replaces += 1
        done = super().replace(name, data, etag)
        if self.replaces == 2:
            raise PreconditionFailed("retried PUT saw its own write")
        return done

    def info(self, name: str) -> ObjectInfo:
        if self.replaces == 2 and self.info_failures == 0:
            self.info_failures += 1
            raise BackendUnavailable("transient")
        return super().info(name)


def test_a_transient_failure_while_a_renewal_recovers_is_tried_again(tmp_path: Path) -> None:
    backend = _ReportedFailure(str(tmp_path))
    timing = Timing(lease_s=8.0, margin_s=2.0)  # renewed every 2 s, valid 6 s after each
    lease = Lease.acquire(backend, NAME, purpose="backup", timing=timing)
    try:
        time.sleep(9.0)  # the failure at the second renewal (4 s); the first one's 6 s are over
        assert backend.info_failures == 1 and backend.replaces >= 3
        lease.check("publish")  # still valid: the renewals went on
    finally:
        lease.release()
