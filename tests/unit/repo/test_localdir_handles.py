"""The local backend keeps a bounded cache of open pack files for reads on many threads: a
handle pushed out of the cache is closed by its last reader, never under one (its descriptor
number would be reused by the next file opened, and a read would return another pack's bytes,
which then fail their check and go to quarantine although intact). A big range is read past
the page cache (it is read once: a restore's run, a pack checked whole)."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from blocktrail.fileio import DIRECT_MIN_BYTES, FileHandle, pread_direct
from blocktrail.repo import layout, localdir
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


def test_a_big_range_of_a_pack_is_read_past_the_page_cache_as_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    direct: list[int] = []

    def counted(handle: FileHandle, count: int, offset: int) -> bytes | memoryview:
        direct.append(count)
        return pread_direct(handle, count, offset)

    monkeypatch.setattr(localdir, "pread_direct", counted)
    backend = LocalBackend(str(tmp_path))
    pack = random.Random(6).randbytes(3 * DIRECT_MIN_BYTES + 777)
    backend.create(layout.pack("ab" * 16), pack)
    for offset, length, past_cache in [(0, None, True), (5, DIRECT_MIN_BYTES, True),
                                       (DIRECT_MIN_BYTES, 2 * DIRECT_MIN_BYTES + 9999, True),
                                       (3, DIRECT_MIN_BYTES - 1, False), (100, 2000, False)]:
        direct.clear()
        data = backend.load(layout.pack("ab" * 16), offset, length)
        end = len(pack) if length is None else offset + length
        assert type(data) is bytes and data == pack[offset:end]
        assert bool(direct) == past_cache
    backend.close()
