"""The repository as a chunk source: every chunk of a point as stored, checked; a damaged chunk
or an unreachable repository named, never made up; the repository opened again after a failure;
a lease naming the point held (no forget of it, no prune sweep under it); a lazily opened
source for a disk that reopens."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from blocktrail.backup.chunksource import (
    RepositoryChunkSource,
    background_fetches,
    open_chunk_source,
)
from blocktrail.disk.restoring import ChunkUnavailable
from blocktrail.errors import CorruptMetadata
from blocktrail.repo import Repository
from blocktrail.repo.errors import PointNotFound, RepositoryNotFound
from blocktrail.repo.leases import list_leases
from instantkit import CS, damage_chunk, make_point, store_again
from s3server import TEST_PASSWORD


def test_every_chunk_and_hole_of_the_point(tmp_path: Path) -> None:
    point = make_point(tmp_path)
    source = RepositoryChunkSource(str(point.repo), point.id)
    try:
        assert (source.chunk_size, source.size_bytes) == (CS, len(point.content))
        assert source.holes() == [not any(point.chunk(i)) for i in range(32)]
        got = dict(source.fetch(list(range(32))))
        assert b"".join(got[i] for i in range(32)) == point.content
        assert source.describe() == {"repository": str(point.repo), "point": point.id,
                                     "chunk_size": CS}
        # the repeated chunk is fetched once, and nothing twice (the cache)
        distinct = {point.chunk(i) for i in point.data_chunks}
        assert source.fetched_chunks == len(distinct)
        again = dict(source.fetch(point.data_chunks[:3]))
        assert source.fetched_chunks == len(distinct)
        assert again[point.data_chunks[0]] == point.chunk(point.data_chunks[0])
        assert source.cached(range(32)) is not None
    finally:
        source.close()


def test_parallel_fetches_from_many_threads(tmp_path: Path) -> None:
    point = make_point(tmp_path, size=64 * CS, seed=3)
    source = RepositoryChunkSource(str(point.repo), point.id, cache_bytes=4 * CS)
    results: list[bool] = []

    def reader(offset: int) -> None:
        for _ in range(3):
            indexes = [(offset + k) % 64 for k in range(0, 64, 5)]
            got = dict(source.fetch(indexes))
            results.append(all(got[i] == point.chunk(i) for i in indexes))

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(6)]
    with background_fetches():
        threads.append(threading.Thread(target=lambda: reader(100)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    source.close()
    assert results and all(results)


def test_a_damaged_chunk_is_named_and_the_others_arrive(tmp_path: Path) -> None:
    point = make_point(tmp_path)
    unique = [i for i in point.data_chunks
              if sum(point.chunk(j) == point.chunk(i) for j in range(32)) == 1]
    bad = unique[2]
    damage_chunk(point, bad)
    source = RepositoryChunkSource(str(point.repo), point.id)
    try:
        got: dict[int, bytes] = {}
        with pytest.raises(ChunkUnavailable) as failure:
            for index, data in source.fetch(point.data_chunks):
                got[index] = data
        message = failure.value.message
        assert f"chunk {bad} (offset {bad * CS}) of restore point {point.id}" in message
        assert "does not match its digest" in message or "does not decompress" in message \
            or "authentication failed" in message  # an encrypted repository: the AEAD tag
        assert source.last_error == message and source.failures == 1
        assert bad not in got
        assert got == {i: point.chunk(i) for i in point.data_chunks if i != bad}
        with pytest.raises(ChunkUnavailable, match="quarantine"):  # its only copy is set aside
            list(source.fetch([bad]))
        store_again(point, bad)  # a later backup stored it again: found after a reopen
        time.sleep(1.1)  # the repository is opened again at most once a second
        assert dict(source.fetch([bad])) == {bad: point.chunk(bad)}
    finally:
        source.close()


def test_an_unreachable_repository_fails_fetches_until_it_is_back(tmp_path: Path) -> None:
    point = make_point(tmp_path)
    source = RepositoryChunkSource(str(point.repo), point.id, cache_bytes=0)
    try:
        first = point.data_chunks[0]
        assert dict(source.fetch([first])) == {first: point.chunk(first)}
        moved = tmp_path / "elsewhere"
        point.repo.rename(moved)
        with pytest.raises(ChunkUnavailable, match=f"chunk {first} .* repository "
                                                   f"{point.repo} is unreachable"):
            list(source.fetch([first]))
        moved.rename(point.repo)
        assert dict(source.fetch([first])) == {first: point.chunk(first)}
    finally:
        source.close()


def test_a_lease_naming_the_point_is_held_while_open(tmp_path: Path) -> None:
    point = make_point(tmp_path)
    source = RepositoryChunkSource(str(point.repo), point.id)
    with Repository.open(point.repo, password=TEST_PASSWORD) as repo:
        held = list_leases(repo.backend)
        assert [(lease.purpose, lease.base) for lease in held] == [("writer", point.id)]
        source.close()
        assert list_leases(repo.backend) == []
        repo.prune()


def test_a_missing_point_or_repository_is_named(tmp_path: Path) -> None:
    point = make_point(tmp_path)
    with pytest.raises(PointNotFound, match="no restore point 'nope'"):
        RepositoryChunkSource(str(point.repo), "nope")
    with pytest.raises(RepositoryNotFound):
        RepositoryChunkSource(str(tmp_path / "none"), point.id)


def test_a_lazy_source_opens_without_its_repository(tmp_path: Path) -> None:
    point = make_point(tmp_path)
    moved = tmp_path / "elsewhere"
    point.repo.rename(moved)
    source = open_chunk_source({"repository": str(point.repo), "point": point.id,
                                "chunk_size": CS})
    try:
        assert source.chunk_size == CS
        with pytest.raises(ChunkUnavailable, match="unreachable"):
            list(source.fetch([0]))
        moved.rename(point.repo)
        index = point.data_chunks[1]
        assert dict(source.fetch([index])) == {index: point.chunk(index)}
    finally:
        source.close()
    with pytest.raises(CorruptMetadata):
        open_chunk_source({"point": point.id})
    wrong = open_chunk_source({"repository": str(point.repo), "point": point.id,
                               "chunk_size": 2 * CS})
    with pytest.raises(ChunkUnavailable, match="not 131072 as recorded"):
        list(wrong.fetch([0]))
    wrong.close()


def test_close_with_fetches_queued_ends_them_and_lets_the_repository_go(tmp_path: Path) -> None:
    """Closed while a reader's fetches and read-ahead are queued behind a slow read: the reader
    learns it ("closed") instead of waiting forever, and the repository and its lease are
    closed once the last fetch ends."""
    point = make_point(tmp_path, size=64 * CS, seed=3)
    source = RepositoryChunkSource(str(point.repo), point.id, threads=1, background_threads=1)
    conn = source._conn
    assert conn is not None and conn._lease is not None
    lease = conn._lease
    source.digests(0, 64)
    gate = threading.Event()
    read_chunk = conn.repo.read_chunk
    conn.repo.read_chunk = lambda *a, **k: (gate.wait(10), read_chunk(*a, **k))[1]  # type: ignore[method-assign]
    outcome: list[BaseException | int] = []

    def reader() -> None:
        try:
            outcome.append(len(list(source.fetch(point.data_chunks))))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    source.prefetch(range(64))  # queued on the background pool
    time.sleep(0.3)
    source.close()
    gate.set()
    thread.join(10)
    assert not thread.is_alive()
    assert isinstance(outcome[0], ChunkUnavailable) and "closed" in outcome[0].message
    deadline = time.monotonic() + 10
    while conn._users:
        assert time.monotonic() < deadline, conn._users
        time.sleep(0.01)
    assert lease.lost  # released with the repository
    with Repository.open(point.repo, password=TEST_PASSWORD) as repo:
        assert list_leases(repo.backend) == []
    with pytest.raises(ChunkUnavailable, match="closed"):
        list(source.fetch(point.data_chunks[:1]))


def test_what_an_event_loop_asks_never_waits_for_an_opening(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """`cached(open_repository=False)` and `prefetch` run on the NBD server's event loop: while
    another thread opens the repository again (slow: a key derivation, an index load on S3),
    they answer at once (None: not cached; no read-ahead)."""
    from blocktrail.backup import chunksource

    point = make_point(tmp_path, size=16 * CS, seed=3)
    source = RepositoryChunkSource(str(point.repo), point.id)
    try:
        first = point.data_chunks[0]
        list(source.fetch([first]))
        assert source.cached([first], open_repository=False) is not None
        opening = threading.Event()
        real_open = chunksource.Repository.open

        def slow_open(*args: object, **kwargs: object) -> Repository:
            opening.set()
            time.sleep(2)
            return real_open(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(chunksource.Repository, "open", slow_open)
        source._reopen = True  # as after a failure, long enough ago
        assert source._conn is not None
        source._conn.opened -= 60
        worker = threading.Thread(target=lambda: list(source.fetch([point.data_chunks[1]])))
        worker.start()
        assert opening.wait(5)
        started = time.monotonic()
        assert source.cached([first], open_repository=False) is None
        source.prefetch(range(16))
        assert time.monotonic() - started < 1.0  # the opening takes 2 s
        worker.join(10)
    finally:
        source.close()


def test_a_lease_that_ran_out_is_taken_again(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine slept past the lease (or the store was away): the point was no longer kept
    from a forget and prune. The next fetch opens the repository again, with a new lease."""
    from blocktrail.repo import leases

    point = make_point(tmp_path, size=8 * CS, seed=3)
    source = RepositoryChunkSource(str(point.repo), point.id, cache_bytes=0)
    try:
        assert source._conn is not None and source._conn._lease is not None
        old = source._conn._lease
        real = leases.boot_clock
        monkeypatch.setattr(leases, "boot_clock", lambda: real() + 10_000)  # slept
        assert old.lost
        index = point.data_chunks[0]
        assert dict(source.fetch([index]))[index] == point.chunk(index)
        assert source._conn is not None and source._conn._lease is not None
        assert source._conn._lease is not old and not source._conn._lease.lost
        with Repository.open(point.repo, password=TEST_PASSWORD) as repo:
            bases = [r.base for r in list_leases(repo.backend)]
        assert point.id in bases
    finally:
        source.close()
