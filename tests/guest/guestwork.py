"""What the guest tests do with a guest: a host daemon they may kill and start again, a seeded
plan of file-system rounds for the writer guest, the checking guest's script, backups of a
host's snapshots, restores, and the host-side e2fsck."""

from __future__ import annotations

import contextlib
import io
import json
import random
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guestvm import Drive, Guest, GuestKit, Message, e2fsck, sums

from blocktrail.backup.engine import BackupOptions, BackupReport, run_backup
from blocktrail.backup.sources.host import HostDiskSource
from blocktrail.cli.main import main
from blocktrail.host.client import HostClient
from blocktrail.repo import Repository
from hostproc import HostProcess
from s3server import TEST_PASSWORD

MiB = 1 << 20


# ------------------------------------------------------------------ the host


def backup_snapshot(host: HostProcess, repo: Path, disk: str, snapshot: str) -> BackupReport:
    """Back ``disk@snapshot`` up into ``repo`` (an existing snapshot, which stays): through the
    library's host source, as a backup application would."""
    client = HostClient(host.endpoint)
    try:
        source = HostDiskSource(client, disk, api_host=client.endpoint.host)
        with contextlib.closing(source), Repository.open(repo, password=TEST_PASSWORD) as store:
            return run_backup(source, store, BackupOptions(snapshot=snapshot))
    finally:
        client.close()


