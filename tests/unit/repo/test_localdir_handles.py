"""The local backend keeps a bounded cache of open pack files for reads on many threads: a
handle pushed out of the cache is closed by its last reader, never under one (its descriptor
number would be reused by the next file opened, and a read would return another pack's bytes,
which then fail their check and go to quarantine although intact)."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from blocktrail.repo import layout
from blocktrail.repo.localdir import _HANDLES, LocalBackend


def test_concurrent_reads_of_more_packs_than_handles_read_the_right_bytes(
        tmp_path: Path) -> None:
    backend = LocalBackend(str(tmp_path))
    packs = {f"{i:032x}": bytes([i % 251]) * (4096 + i) for i in range(2 * _HANDLES + 8)}
    for pack_id, data in packs.items():
        backend.create(layout.pack(pack_id), data)
    rng = random.Random(5)
    reads = [rng.choice(list(packs)) for _ in range(6000)]

    def read(pack_id: str) -> bool:
        return backend.load(layout.pack(pack_id), 100, 2000) == packs[pack_id][100:2100]

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(read, reads))
    backend.close()
