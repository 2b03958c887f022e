"""A frozen layer's allocation is looked up once and kept; the kept answer is never stale.

After every step of random workloads (writes, trims, snapshots, removals merging into frozen
layers, reverts, resizes, reopens) the allocated areas of the live disk and of every snapshot
equal what the layers hold, recomputed from their files and maps without any cache.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from blocktrail.disk import Disk
from blocktrail.disk.layers import BaseLayer, ClusterState

SIZE = 4 << 20
G = 64 * 1024


def _answer(disk: Disk, snapshot: str | None) -> set[int]:
    size = disk.open_snapshot(snapshot).size_bytes if snapshot else disk.size_bytes
    out: set[int] = set()
    start = 0
    while start < size:
        info = disk.query_changed_areas("*", start, snapshot)
        for e in info.changed_areas:
            out.update(range(e.offset // G, (e.end - 1) // G + 1))
        start = info.end
    return out


def _recomputed(disk: Disk, snapshot: str | None) -> set[int]:
    layers = disk._view_layers(disk._resolve(snapshot))
    size = disk.open_snapshot(snapshot).size_bytes if snapshot else disk.size_bytes
    out: set[int] = set()
    for layer in layers:
        if isinstance(layer, BaseLayer):
            for e in layer.data.data_extents():
                out.update(range(e.offset // G, (e.end - 1) // G + 1))
        else:
            for cluster, state in list(layer.states.items()):
                if state is ClusterState.DATA:
                    lo = cluster * layer.cluster_size
                    out.update(range(lo // G, (lo + layer.cluster_size - 1) // G + 1))
    return {g for g in out if g * G < size}


def _check(disk: Disk) -> None:
    for snapshot in [None, *(s.name for s in disk.snapshots)]:
        assert _answer(disk, snapshot) == _recomputed(disk, snapshot), snapshot


@pytest.mark.parametrize("seed", range(6))
def test_cached_allocation_is_never_stale(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    path = tmp_path / "d"
    disk = Disk.create(path, SIZE, G, cluster_size=G)
    n = 0
    try:
        for _ in range(60):
            step = rng.random()
            names = [s.name for s in disk.snapshots]
            if step < 0.35:
                length = rng.randrange(1, 300_000)
                disk.pwrite(rng.randbytes(length), rng.randrange(0, disk.size_bytes - length))
            elif step < 0.45:
                length = rng.randrange(G, 4 * G)
                disk.trim(length, rng.randrange(0, disk.size_bytes - length) // G * G)
            elif step < 0.62:
                n += 1
                disk.create_snapshot(f"s{n}")
            elif step < 0.77 and names:
                removal = disk.begin_remove_snapshot(rng.choice(names))
                while not removal.step(max_clusters=2):
                    _check(disk)  # between merge steps too
                    length = rng.randrange(1, 100_000)
                    disk.pwrite(rng.randbytes(length),
                                rng.randrange(0, disk.size_bytes - length))
            elif step < 0.84 and names:
                disk.revert_to_snapshot(rng.choice(names))
            elif step < 0.92:
                disk.resize(rng.choice((SIZE // 2 + 4096, SIZE, SIZE + 3 * G)))
            else:
                disk.close()
                disk = Disk.open(path)
            _check(disk)
    finally:
        disk.close()
