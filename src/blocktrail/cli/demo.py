"""The end-to-end demo (`./run demo`): incremental backups of a disk that a real NBD client keeps
writing, through a running host.

It starts `blocktrail host` (control API + NBD), creates a disk through the API, and has
`qemu-io` (QEMU's own NBD client) write, zero and discard through the disk's NBD export in the
background. Then, round after round, it takes a snapshot through the API, backs it up (full,
then incremental: only the areas the host's tracker reports over NBD, plus a sampled audit of
the rest), restores the new restore point and has `qemu-img compare` check it against the
snapshot's NBD export, and removes the previous snapshot: a consolidation while qemu-io keeps
writing, the ESXi 6.0 scenario, run for real. Then it restores the newest point instantly into
a new disk on the host, reads it at once and compares it with the snapshot it came from while
the rest is filled in the background, and ends with `check --read-data` of the repository.
(Booting a guest from it is in the test suite: tests/guest, which needs QEMU's system emulator
and a kernel; the demo reads and compares instead.)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from typing import IO

from blocktrail.backup.engine import BackupOptions, run_backup
from blocktrail.backup.sources.host import HostDiskSource
from blocktrail.host.client import HostClient
from blocktrail.repo import Encryption, Repository

MiB = 1 << 20
DEMO_PASSWORD = "blocktrail-demo"
say = print


class QemuIoGuest(threading.Thread):
    """qemu-io writing 4-256 KiB of fresh patterns, zeros and discards at random offsets through
    NBD until stopped; one command at a time (qemu-io drops commands piped in a burst)."""

    def __init__(self, uri: str, size: int, seed: int) -> None:
        super().__init__(daemon=True)
        self._proc = subprocess.Popen(["qemu-io", "-f", "raw", uri], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, bufsize=1)
        self._size, self._rng = size, random.Random(seed)
        self._halt = threading.Event()
        self.commands = self.bytes = 0
        self.errors: list[str] = []

    def command(self, line: str) -> None:
        """Run one qemu-io command and wait for its result."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(line + "\n")
        self._proc.stdin.flush()
        _await_result(self._proc.stdout, line, self.errors)
        self.commands += 1

    def run(self) -> None:
        rng = self._rng
        while not self._halt.is_set() and not self.errors:
            length = rng.choice((4096, 16384, 65536, 262144))
            offset = rng.randrange(0, (self._size - length) // 4096) * 4096
            kind = rng.random()
            if kind < 0.9:
                self.command(f"write -P 0x{rng.randrange(1, 256):02x} {offset} {length}")
            elif kind < 0.95:
                self.command(f"write -z {offset} {length}")
            else:
                self.command(f"discard {offset} {length}")
            self.bytes += length
            time.sleep(0.002)  # a guest, not a benchmark: tens of MB per second

    def stop(self) -> None:
        self._halt.set()
        self.join()
        assert self._proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self._proc.stdin.write("quit\n")
            self._proc.stdin.close()
        self._proc.wait(30)


def _await_result(out: IO[str], command: str, errors: list[str]) -> None:
    """Read qemu-io's output up to the statistics line of one command (or its error)."""
    while True:
        line = out.readline()
        if not line:
            errors.append(f"qemu-io exited during {command!r}")
            return
        if "failed" in line or "error" in line.lower():
            errors.append(f"{command!r}: {line.strip()}")
            return
        if " ops; " in line:
            return


@contextlib.contextmanager
def running_host(workdir: str) -> Iterator[tuple[str, str]]:
    """`blocktrail host` in a child process; -> (API endpoint, NBD socket path)."""
    api, nbd = os.path.join(workdir, "api.sock"), os.path.join(workdir, "nbd.sock")
    password = os.path.join(workdir, "repo-password")  # the host opens the repository with it
    fd = os.open(password, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(DEMO_PASSWORD + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "blocktrail.cli.main", "host", "--data",
                             os.path.join(workdir, "disks"), "--api", f"unix:{api}", "--nbd",
                             f"unix:{nbd}", "--password-file", password],
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (os.path.exists(api) and os.path.exists(nbd)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the host did not start")
            time.sleep(0.05)
        say(f"host: blocktrail host (pid {proc.pid}), control API unix:{api}, NBD unix:{nbd}")
        yield f"unix:{api}", nbd
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def nbd_uri(nbd: str, export: str) -> str:
    return f"nbd+unix:///{export}?socket={nbd}"


def compare(image: str, nbd: str, export: str) -> bool:
    """`qemu-img compare` of a restored raw image with an export of the host."""
    result = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", image,
                             nbd_uri(nbd, export)], capture_output=True, text=True, check=False)
    if result.returncode not in (0, 1):
        raise RuntimeError(f"qemu-img compare failed: {result.stderr.strip()}")
    return result.returncode == 0


def run(workdir: str, size: int, rounds: int, seed: int) -> bool:
    say(f"blocktrail demo in {workdir}")
    with running_host(workdir) as (api_endpoint, nbd), \
            contextlib.closing(HostClient(api_endpoint)) as api:
        api.call("POST", "/disks", json={"name": "disk0", "size_bytes": size})
        say(f"disk0: {size // MiB} MiB, created through the control API")
        live = nbd_uri(nbd, "disk0")
        guest = QemuIoGuest(live, size, seed)
        rng = random.Random(seed)
        for _ in range(256):  # some data before the first backup
            guest.command(f"write -P 0x{rng.randrange(1, 256):02x} "
                          f"{rng.randrange(0, size // MiB - 1) * MiB} {256 * 1024}")
        say(f"qemu-io wrote 64 MiB through {live}; it keeps writing in the background")
        guest.start()
        say(f"repository {os.path.join(workdir, 'repo')}: encrypted, password "
            f"{DEMO_PASSWORD!r} (a demo's: choose your own)")
        with Repository.init(os.path.join(workdir, "repo"),
                             encryption=Encryption(DEMO_PASSWORD)) as repo, \
                contextlib.closing(HostDiskSource(api, "disk0")) as source:
            ok, point_id = _rounds(api, source, repo, guest, nbd, workdir, rounds)
            guest.stop()
            ok &= _instant_restore(api, repo.path, point_id, nbd, f"round-{rounds}")
            check = repo.check(read_data=True)
        say(f"qemu-io ran {guest.commands} commands ({guest.bytes / MiB:.1f} MiB), "
            f"{len(guest.errors)} failed{': ' + guest.errors[0] if guest.errors else ''}; "
            f"repository check --read-data: {check.points} points, {check.chunks_read} chunks, "
            f"{'no problems' if check.ok else f'{len(check.problems)} PROBLEMS'}")
    ok = ok and check.ok and not guest.errors
    say("identical" if ok else "DIFFERENT: a restore point does not equal its snapshot")
    return ok


def _instant_restore(api: HostClient, repo_path: str, point_id: str, nbd: str,
                     snapshot: str) -> bool:
    """Restore ``point_id`` instantly into the disk ``restored``, read its first 64 KiB (the
    boot sector and what follows) at once, and compare it with ``disk0@snapshot`` while its
    fill runs. -> whether they are equal."""
    started = time.perf_counter()
    api.call("POST", "/disks/restore", json={"name": "restored", "repository": repo_path,
                                             "point": point_id})
    created_s = time.perf_counter() - started
    read = subprocess.run(["qemu-io", "-f", "raw", "-c", "read 0 65536",
                           nbd_uri(nbd, "restored")], capture_output=True, text=True,
                          check=False)
    first_read_s = time.perf_counter() - started
    if read.returncode != 0 or "read 65536/65536" not in read.stdout:
        say(f"instant restore: reading the restored disk failed: {read.stdout}{read.stderr}")
        return False
    state = api.call("GET", "/disks/restored")["restore"]["summary"]
    say(f"instant restore of {point_id} into disk restored: created in {created_s:.2f} s, "
        f"its first 64 KiB read over NBD {first_read_s:.2f} s after the command ({state}; "
        "a guest would boot from it now: the guest tests do, this demo reads)")
    started = time.perf_counter()
    same = compare_exports(nbd, "restored", f"disk0@{snapshot}")
    state = api.call("GET", "/disks/restored")["restore"]["summary"]
    say(f"         qemu-img compare with the export disk0@{snapshot} during the fill in "
        f"{time.perf_counter() - started:.2f} s ({state} now): "
        f"{'identical' if same else 'DIFFERENT'}")
    return same


def compare_exports(nbd: str, first: str, second: str) -> bool:
    result = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                             nbd_uri(nbd, first), nbd_uri(nbd, second)], capture_output=True,
                            text=True, check=False)
    if result.returncode not in (0, 1):
        raise RuntimeError(f"qemu-img compare failed: {result.stderr.strip()}")
    return result.returncode == 0


