"""Real concurrency: threads write, zero, trim and read while a large snapshot is consolidated.

Afterwards the content equals a model replayed in the order the writes reached the disk, and a
query since the snapshot's change ID reports every granule written during the consolidation:
the KB 2136854 scenario, with real threads on real files.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

from blocktrail.disk import Disk

MiB = 1 << 20
GRANULARITY = 4096
SIZE = 128 * MiB


def test_writes_during_consolidation_are_kept_and_tracked(tmp_path: Path) -> None:
    disk = Disk.create(tmp_path / "disk", SIZE, GRANULARITY)
    rng = random.Random(42)
    model = bytearray(SIZE)
    chunk = rng.randbytes(MiB)
    for offset in range(0, 64 * MiB, MiB):  # 64 MiB in the base
        disk.pwrite(chunk, offset)
        model[offset : offset + MiB] = chunk
    first = disk.create_snapshot("before")
    for _ in range(48):  # 48 MiB scattered into the delta that will be merged
        offset = rng.randrange(0, SIZE - MiB) & ~4095
        data = rng.randbytes(MiB)
        disk.pwrite(data, offset)
        model[offset : offset + MiB] = data
    snap = disk.create_snapshot("big")
    frozen = bytes(model)

    order = threading.Lock()  # the model is updated in the order the disk applied the writes
    written: set[int] = set()
    writes_done = [0]
    stop = threading.Event()
    errors: list[BaseException] = []

    def guest(seed: int) -> None:
        r = random.Random(seed)
        try:
            while not stop.is_set():
                length = r.choice((512, 4096, 10000, 65536, 300000))
                offset = r.randrange(0, SIZE - length)
                kind = r.random()
                with order:
                    if kind < 0.8:
                        data = r.randbytes(length)
                        disk.pwrite(data, offset)
                    else:
                        data = bytes(length)
                        (disk.zero if kind < 0.9 else disk.trim)(length, offset)
                    model[offset : offset + length] = data
                    written.update(range(offset // GRANULARITY,
                                         (offset + length - 1) // GRANULARITY + 1))
                    writes_done[0] += 1
                probe = r.randrange(0, SIZE - 4096)
                disk.pread(4096, probe)  # readers run too
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=guest, args=(seed,)) for seed in range(3)]
    for t in threads:
        t.start()
    steps = 0
    for name in ("before", "big"):  # merges 48 MiB into the base, then the live top into it
        consolidation = disk.begin_remove_snapshot(name)
        while not consolidation.step(max_clusters=16):
            steps += 1
            seen = writes_done[0]
            while writes_done[0] < seen + 3 and not errors:  # let the guests in between steps
                time.sleep(0.0005)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors
    assert steps > 10, "the consolidation should take many steps"
    assert len(written) > 100, "the guests should have written during the consolidation"
    assert disk.snapshots == []
    for offset in range(0, SIZE, 8 * MiB):
        assert disk.pread(8 * MiB, offset) == bytes(model[offset : offset + 8 * MiB]), offset

    reported: set[int] = set()
    start = 0
    while start < SIZE:
        info = disk.query_changed_areas(snap.change_id, start)
        for e in info.changed_areas:
            reported.update(range(e.offset // GRANULARITY, (e.end - 1) // GRANULARITY + 1))
        start = info.end
    assert written - reported == set(), "writes made during consolidation were not tracked"
    assert reported - written == set(), "no crash happened: the answer is exact"
    differs_from_first = {g for g in range(SIZE // GRANULARITY)
                          if frozen[g * GRANULARITY : (g + 1) * GRANULARITY]
                          != model[g * GRANULARITY : (g + 1) * GRANULARITY]}
    assert differs_from_first <= reported
    since_first = disk.query_changed_areas(first.change_id)
    assert since_first.changed_bytes >= len(written) * GRANULARITY
    disk.close()
    with Disk.open(tmp_path / "disk") as reopened:
        assert reopened.pread(MiB, 0) == bytes(model[:MiB])
