"""A tiny real Linux guest for the tests: Debian's cloud kernel under QEMU (TCG), an initramfs
built here (busybox, the host's mke2fs, the virtio modules), disks attached over NBD or from
files, and a line protocol on the serial console.

What the guest needs and where it comes from (`./run test` provides all of it):

- ``qemu-system-x86_64`` (Debian package qemu-system-x86), run with ``-accel tcg``: KVM does not
  boot guests on the machines this runs on;
- ``/bin/busybox`` (busybox-static) for ``/init`` and every command the guest runs;
- ``mke2fs`` and its shared libraries (e2fsprogs): busybox's mke2fs makes only ext2, and the
  tests want a journalled ext4; ``e2fsck`` checks restored images on the host;
- the kernel and its virtio modules (virtio-blk: QEMU's emulated NVMe stalls under TCG now and
  then), fetched by ``./run`` from Debian's ``linux-image-cloud-amd64`` into ``.cache/guest``.

The console protocol: the guest prints lines ``BT:TAG TEXT``; everything else (the kernel's
messages, command output) only goes to the log. ``/init`` says ``BT:READY`` once its disks are
there, runs the test's script (``/script.sh``, busybox sh with ``set -e``), then says
``BT:DONE`` and powers off; a failed command or ``bt_fail`` says ``BT:FAIL why`` instead. The
script talks to the test with the functions of ``/lib/bt.sh`` (`GUEST_LIBRARY`): ``bt_say``,
``bt_await`` (wait for the test's ``go``), ``bt_disk SERIAL`` (the device of a disk),
``bt_manifest DIR`` (``BT:SUM`` lines: the sha256 of every file under DIR). Every wait on the
guest has a timeout; a guest that stalls or dies fails the test with its console log.
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_ENV = "BLOCKTRAIL_GUEST_CACHE"  # where ./run put the kernel (default REPO/.cache/guest)
# The modules /init loads (and, before them, what they depend on).
ROOT_MODULES = ("virtio_pci", "virtio_blk")
MESSAGE = re.compile(r"BT:([A-Z]+)(?: (.*))?$")

# ------------------------------------------------------------------ newc cpio


class Cpio:
    """An initramfs in the "newc" cpio format (what the kernel unpacks): directories before what
    they hold, every entry its own inode. Archives may be concatenated; the kernel unpacks them
    in order, later entries replacing earlier ones."""

    def __init__(self, first_inode: int = 1) -> None:
        self._parts: list[bytes] = []
        self._inode = first_inode
        self._dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", *, nlink: int = 1,
               rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (self._inode, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)
        self._inode += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._parts += [header, encoded, _pad4(len(header) + len(encoded)), data,
                        _pad4(len(data))]

    def directory(self, path: str) -> None:
        path = path.strip("/")
        if not path or path in self._dirs:
            return
        self.directory(os.path.dirname(path))
        self._dirs.add(path)
        self._entry(path, 0o040755, nlink=2)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = path.strip("/")
        self.directory(os.path.dirname(path))
        self._entry(path, 0o100000 | mode, data)

    def symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        self.directory(os.path.dirname(path))
        self._entry(path, 0o120777, target.encode())

    def char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        path = path.strip("/")
        self.directory(os.path.dirname(path))
        self._entry(path, 0o020000 | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        data = b"".join(self._parts)
        return data + bytes(-len(data) % 512)


def _pad4(length: int) -> bytes:
    return bytes(-length % 4)


# ------------------------------------------------------------------ what a guest is made of


@dataclass(frozen=True)
class GuestKit:
    """Everything a boot needs, found on this machine (`find_kit`)."""

    qemu: Path
    kernel: Path
    modules: tuple[Path, ...]  # in load order
    busybox: Path
    mke2fs: Path
    e2fsck: Path
    base_initramfs: bytes = field(repr=False)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or REPO_ROOT / ".cache" / "guest")


def find_kit() -> tuple[GuestKit | None, list[str]]:
    """The kit, or None and what is missing (each with where it comes from)."""
    return _find_kit(cache_dir(), os.environ.get("PATH", ""))


@functools.cache
def _find_kit(cache: Path, search_path: str) -> tuple[GuestKit | None, list[str]]:
    missing: list[str] = []
    qemu = shutil.which("qemu-system-x86_64", path=search_path)
    if qemu is None:
        missing.append("qemu-system-x86_64 (Debian package qemu-system-x86)")
    busybox = Path("/bin/busybox")
    if not busybox.is_file():
        missing.append("/bin/busybox (Debian package busybox-static)")
    sbin = os.pathsep.join([search_path, "/usr/sbin", "/sbin"])
    mke2fs, e2fsck = shutil.which("mke2fs", path=sbin), shutil.which("e2fsck", path=sbin)
    if mke2fs is None or e2fsck is None:
        missing.append("mke2fs, e2fsck (Debian package e2fsprogs)")
    kernel = cache / "vmlinuz"
    modules = _modules_in_order(cache / "modules", ROOT_MODULES)
    if not kernel.is_file() or modules is None:
        missing.append(f"the guest kernel and its virtio modules in {cache} (./run test fetches "
                       "them from Debian's linux-image-cloud-amd64)")
    if missing or qemu is None or mke2fs is None or e2fsck is None or modules is None:
        return None, missing
    base = base_initramfs(busybox, Path(mke2fs), modules)
    return GuestKit(Path(qemu), kernel, tuple(modules), busybox, Path(mke2fs), Path(e2fsck),
                    base), []


def require_kit() -> GuestKit:
    """The kit; without it a failure under CI (CI=true), a skip elsewhere (as `require_tools`)."""
    kit, missing = find_kit()
    if kit is None:
        if os.environ.get("CI"):
            pytest.fail("the guest tests need: " + "; ".join(missing))
        pytest.skip("missing: " + "; ".join(missing))
    return kit


def _module_depends(path: Path) -> list[str]:
    match = re.search(rb"(?:^|\0)depends=([^\0]*)\0", path.read_bytes())
    if match is None or not match.group(1):
        return []
    return match.group(1).decode().split(",")


def _modules_in_order(directory: Path, roots: Iterable[str]) -> list[Path] | None:
    """The modules ``roots`` need, dependencies first (from their ``depends=`` modinfo); None
    if one is not in ``directory``."""
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> bool:
        if name in seen:
            return True
        seen.add(name)
        path = directory / f"{name}.ko"
        if not path.is_file():
            return False
        if not all(visit(dep) for dep in _module_depends(path)):
            return False
        order.append(path)
        return True

    return order if all(visit(root) for root in roots) else None


def _shared_libraries(program: Path) -> list[Path]:
    """The shared libraries ``ldd`` says ``program`` loads (none for a static one)."""
    out = subprocess.run(["ldd", str(program)], capture_output=True, text=True, timeout=30)
    libraries = []
    for line in out.stdout.splitlines():
        match = re.search(r"(?:=> )?(/\S+) \(0x", line)
        if match:
            libraries.append(Path(match.group(1)))
    return libraries


INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
stty -echo 2>/dev/null
. /lib/bt.sh
for module in $(cat /lib/modules/order); do
    insmod "/lib/modules/$module" || bt_halt "insmod $module failed"
done
tries=0
for serial in $(cat /etc/bt-disks); do
    while ! bt_disk "$serial" >/dev/null 2>&1; do
        tries=$((tries + 1))
        [ $tries -lt 200 ] || bt_halt "no disk with serial $serial"
        sleep 0.05
    done
done
bt_say READY
if (set -e; . /script.sh); then
    bt_say DONE
else
    bt_say FAIL "the script stopped (exit $?)"
    dmesg | tail -n 30
fi
sync
poweroff -f
"""

