"""The one name grammar (names.py) against the rules as docs/names.md states them, and hostile
names through the library: a disk, a registry (disks, VMs, VM snapshots), an NBD catalog. A
refused name changes nothing; an accepted one comes back unchanged, also after a reopen."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from blocktrail.disk import Disk
from blocktrail.errors import InvalidArgument, SnapshotExists
from blocktrail.host.exports import DiskCatalog
from blocktrail.host.registry import DiskRegistry
from blocktrail.names import (
    check_disk_name,
    check_snapshot_name,
    is_valid_disk_name,
    is_valid_snapshot_name,
    legacy_snapshot_name,
)
from names_strategies import HOSTILE, TRICKY_VALID, hostile_names

MiB = 1 << 20
SHARED = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
_BAD_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def snapshot_rule(name: str) -> bool:
    """docs/names.md, written out again: 1-128 printable characters; no '/' or '@'; no control
    or format characters (nor any other non-printable one); no spaces at either end; not '.'
    or '..'."""
    return (1 <= len(name) <= 128 and "/" not in name and "@" not in name
            and name not in (".", "..") and not name[0].isspace() and not name[-1].isspace()
            and all(unicodedata.category(ch) not in _BAD_CATEGORIES
                    and (ch == " " or unicodedata.category(ch) != "Zs") for ch in name))


def disk_rule(name: str) -> bool:
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
    return 1 <= len(name) <= 64 and set(name) <= allowed and name[0].isascii() and \
        name[0].isalnum()


@given(name=hostile_names())
@settings(max_examples=2000)
def test_the_grammar_is_the_documented_rule(name: str) -> None:
    assert is_valid_snapshot_name(name) == snapshot_rule(name), name
    assert is_valid_disk_name(name) == disk_rule(name), name
    if not snapshot_rule(name):
        with pytest.raises(InvalidArgument) as refused:
            check_snapshot_name(name)
        shown = refused.value.message
        assert shown.isprintable() and len(shown) < 400  # no terminal escapes, not endless
    if not disk_rule(name):
        with pytest.raises(InvalidArgument):
            check_disk_name(name)


def test_the_lists_say_what_they_mean() -> None:
    assert all(snapshot_rule(n) for n in TRICKY_VALID)
    assert not any(snapshot_rule(n) for n in HOSTILE)


@given(name=hostile_names())
@settings(max_examples=500)
def test_a_legacy_name_becomes_a_valid_unique_one(name: str) -> None:
    taken = {"a", "\\ud800"}
    new = legacy_snapshot_name(name, taken)
    assert is_valid_snapshot_name(new) and new not in taken


@given(name=hostile_names())
@settings(max_examples=200, deadline=None, suppress_health_check=SHARED)
def test_a_disk_takes_a_valid_name_whole_and_nothing_else(
        name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("disk") / "d0"
    with Disk.create(path, MiB) as disk:
        before = sorted(os.listdir(path)), disk.current_change_id
        if not is_valid_snapshot_name(name):
            with pytest.raises(InvalidArgument):
                disk.create_snapshot(name)
            assert (sorted(os.listdir(path)), disk.current_change_id) == before
            assert disk.snapshots == []
            return
        disk.create_snapshot(name)
        with pytest.raises(SnapshotExists):
            disk.create_snapshot(name)
    with Disk.open(path) as disk:
        assert [s.name for s in disk.snapshots] == [name]
        catalog = DiskCatalog.of({"d0": disk})
        assert catalog.target(f"d0@{name}") is not None
        assert f"d0@{name}" in catalog.names()


@given(name=hostile_names())
@settings(max_examples=100, deadline=None, suppress_health_check=SHARED)
def test_a_registry_refuses_bad_names_and_changes_nothing(
        name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    data = tmp_path_factory.mktemp("host")
    registry = DiskRegistry(str(data))
    try:
        registry.create("d0", MiB, 4096)
        registry.define_vm("vm1", ["d0"])

        def files() -> list[tuple[str, int]]:
            return sorted((os.path.relpath(os.path.join(root, f), data),
                           os.stat(os.path.join(root, f)).st_mtime_ns)
                          for root, _, names in os.walk(data) for f in names
                          if f != "host.lock")

        before = files()
        attempts = [
            (is_valid_disk_name(name), lambda: registry.create(name, MiB, 4096)),
            (is_valid_disk_name(name), lambda: registry.define_vm(name, ["d0"])),
            (is_valid_disk_name(name), lambda: registry.define_vm("vm2", [name])),
            (is_valid_snapshot_name(name), lambda: registry.vm_snapshot("vm1", name)),
        ]
        for valid, attempt in attempts:
            if valid or name in ("d0", "vm1"):
                continue
            with pytest.raises(InvalidArgument):
                attempt()
            assert files() == before, name
        if is_valid_disk_name(name) and name != "d0":
            registry.create(name, MiB, 4096)
            assert name in registry.names()
            assert Path(data / "disks" / name / "disk.json").exists()
    finally:
        registry.close()