def cli(*args: str) -> Any:
    """`blocktrail ARGS --json` run in this process (the CLI's code, without a Python start
    per call); it must succeed. -> its JSON answer."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([*args, "--json"])
    assert code == 0, f"blocktrail {' '.join(args)}: exit {code}: {out.getvalue()}"
    return json.loads(out.getvalue())


def restore(repo: Path, point_id: str, target: Path) -> Path:
    cli("restore", str(repo), point_id, "--to", str(target))
    return target


# ------------------------------------------------------------------ the writer's rounds

SIZES = (0, 1, 517, 4096, 5000, 65536, 200_000, 700_000, MiB, 3 * MiB)


@dataclass
class RoundPlan:
    """A seeded sequence of file operations under ``data/`` of a mounted file system: new
    files of many sizes, block overwrites, byte overwrites, appends, truncations, renames,
    deletions, about ``round_bytes`` a round. Each round is a busybox sh snippet run in that
    file system's root. With ``touch_earlier=False`` a round changes only the files it made,
    so every earlier round's files stay as that round left them."""

    seed: int
    round_bytes: int = 2 * MiB
    touch_earlier: bool = True

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._files: dict[str, tuple[int, int]] = {}  # path -> (size, round that made it)
        self._serial = 0

    def _new_name(self, round_no: int) -> str:
        self._serial += 1
        folder = self._rng.choice(["data", "data", "data/a", "data/b/c"])
        return f"{folder}/r{round_no}-{self._serial}"

    def operations(self, round_no: int) -> list[str]:
        """Round ``round_no``'s commands, one operation each."""
        rng, files = self._rng, self._files
        ops = ["mkdir -p data/a data/b/c"]
        written = 0
        while written < self.round_bytes:
            existing = sorted(p for p, (_, made) in files.items()
                              if self.touch_earlier or made == round_no)
            kind = rng.choice(["new", "new", "blocks", "bytes", "append", "truncate", "rename",
                               "delete"] if existing else ["new"])
            if kind == "new":
                name, size = self._new_name(round_no), rng.choice(SIZES)
                ops.append(f"head -c {size} /dev/urandom > {name}")
                files[name] = (size, round_no)
                written += size + 4096
                continue
            name = rng.choice(existing)
            size, made = files[name]
            if kind == "blocks":
                first, count = rng.randrange(0, size // 4096 + 2), rng.randrange(1, 64)
                ops.append(f"dd if=/dev/urandom of={name} bs=4096 seek={first} count={count} "
                           "conv=notrunc 2>/dev/null")
                files[name] = (max(size, (first + count) * 4096), made)
                written += count * 4096
            elif kind == "bytes":
                offset = rng.randrange(0, size + 1)
                text = f"round {round_no} was here"
                ops.append(f"printf '{text}' | dd of={name} bs=1 seek={offset} conv=notrunc "
                           "2>/dev/null")
                files[name] = (max(size, offset + len(text)), made)
                written += 4096
            elif kind == "append":
                grow = rng.choice(SIZES[1:8])
                ops.append(f"head -c {grow} /dev/urandom >> {name}")
                files[name] = (size + grow, made)
                written += grow
            elif kind == "truncate":
                new_size = rng.randrange(0, size + 1)
                ops.append(f"truncate -s {new_size} {name}")
                files[name] = (new_size, made)
            elif kind == "rename":
                target = self._new_name(round_no)
                ops.append(f"mv {name} {target}")
                files[target] = files.pop(name)
            else:
                ops.append(f"rm {name}")
                del files[name]
        return ops


@dataclass(frozen=True)
class Fs:
    """A file system the writer guest writes rounds of ``plan`` into: the disk ``serial``'s,
    mounted at ``mount``."""

    serial: str
    mount: str
    plan: RoundPlan


def writer_round(round_no: int, filesystems: Sequence[Fs], *, sync_each: bool = False) -> str:
    """Round ``round_no`` in each file system: the plan's writes, ``round`` (the round's
    number) and ``manifests/round-N.sha256`` (the sha256 of every file under ``data``); then
    ``sync``, the report of every file's sha256 (``BT:SUM SERIAL SHA256 PATH``) and
    ``BT:ROUND N``, and a wait for the test's go. With ``sync_each``, every operation is
    followed by ``sync`` and ``BT:SYNCED N I``."""
    parts = [f"bt_say WRITING {round_no}"]
    for fs in filesystems:
        ops = fs.plan.operations(round_no)
        if sync_each:
            ops = [f"{op}\nsync\nbt_say SYNCED {round_no} {i}" for i, op in enumerate(ops, 1)]
        parts += [f"cd {fs.mount}", *ops, f"echo {round_no} > round", "mkdir -p manifests",
                  f"find data -type f | sort | xargs -r sha256sum > manifests/round-{round_no}"
                  ".sha256"]
    parts += ["cd /", "sync"]
    parts += [f"bt_manifest {fs.mount} {fs.serial}" for fs in filesystems]
    parts += [f"bt_say ROUND {round_no}", "bt_await"]
    return "\n".join(parts) + "\n"


MKFS = ("/sbin/mke2fs -q -F -t ext4 -b 4096 -N 2048 "
        "-E lazy_itable_init=0,lazy_journal_init=0,nodiscard")


def make_and_mount(serial: str, mount: str) -> str:
    """A fresh ext4 (journalled; the host's mke2fs: busybox's makes only ext2) on the disk
    ``serial``, mounted at ``mount``."""
    return f"""
dev=$(bt_disk {serial})
{MKFS} "$dev"
mkdir -p {mount}
mount -t ext4 "$dev" {mount}
"""


@dataclass(frozen=True)
class RoundReport:
    number: int
    manifests: dict[str, dict[str, str]]  # serial -> path -> sha256: every file after the round


def await_round(guest: Guest, timeout_s: float = 120) -> RoundReport:
    message, before = guest.expect("ROUND", timeout_s)
    return RoundReport(int(message.text), sums(before))


# ------------------------------------------------------------------ checking restored images


CHECK_SCRIPT = r"""
for serial in $(cat /etc/bt-disks); do
    dev=$(bt_disk "$serial")
    mkdir -p "/mnt/$serial"
    mount -t ext4 "$dev" "/mnt/$serial"   # replays the journal of a crash-consistent image
    cd "/mnt/$serial"
    bt_manifest "/mnt/$serial" "$serial"
    sha256sum -c -s "/expect/$serial.sha256" || bt_fail "$serial: sha256sum -c failed"
    newest=$(ls manifests | sort -t- -k2 -n | tail -n 1)
    [ "$newest" = "$(cat /expect/$serial.newest)" ] || bt_fail "$serial: newest manifest $newest"
    sha256sum -c -s "manifests/$newest" || bt_fail "$serial: its own $newest does not check out"
    for f in $(cat "/expect/$serial.show" 2>/dev/null); do bt_say SHOW "$serial $f $(cat $f)"; done
    cd /
    umount "/mnt/$serial"
    bt_say CHECKED "$serial"
done
"""


@dataclass(frozen=True)
class Expectation:
    """What a restored image must hold: exactly the files of ``manifest`` with its sha256,
    and the files ``show`` (whose content is reported, not compared); the writer's newest
    round manifest in it is ``newest_round``'s."""

    serial: str
    image: Path
    manifest: dict[str, str]
    newest_round: int
    show: tuple[str, ...] = ("./round",)


def check_images(kit: GuestKit, workdir: Path, expected: list[Expectation],
                 timeout_s: float = 180) -> dict[str, dict[str, str]]:
    """Boot a checking guest on writable copies of the images: it mounts each (replaying its
    journal), reports every file's sha256 (which must equal ``manifest`` exactly), runs
    ``sha256sum -c`` on the expected manifest and on the newest one in the image, and unmounts.
    Then each copy must pass ``e2fsck -fn`` here, and so must another copy of each image whose
    journal e2fsck replayed (so the images hold one instant, whatever the guest's kernel
    does). -> the SHOW values, by serial then path."""
    copies: list[Path] = []
    files: dict[str, bytes] = {}
    for e in expected:
        copy = workdir / f"check-{e.serial}.raw"
        subprocess.run(["cp", "--sparse=always", str(e.image), str(copy)], check=True,
                       timeout=60)
        copies.append(copy)
        files[f"expect/{e.serial}.sha256"] = "".join(
            f"{digest}  {path}\n" for path, digest in sorted(e.manifest.items())).encode()
        files[f"expect/{e.serial}.newest"] = f"round-{e.newest_round}.sha256\n".encode()
        files[f"expect/{e.serial}.show"] = "".join(f"{p}\n" for p in e.show).encode()
    drives = [Drive.image(e.serial, copy) for e, copy in zip(expected, copies, strict=True)]
    with Guest(kit, workdir, drives, CHECK_SCRIPT, files=files, name="checker") as guest:
        messages = guest.finish(timeout_s)
    seen = sums(messages)
    for e in expected:
        found = dict(seen.get(e.serial, {}))
        for path in e.show:
            if path not in e.manifest:
                assert found.pop(path, None) is not None, f"{e.serial}: no {path}"
        assert found == e.manifest, _manifest_difference(e.serial, e.manifest, found)
        assert Message("CHECKED", e.serial) in messages
    for e, copy in zip(expected, copies, strict=True):
        result = e2fsck(kit, copy, "-fn")
        assert result.returncode == 0, f"e2fsck -fn {e.serial} after the checking guest:\n" \
            f"{result.stdout}{result.stderr}"
        replayed = workdir / f"replayed-{e.serial}.raw"
        subprocess.run(["cp", "--sparse=always", str(e.image), str(replayed)], check=True,
                       timeout=60)
        result = e2fsck(kit, replayed, "-E", "journal_only", "-y")
        assert result.returncode in (0, 1), f"e2fsck -E journal_only {e.serial}:\n" \
            f"{result.stdout}{result.stderr}"
        result = e2fsck(kit, replayed, "-fn")
        assert result.returncode == 0, f"e2fsck -fn {e.serial} after e2fsck replayed its " \
            f"journal:\n{result.stdout}{result.stderr}"
        replayed.unlink()
    shown: dict[str, dict[str, str]] = {}
    for m in messages:
        if m.tag == "SHOW":
            serial, path, text = [*m.text.split(" ", 2), ""][:3]
            shown.setdefault(serial, {})[path] = text
    return shown


def _manifest_difference(serial: str, want: dict[str, str], got: dict[str, str]) -> str:
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    changed = sorted(p for p in set(want) & set(got) if want[p] != got[p])
    return (f"{serial}: the restored file system differs from what the writer reported: "
            f"missing {missing}, unexpected {extra}, different content {changed}")