GUEST_LIBRARY = r"""# sourced by /init and by the test's /script.sh
bt_say() { echo "BT:$*"; }
bt_halt() { bt_say FAIL "$*"; dmesg | tail -n 30; sync; poweroff -f; }
bt_fail() { bt_say FAIL "$*"; exit 1; }
# bt_disk SERIAL: the device of the disk with that serial (-device ...,serial=SERIAL)
bt_disk() {
    for dev in /sys/block/vd*; do
        [ -e "$dev/serial" ] && [ "$(cat "$dev/serial")" = "$1" ] && {
            echo "/dev/${dev##*/}"; return 0; }
    done
    return 1
}
# bt_await: wait for the test's "go"
bt_await() {
    read -r answer || bt_fail "the console closed"
    [ "$answer" = go ] || bt_fail "expected go, got '$answer'"
}
# bt_manifest DIR [NAME]: "BT:SUM NAME SHA256 PATH" for every file under DIR (lost+found left
# out), PATH relative to DIR
bt_manifest() {
    bt_name=${2:-.}
    ( cd "$1" && find . -path ./lost+found -prune -o -type f -print | sort | while read -r f; do
        sum=$(sha256sum "$f"); echo "BT:SUM $bt_name ${sum%% *} $f"; done )
}
"""


def base_initramfs(busybox: Path, mke2fs: Path, modules: Sequence[Path]) -> bytes:
    """The part of every guest's initramfs that does not change between boots."""
    cpio = Cpio(first_inode=1)
    for directory in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "tmp", "mnt",
                      "root", "etc"):
        cpio.directory(directory)
    cpio.char_device("dev/console", 5, 1)
    cpio.char_device("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.file("sbin/mke2fs", mke2fs.read_bytes(), 0o755)
    for library in {*_shared_libraries(busybox), *_shared_libraries(mke2fs)}:
        cpio.file(str(library), library.read_bytes(), 0o755)
    if Path("/etc/mke2fs.conf").is_file():
        cpio.file("etc/mke2fs.conf", Path("/etc/mke2fs.conf").read_bytes())
    cpio.symlink("etc/mtab", "/proc/mounts")
    for module in modules:
        cpio.file(f"lib/modules/{module.name}", module.read_bytes())
    cpio.file("lib/modules/order", "".join(f"{m.name}\n" for m in modules).encode())
    cpio.file("lib/bt.sh", GUEST_LIBRARY.encode())
    cpio.file("init", INIT.encode(), 0o755)
    return cpio.finish()


# ------------------------------------------------------------------ disks


@dataclass(frozen=True)
class Drive:
    """A disk of the guest: its ``serial`` (how the script finds it, `bt_disk`) and the QEMU
    ``-blockdev`` options of its node."""

    serial: str
    blockdev: str

    @classmethod
    def nbd(cls, serial: str, socket: Path, export: str, *,
            reconnect_delay_s: int | None = None) -> Drive:
        """An export of an NBD server on a unix socket, through QEMU's own NBD client. With
        ``reconnect_delay_s``, requests made while the server is gone wait that long for it to
        come back (QEMU keeps trying to reconnect), instead of failing at once."""
        options = f"driver=nbd,server.type=unix,server.path={socket},export={export}"
        if reconnect_delay_s is not None:
            options += f",reconnect-delay={reconnect_delay_s}"
        return cls(serial, options)

    @classmethod
    def image(cls, serial: str, path: Path, *, fmt: str = "raw") -> Drive:
        return cls(serial, f"driver={fmt},file.driver=file,file.filename={path}")


# ------------------------------------------------------------------ a running guest


@dataclass(frozen=True)
class Message:
    tag: str
    text: str


class GuestFailed(AssertionError):
    pass


class Guest:
    """A guest booted with ``drives`` and the busybox sh ``script``; ``files`` (path -> bytes)
    are added to its initramfs. Use as a context manager: leaving it kills QEMU if it still
    runs. The console log goes to ``workdir/NAME.console``."""

    def __init__(self, kit: GuestKit, workdir: Path, drives: Sequence[Drive], script: str, *,
                 files: dict[str, bytes] | None = None, name: str = "guest",
                 memory_mib: int = 256) -> None:
        self.kit, self.name, self.drives = kit, name, list(drives)
        self.log_path = workdir / f"{name}.console"
        self._stderr_path = workdir / f"{name}.qemu-stderr"
        cpio = Cpio(first_inode=1 << 20)
        cpio.file("script.sh", script.encode(), 0o755)
        cpio.file("etc/bt-disks", "".join(f"{d.serial}\n" for d in drives).encode())
        for path, data in (files or {}).items():
            cpio.file(path, data)
        self._initrd = workdir / f"{name}.initrd"
        self._initrd.write_bytes(kit.base_initramfs + cpio.finish())
        self._memory_mib = memory_mib
        self._proc: subprocess.Popen[bytes] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._log: list[str] = []
        self._reader: threading.Thread | None = None
        self.started = 0.0

    def command(self) -> list[str]:
        # -cpu max: RDRAND seeds the guest's RNG at once (mke2fs waits for it otherwise)
        args = [str(self.kit.qemu), "-accel", "tcg", "-cpu", "max", "-m", str(self._memory_mib),
                "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
                "-serial", "stdio", "-monitor", "none", "-no-reboot",
                "-kernel", str(self.kit.kernel), "-initrd", str(self._initrd),
                "-append", "console=ttyS0 loglevel=5 panic=-1 mitigations=off"]
        for index, drive in enumerate(self.drives):
            args += ["-blockdev", f"{drive.blockdev},node-name=disk{index}",
                     "-device", f"virtio-blk-pci,drive=disk{index},serial={drive.serial}"]
        return args

    def __enter__(self) -> Guest:
        with open(self._stderr_path, "wb") as stderr:
            self._proc = subprocess.Popen(self.command(), stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=stderr)
        self.started = time.monotonic()
        self._reader = threading.Thread(target=self._read_console, daemon=True,
                                        name=f"{self.name}-console")
        self._reader.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def kill(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
        if self._reader is not None:
            self._reader.join(timeout=10)

    def _read_console(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        with open(self.log_path, "w", encoding="utf-8") as log:
            for raw in self._proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\r\n").replace("\r", "")
                stamp = time.monotonic() - self.started
                log.write(f"[{stamp:7.2f}] {line}\n")
                log.flush()
                self._log.append(line)
                self._lines.put(line)
        self._lines.put(None)

    # -------------------------------------------------------------- the protocol

    def fail(self, why: str) -> GuestFailed:
        """A failure that carries the console's last lines and QEMU's errors."""
        self.kill()
        tail = "\n".join(self._log[-80:])
        stderr = self._stderr_path.read_text(errors="replace").strip()
        return GuestFailed(f"guest {self.name}: {why}\n--- console ({self.log_path}), last "
                           f"lines ---\n{tail}" + (f"\n--- qemu stderr ---\n{stderr}" if stderr
                                                   else ""))

    def message(self, timeout_s: float) -> Message:
        """The next ``BT:`` message; ``FAIL``, the guest's end or the timeout fail the test."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self.fail(f"no message from the guest in {timeout_s:.0f} s")
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                code = self._proc.wait(timeout=10) if self._proc else None
                raise self.fail(f"QEMU exited (status {code}) before the guest said more")
            match = MESSAGE.search(line)
            if match is None:
                continue
            found = Message(match.group(1), match.group(2) or "")
            if found.tag == "FAIL":
                raise self.fail(f"the guest failed: {found.text}")
            return found

    def expect(self, tag: str, timeout_s: float) -> tuple[Message, list[Message]]:
        """Wait for the next message tagged ``tag``; -> it, and the messages before it."""
        deadline = time.monotonic() + timeout_s
        before: list[Message] = []
        while True:
            found = self.message(max(0.0, deadline - time.monotonic()))
            if found.tag == tag:
                return found, before
            before.append(found)

    def said(self, tag: str, text: str) -> bool:
        """Whether the guest has printed ``BT:TAG TEXT`` yet (read or not)."""
        return any(line.endswith(f"BT:{tag} {text}".rstrip()) for line in list(self._log))

    def send(self, line: str) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(line.encode() + b"\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            raise self.fail(f"could not send {line!r}: QEMU is gone") from None

    def finish(self, timeout_s: float) -> list[Message]:
        """Wait for ``BT:DONE`` and QEMU's exit; -> the messages before ``DONE``."""
        _, before = self.expect("DONE", timeout_s)
        assert self._proc is not None
        try:
            code = self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise self.fail("QEMU did not exit after the guest powered off") from None
        if code != 0:
            raise self.fail(f"QEMU exited with status {code}")
        return before


def sums(messages: Iterable[Message]) -> dict[str, dict[str, str]]:
    """The ``BT:SUM NAME SHA256 PATH`` lines, by NAME then PATH."""
    found: dict[str, dict[str, str]] = {}
    for m in messages:
        if m.tag == "SUM":
            name, digest, path = m.text.split(" ", 2)
            found.setdefault(name, {})[path] = digest
    return found


def e2fsck(kit: GuestKit, image: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(kit.e2fsck), *options, str(image)], capture_output=True,
                          text=True, timeout=120)
