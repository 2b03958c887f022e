"""A damaged or hostile disk.json: a typed error at open that changes nothing, or (for a tracker
history that cannot be trusted) a new epoch; never a raw KeyError, never a query that spins."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import pytest

from blocktrail.disk import Disk
from blocktrail.errors import CorruptMetadata, StaleChangeId
from blocktrail.simfileio import SimulatedFileIO
from blocktrail.tracking import ChangeTracker
from blocktrail.tracking.tracker import EpochRecord

PATH = "/sim/disk"
META = f"{PATH}/disk.json"

Edit = Callable[[dict[str, Any]], None]


def _closed_disk(fs: SimulatedFileIO) -> list[str]:
    """A closed disk with two snapshots and a revert (two epochs, the newer inheriting);
    -> its change IDs."""
    disk = Disk.create(PATH, 1 << 20, 4096, cluster_size=4096, fileio=fs)
    ids = [disk.create_snapshot("s1").change_id]
    disk.pwrite(b"b" * 4096, 65536)
    ids.append(disk.create_snapshot("s2").change_id)
    disk.revert_to_snapshot("s1")
    disk.close()
    return ids


def _edit(fs: SimulatedFileIO, edit: Edit) -> bytes:
    meta = json.loads(fs.read_file(META))
    edit(meta)
    data = json.dumps(meta).encode()
    fs.replace_atomic(META, data)
    return data


def _set(path: str, value: Any) -> Edit:
    def edit(meta: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for key in parents:
            meta = meta[int(key)] if isinstance(meta, list) else meta[key]
        meta[int(last) if isinstance(meta, list) else last] = value
    return edit


def _drop(path: str) -> Edit:
    def edit(meta: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for key in parents:
            meta = meta[key]
        del meta[last]
    return edit


DAMAGE = {
    "granularity 0": _set("granularity", 0),
    "granularity not a power of two": _set("granularity", 3000),
    "cluster size 0": _set("cluster_size", 0),
    "negative size": _set("size_bytes", -5),
    "size past 2^32 granules": _set("size_bytes", 4096 << 32 | 1),
    "tracker without epochs": _drop("tracker.epochs"),
    "tracker with no epoch": _set("tracker.epochs", []),
    "tracker without seq": _drop("tracker.seq"),
    "tracker with a negative seq": _set("tracker.seq", -1),
    "tracker without intervals": _drop("tracker.intervals"),
    "an interval outside the disk": _set("tracker.intervals", [[1, "../../etc/passwd"]]),
    "an interval past seq": _set("tracker.intervals", [[99, "interval-00000000-99.roar"]]),
    "an interval name with a NUL": _set("tracker.intervals", [[1, "interval-\u0000.roar"]]),
    "an interval name not as written": _set("tracker.intervals", [[1, "interval-x/..roar"]]),
    "no layer": _set("layers", []),
    "a layer ID with a NUL": _set("layers.0.id", "ab\u0000"),
    "a layer ID with a slash": _set("layers.0.id", "../../etc/passwd"),
    "a layer ID not a string": _set("layers.0.id", 5),
    "a layer listed twice": lambda meta: meta["layers"].append(dict(meta["layers"][-1])),
    "a layer of unknown kind": _set("layers.0.kind", "qcow2"),
    "a delta's visible_below not a number": _set("layers.1.visible_below", "zz"),
    "a delta's visible_below missing": _set("layers.1.visible_below", None),
    "a delta's visible_below negative": _set("layers.1.visible_below", -1),
    "intent region 0": _set("tracker.intent_region_bytes", 0),
    "an epoch not an object": _set("tracker.epochs", [5]),
}


@pytest.mark.parametrize("edit", DAMAGE.values(), ids=DAMAGE.keys())
def test_damaged_disk_json_is_a_typed_error_that_changes_nothing(edit: Edit) -> None:
    fs = SimulatedFileIO()
    _closed_disk(fs)
    damaged = _edit(fs, edit)
    with pytest.raises(CorruptMetadata, match=r"disk\.json|disk metadata"):
        Disk.open(PATH, fileio=fs)
    assert fs.read_file(META) == damaged


def _finishes(run: Callable[[], None]) -> None:
    """Run on a thread of its own, which must finish: a query once spun forever on a loop (a
    daemon thread, so such a failing test still ends)."""
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "it did not finish"


def _open_and_query(fs: SimulatedFileIO, ids: list[str]) -> list[object]:
    """Open the disk and query every ID; -> the answers or errors, then the epoch's reason."""
    outcome: list[object] = []

    def run() -> None:
        with Disk.open(PATH, fileio=fs) as disk:
            for change_id in ids:
                try:
                    outcome.append(disk.query_changed_areas(change_id))
                except StaleChangeId as exc:
                    outcome.append(exc)
            outcome.append(disk.tracker.epochs[-1].reason)

    _finishes(run)
    return outcome


@pytest.mark.parametrize("loop", ["itself", "two epochs"])
def test_epochs_inheriting_in_a_loop_start_a_new_epoch(loop: str) -> None:
    fs = SimulatedFileIO()
    ids = _closed_disk(fs)

    def make_loop(meta: dict[str, Any]) -> None:
        first, second = meta["tracker"]["epochs"]  # the second inherits the first (a revert)
        if loop == "itself":
            second["inherits"] = [second["epoch"], 1]
        else:
            first["inherits"] = [second["epoch"], 1]

    _edit(fs, make_loop)
    *answers, reason = _open_and_query(fs, ids)
    assert all(isinstance(a, StaleChangeId) for a in answers)
    assert "tracker history damaged" in str(reason)


def test_resolve_refuses_a_loop_it_meets() -> None:
    fs = SimulatedFileIO()
    fs.makedirs(PATH)
    tracker = ChangeTracker.start(fs, PATH, 4096, 1 << 20, "test")
    epoch = tracker.epoch
    tracker._epochs[-1] = EpochRecord(epoch, "now", "test", 1, (epoch, 0))
    raised: list[BaseException] = []

    def run() -> None:
        try:
            tracker.resolve("00000000-0000-4000-8000-000000000000/0")
        except CorruptMetadata as exc:
            raised.append(exc)

    _finishes(run)
    assert raised and "inherit in a loop" in str(raised[0])


def test_a_frozen_layer_seeing_more_than_the_shrunk_disk_is_not_damage() -> None:
    """A frozen delta keeps the size it saw as the top: after a shrink its visible_below lies
    past size_bytes, and the disk still opens."""
    fs = SimulatedFileIO()
    disk = Disk.create(PATH, 1 << 20, 4096, cluster_size=4096, fileio=fs)
    disk.create_snapshot("s1")
    disk.create_snapshot("s2")
    disk.resize(1 << 19)
    disk.close()
    layers = json.loads(fs.read_file(META))["layers"]
    assert layers[1]["visible_below"] == 1 << 20 and layers[2]["visible_below"] == 1 << 19
    Disk.open(PATH, fileio=fs).close()