def _rounds(api: HostClient, source: HostDiskSource, repo: Repository, guest: QemuIoGuest,
            nbd: str, workdir: str, rounds: int) -> tuple[bool, str]:
    """-> (every restore equal to its snapshot, the newest point's id)."""
    ok, previous, point_id = True, None, ""
    for n in range(rounds + 1):
        time.sleep(0.5)
        name = f"round-{n}"
        started = time.perf_counter()
        api.call("POST", "/disks/disk0/snapshots", json={"name": name})
        snapshot_s = time.perf_counter() - started
        report = run_backup(source, repo, BackupOptions(snapshot=name, seed=n))
        point_id = report.point.id
        target = os.path.join(workdir, "restored.raw")
        started = time.perf_counter()
        repo.restore(report.point.id, target)
        restore_s = time.perf_counter() - started
        started = time.perf_counter()
        same = compare(target, nbd, f"disk0@{name}")
        compare_s = time.perf_counter() - started
        os.unlink(target)
        ok &= same
        how = report.kind + (f" ({report.fallback_reason})" if report.fallback_reason else "")
        say(f"round {n}: snapshot {name} taken through the API in {snapshot_s:.2f} s; {how} "
            f"backup: read "
            f"{report.bytes_read / MiB:.1f} MiB over NBD, stored "
            f"{report.point.stats['bytes_stored'] / MiB:.2f} MiB (qemu-io writes patterns: "
            f"they compress) in {report.seconds:.2f} s; "
            f"audit re-read {report.audit.sampled_chunks} unchanged chunks: "
            f"{'all match' if report.audit.tracker_trusted else 'MISMATCH'}, "
            f"{report.audit.stored_copies_checked} stored copies checked")
        say(f"         restored in {restore_s:.2f} s; qemu-img compare with the export "
            f"disk0@{name} in {compare_s:.2f} s: {'identical' if same else 'DIFFERENT'}")
        if previous is not None:
            started = time.perf_counter()
            api.call("DELETE", f"/disks/disk0/snapshots/{previous}")
            say(f"         removed {previous} (consolidation) in "
                f"{time.perf_counter() - started:.2f} s while qemu-io wrote on "
                f"({guest.commands} commands so far)")
        previous = name
    return ok, point_id


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blocktrail-demo", description=__doc__)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    missing = [t for t in ("qemu-io", "qemu-img") if shutil.which(t) is None]
    if missing:
        print(f"the demo needs {missing} (Debian package qemu-utils)", file=sys.stderr)
        return 2
    workdir = tempfile.mkdtemp(prefix="blocktrail-demo-")
    try:
        return 0 if run(workdir, args.size_mib * MiB, args.rounds, args.seed) else 1
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
