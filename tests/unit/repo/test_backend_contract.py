"""The backend contract (repo/backend.py), one suite run against every backend: the local
directory and S3 (a real SeaweedFS)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from blocktrail.repo import s3
from blocktrail.repo.backend import (
    Backend,
    BackendError,
    InvalidObjectName,
    ObjectExists,
    ObjectNotFound,
    PreconditionFailed,
    check_name,
)
from blocktrail.repo.localdir import LocalBackend
from blocktrail.repo.s3 import S3Backend
from s3server import BUCKET, SeaweedFS


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    made: Backend
    if request.param == "local":
        made = LocalBackend(str(tmp_path / "store"))
    else:
        server: SeaweedFS = request.getfixturevalue("s3_server")
        made = S3Backend(BUCKET, server.new_url("contract").partition(f"{BUCKET}/")[2],
                         server.options())
    try:
        yield made
    finally:
        made.close()


def test_create_is_create_only(backend: Backend) -> None:
    info = backend.create("packs/ab/x.pack", b"first")
    assert info.size == 5 and info.etag
    with pytest.raises(ObjectExists):
        backend.create("packs/ab/x.pack", b"second")
    assert backend.load("packs/ab/x.pack") == b"first"


def test_load_whole_and_ranges(backend: Backend) -> None:
    data = bytes(range(256)) * 64
    backend.create("index/a.idx", data)
    assert backend.load("index/a.idx") == data
    assert backend.load("index/a.idx", 100, 50) == data[100:150]
    assert backend.load("index/a.idx", len(data) - 10, 50) == data[-10:]  # fewer at the end
    assert backend.load("index/a.idx", 7) == data[7:]
    assert backend.load("index/a.idx", len(data) + 5, 10) == b""  # from past the end
    assert backend.load("index/a.idx", 0, 0) == b""
    with pytest.raises(ObjectNotFound):
        backend.load("index/missing.idx")
    with pytest.raises(ObjectNotFound):
        backend.load("index/missing.idx", 5, 0)  # no bytes asked: still no object
    with pytest.raises(ObjectNotFound):
        backend.load("packs/ab/missing.pack", 5, 0)
    with pytest.raises(ObjectNotFound):
        backend.info("index/missing.idx")


def test_a_range_of_a_pack_past_its_end_is_empty(backend: Backend) -> None:
    data = bytes(range(256)) * 64
    backend.create("packs/ab/y.pack", data)
    assert backend.load("packs/ab/y.pack", len(data) - 10, 50) == data[-10:]
    for offset in (len(data), len(data) + 5, 1 << 62, 1 << 63):
        assert backend.load("packs/ab/y.pack", offset, 50) == b""


def test_list_by_prefix_in_name_order(backend: Backend) -> None:
    for name in ("points/b.json", "points/a.json", "packs/00/p.pack", "packs/ff/q.pack",
                 "verify/a/1.json"):
        backend.create(name, name.encode())
    assert [i.name for i in backend.list("points/")] == ["points/a.json", "points/b.json"]
    assert [i.name for i in backend.list("packs/")] == ["packs/00/p.pack", "packs/ff/q.pack"]
    assert [(i.name, i.size) for i in backend.list("verify/a/")] == [("verify/a/1.json", 15)]
    assert backend.list("quarantine/") == []


def test_a_listing_of_many_pages_is_whole(backend: Backend) -> None:
    """A prefix of more names than a listing page holds (pages of 3 here, on S3) is listed
    page by page: every name once, in name order, with its size."""
    if isinstance(backend, S3Backend):
        backend.list_page = 3
    names = ["packs/0a.pack", *(f"packs/{f:02x}/{i}.pack" for f in (0, 7, 255)
                                for i in range(4)), "packs/7f/cd/deep.pack"]
    for name in [*reversed(names), "packsx/not-in-packs"]:
        backend.create(name, name.encode())
    listed = backend.list("packs/")
    assert [i.name for i in listed] == sorted(names)
    assert all(i.size == len(i.name) for i in listed)
    assert [i.name for i in backend.list("packs/07/")] == [f"packs/07/{i}.pack"
                                                            for i in range(4)]


def test_replace_only_the_version_read(backend: Backend) -> None:
    first = backend.create("leases/x.json", b"one")
    second = backend.replace("leases/x.json", b"two", first.etag)
    assert backend.load("leases/x.json") == b"two" and second.etag != first.etag
    with pytest.raises(PreconditionFailed):
        backend.replace("leases/x.json", b"three", first.etag)  # a stale version
    assert backend.load("leases/x.json") == b"two"
    backend.delete("leases/x.json")
    with pytest.raises(PreconditionFailed):
        backend.replace("leases/x.json", b"four", second.etag)  # gone


def test_delete_is_idempotent_and_conditional(backend: Backend) -> None:
    first = backend.create("leases/y.json", b"one")
    second = backend.replace("leases/y.json", b"two", first.etag)
    with pytest.raises(PreconditionFailed):
        backend.delete("leases/y.json", first.etag)
    backend.delete("leases/y.json", second.etag)
    with pytest.raises(ObjectNotFound):
        backend.load("leases/y.json")
    backend.delete("leases/y.json")  # gone already: nothing to do
    backend.delete("leases/y.json", second.etag)  # whatever version was named
    backend.delete("leases/never.json", first.etag)


def test_the_store_clock_dates_writes(backend: Backend) -> None:
    before = backend.now()
    backend.create("leases/z.json", b"x")
    info = backend.info("leases/z.json")
    assert before - 2 <= info.modified <= backend.now() + 2
    assert info.observed >= info.modified - 2  # both read off the store's clock


def test_concurrent_creates_of_one_name_one_wins(backend: Backend) -> None:
    results: list[str] = []

    def create(i: int) -> None:
        try:
            backend.create("leases/race.json", f"writer {i}".encode())
            results.append("won")
        except ObjectExists:
            results.append("exists")

    threads = [threading.Thread(target=create, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["exists"] * 11 + ["won"]


@pytest.mark.parametrize("bad", ["", "/a", "a/", "a//b", "../x", "a/./b", "a/..", ".hidden",
                                 "a b", "a\\b", "a\nb", "x" * 129, "é"])
def test_names_are_checked(backend: Backend, bad: str) -> None:
    with pytest.raises(InvalidObjectName):
        check_name(bad)
    with pytest.raises(InvalidObjectName):
        backend.create(bad, b"x")


def test_a_retried_create_of_the_same_bytes_counts_as_written(backend: Backend) -> None:
    if not isinstance(backend, S3Backend):
        pytest.skip("only a remote store retries requests")
    backend.create("packs/cd/r.pack", b"same bytes")
    original = backend.client.put_object
    calls: list[int] = []

    def lost_answer(**kwargs: object) -> object:  # the first attempt lands, its answer is lost
        calls.append(1)
        original(**{k: v for k, v in kwargs.items() if k != "IfNoneMatch"})
        return original(**kwargs)

    backend.client.put_object = lost_answer
    try:
        backend.create("packs/cd/s.pack", b"new bytes")  # landed once, then 412: it is ours
    finally:
        backend.client.put_object = original
    with pytest.raises(ObjectExists):  # other bytes under the name: not ours
        backend.create("packs/cd/r.pack", b"other bytes")
    assert backend.load("packs/cd/s.pack") == b"new bytes" and calls


def test_a_retried_replace_that_landed_counts_as_written(backend: Backend) -> None:
    """A replace whose first attempt lands but whose answer is lost is retried and refused
    (the version named is gone: it was replaced by that very attempt); the object holds the
    bytes written, so the replace succeeded. Another writer's bytes still refuse it."""
    if not isinstance(backend, S3Backend):
        pytest.skip("only a remote store retries requests")
    first = backend.create("leases/w.json", b"one")
    original = backend.client.put_object
    calls: list[int] = []

    def lost_answer(**kwargs: object) -> object:  # the first attempt lands, its answer is lost
        calls.append(1)
        original(**kwargs)
        return original(**kwargs)

    backend.client.put_object = lost_answer
    try:
        second = backend.replace("leases/w.json", b"two", first.etag)
    finally:
        backend.client.put_object = original
    assert calls and second.etag == backend.info("leases/w.json").etag
    assert backend.load("leases/w.json") == b"two"
    with pytest.raises(PreconditionFailed):  # a stale version, and other bytes: not ours
        backend.replace("leases/w.json", b"three", first.etag)
    backend.delete("leases/w.json")
    with pytest.raises(PreconditionFailed):  # gone
        backend.replace("leases/w.json", b"two", second.etag)


def test_leftovers_of_interrupted_writes(backend: Backend, tmp_path: Path) -> None:
    if isinstance(backend, LocalBackend):
        (Path(backend.root) / "packs" / "ab").mkdir(parents=True)
        (Path(backend.root) / "packs" / "ab" / "x.pack.tmp").write_bytes(b"half")
        assert backend.leftovers() == ["packs/ab/x.pack.tmp"]
        assert backend.list("packs/") == []  # never read as an object
        assert backend.delete_leftovers() == 1 and backend.leftovers() == []
    else:
        assert backend.leftovers() == [] and backend.delete_leftovers() == 0


def test_a_body_that_does_not_match_its_checksum_is_refused(
        s3_server: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every PUT carries its body's CRC32 and the server checks it: an upload cut short (a
    killed process) cannot leave an object behind, even where the payload is not signed (over
    HTTPS; SeaweedFS then keeps an empty object for a PUT cut off before its body). (A local
    create writes a temporary file and renames it: `test_leftovers_of_interrupted_writes`.)"""
    backend = S3Backend(BUCKET, s3_server.new_url("checksum").partition(f"{BUCKET}/")[2],
                        s3_server.options())
    crc32 = s3._crc32
    monkeypatch.setattr(s3, "_crc32", lambda body: crc32(body + b"x"))  # not the body's
    with pytest.raises(BackendError):
        backend.create("index/cut.idx", b"what was sent")
    with pytest.raises(ObjectNotFound):
        backend.info("index/cut.idx")
    monkeypatch.undo()
    backend.create("index/cut.idx", b"what was sent")
    assert backend.load("index/cut.idx") == b"what was sent"
    backend.close()
