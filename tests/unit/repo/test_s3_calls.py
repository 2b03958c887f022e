"""S3 calls through the boto3 client against scripted answers (botocore's Stubber): answers a
real server gives rarely or only under load (a listing cut short, a conditional request in
conflict, a write whose answer was lost). (The real server's answers are the backend contract
suite's, test_backend_contract.py, run on SeaweedFS.)"""

from __future__ import annotations

import datetime
import email.utils
import hashlib
from collections.abc import Iterator

import botocore.utils
import pytest
from botocore.stub import Stubber
from hypothesis import given
from hypothesis import strategies as st

from blocktrail.repo import s3, s3reads
from blocktrail.repo.backend import BackendUnavailable, ObjectExists
from blocktrail.repo.s3 import S3Backend
from blocktrail.repo.s3options import S3Options
from scriptedhttp import Script, serving

NOW = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)


@pytest.fixture
def stubbed(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[S3Backend, Stubber]]:
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "calls-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "calls-secret")
    monkeypatch.setattr(s3reads, "pause", lambda attempt: None)
    backend = S3Backend("bucket", "pre", S3Options(endpoint="http://127.0.0.1:9",
                                                   region="us-east-1", max_attempts=3))
    with Stubber(backend.client) as stubber:
        yield backend, stubber
        stubber.assert_no_pending_responses()
    backend.close()


def _page(*names: str, truncated: bool = False, token: str | None = None) -> dict[str, object]:
    page: dict[str, object] = {
        "IsTruncated": truncated, "KeyCount": len(names),
        "Contents": [{"Key": f"pre/{name}", "Size": 1, "LastModified": NOW, "ETag": '"e"'}
                     for name in names]}
    if token is not None:
        page["NextContinuationToken"] = token
    return page


def test_a_listing_is_followed_through_its_pages(stubbed: tuple[S3Backend, Stubber]) -> None:
    backend, stubber = stubbed
    stubber.add_response("list_objects_v2", _page("packs/b", truncated=True, token="t1"),
                         {"Bucket": "bucket", "Prefix": "pre/packs/"})
    stubber.add_response("list_objects_v2", _page("packs/a"),
                         {"Bucket": "bucket", "Prefix": "pre/packs/", "ContinuationToken": "t1"})
    assert [i.name for i in backend.list("packs/")] == ["packs/a", "packs/b"]


@pytest.mark.parametrize("second", [None, "t1"])
def test_a_listing_cut_short_is_never_taken_for_whole(
        stubbed: tuple[S3Backend, Stubber], second: str | None) -> None:
    """A page marked truncated with no token to go on (or one that repeats a token: a loop)
    fails: taken for the whole listing, what it lacks would count as lost (a pack's objects
    missing, its index entries dropped by a prune)."""
    backend, stubber = stubbed
    stubber.add_response("list_objects_v2", _page("packs/a", truncated=True, token="t1"),
                         {"Bucket": "bucket", "Prefix": "pre/packs/"})
    stubber.add_response("list_objects_v2", _page("packs/b", truncated=True, token=second),
                         {"Bucket": "bucket", "Prefix": "pre/packs/", "ContinuationToken": "t1"})
    with pytest.raises(BackendUnavailable, match="cut the listing short"):
        backend.list("packs/")


@pytest.mark.parametrize("date", ["not a date", "Mon, 32 Jan 2025 00:00:00 GMT"])
def test_a_date_header_that_is_no_date_is_a_clear_error(
        stubbed: tuple[S3Backend, Stubber], date: str) -> None:
    """The store's clock comes from its Date header (lease expiry compares it with the
    objects' times): one that is no date is a reply that cannot be read (exit 10), not an
    internal error, and no lease is judged by it."""
    backend, stubber = stubbed
    page = {**_page("packs/a"), "ResponseMetadata": {"HTTPHeaders": {"date": date}}}
    stubber.add_response("list_objects_v2", page, {"Bucket": "bucket", "Prefix": "pre/packs/"})
    with pytest.raises(BackendUnavailable, match="Date header: the store's reply cannot be read"):
        backend.list("packs/")


@pytest.mark.parametrize(("reply", "missing"), [({"ContentLength": 1}, "LastModified"),
                                                 ({"LastModified": NOW}, "ContentLength")])
def test_an_object_s_information_without_its_size_or_time_is_a_clear_error(
        stubbed: tuple[S3Backend, Stubber], reply: dict[str, object], missing: str) -> None:
    backend, stubber = stubbed
    stubber.add_response("head_object", reply, {"Bucket": "bucket", "Key": "pre/leases/a"})
    with pytest.raises(BackendUnavailable, match=f"reply cannot be read \\(no {missing}\\)"):
        backend.info("leases/a")


def _put(body: bytes) -> dict[str, object]:
    return {"ETag": f'"{hashlib.md5(body).hexdigest()}"'}


def _conflict(stubber: Stubber, operation: str = "put_object") -> None:
    stubber.add_client_error(operation, service_error_code="ConditionalRequestConflict",
                             http_status_code=409, service_message="A conflicting conditional "
                             "operation is currently in progress against this resource.")


def _head_missing(stubber: Stubber) -> None:
    stubber.add_client_error("head_object", service_error_code="404", http_status_code=404)


def test_a_conditional_write_in_conflict_is_retried(
        stubbed: tuple[S3Backend, Stubber]) -> None:
    """409 ConditionalRequestConflict (AWS: another conditional write or delete of the object
    was under way) is retried, never taken for "exists already" when nothing exists."""
    backend, stubber = stubbed
    _conflict(stubber)
    stubber.add_response("put_object", _put(b"data"))
    assert backend.create("points/p.json", b"data").etag == _put(b"data")["ETag"]
    for _ in range(3):
        _conflict(stubber)
    with pytest.raises(BackendUnavailable, match=r"ConditionalRequestConflict.*under way"):
        backend.create("points/p.json", b"data")


def test_a_create_refused_for_an_object_gone_since_is_retried(
        stubbed: tuple[S3Backend, Stubber]) -> None:
    """412 for a name taken, and then no object there (deleted meanwhile): the name is free,
    the create is made again rather than reported as exists."""
    backend, stubber = stubbed
    stubber.add_client_error("put_object", service_error_code="PreconditionFailed",
                             http_status_code=412)
    _head_missing(stubber)
    stubber.add_response("put_object", _put(b"data"))
    assert backend.create("points/p.json", b"data").size == 4
    for _ in range(3):
        stubber.add_client_error("put_object", service_error_code="PreconditionFailed",
                                 http_status_code=412)
        _head_missing(stubber)
    with pytest.raises(ObjectExists):  # taken at every attempt: taken
        backend.create("points/p.json", b"data")


def test_a_put_signs_its_headers_and_its_crc32_but_not_its_body(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Over plain HTTP boto3 would hash every byte of a body into the signature (a fifth of an
    upload's time): the body goes unsigned, guarded by its CRC32, which the signature covers
    and the server checks (s3.py)."""
    import base64
    import zlib

    from botocore.awsrequest import AWSResponse

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "calls-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "calls-secret")
    backend = S3Backend("bucket", "pre", S3Options(endpoint="http://127.0.0.1:9",
                                                   region="us-east-1", max_attempts=1))
    sent: list[dict[str, str]] = []

    class Raw:
        def stream(self) -> Iterator[bytes]:
            yield b""

    def answer(request: object, **_: object) -> AWSResponse:
        sent.append({k.lower(): v.decode() if isinstance(v, bytes) else v
                     for k, v in request.headers.items()})  # type: ignore[attr-defined]
        return AWSResponse(request.url, 200, {"ETag": '"e"'}, Raw())  # type: ignore[attr-defined]

    backend.client.meta.events.register("before-send.s3.PutObject", answer)
    body = bytes(range(256)) * 64
    try:
        backend.create("packs/ab/x", body)
    finally:
        backend.close()
    [headers] = sent
    assert headers["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
    crc = base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode()
    assert headers["x-amz-checksum-crc32"] == crc
    signed = headers["authorization"].split("SignedHeaders=")[1].split(",")[0].split(";")
    assert {"x-amz-checksum-crc32", "x-amz-content-sha256", "if-none-match"} <= set(signed)


@given(st.datetimes(min_value=datetime.datetime(1970, 1, 2), timezones=st.just(datetime.UTC)),
       st.sampled_from(["iso-z", "iso-offset", "iso-no-zone", "http"]))
def test_a_timestamp_is_read_as_botocore_reads_it(when: datetime.datetime, form: str) -> None:
    """The listing's timestamps are read without botocore's parser (its cost is most of a
    listing's), to the same instant: ISO 8601 as S3 sends it (milliseconds and Z), with an
    offset, with no zone (botocore's reading), and an HTTP date."""
    text = {"iso-z": when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03}Z",
            "iso-offset": when.isoformat(),
            "iso-no-zone": when.replace(tzinfo=None).isoformat(),
            "http": email.utils.format_datetime(when, usegmt=True)}[form]
    theirs = botocore.utils.parse_timestamp(text)
    assert s3._timestamp(text) == theirs
    assert (s3._timestamp(text).tzinfo is None) == (theirs.tzinfo is None)


_LISTING = ('<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.'
            'com/doc/2006-03-01/"><Name>bucket</Name><Prefix>pre/packs/</Prefix><KeyCount>1'
            '</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated><Contents><Key>'
            'pre/packs/ab/a.pack</Key><LastModified>{modified}</LastModified><ETag>"e"</ETag>'
            '<Size>1</Size></Contents></ListBucketResult>')


@pytest.mark.parametrize(("body", "error"), [
    (_LISTING.format(modified="2025-01-01T00:00:00.000Z"), None),
    (_LISTING.format(modified="not a time"), "reply cannot be read.*not a time"),
    (_LISTING.format(modified="2025-13-01T00:00:00.000Z"), "reply cannot be read.*2025-13-01"),
    (_LISTING.format(modified="9999999999999999999"), "reply cannot be read.*99999"),
    (_LISTING.format(modified="2025-01-01T00:00:00.000Z")[:-40], "listing packs/"),
    (_LISTING.format(modified="x").replace("<LastModified>x</LastModified>", ""),
     "reply cannot be read.*an entry with no LastModified"),
    (_LISTING.format(modified="2025-01-01T00:00:00.000Z").replace("<Size>1</Size>", ""),
     "reply cannot be read.*an entry with no Size"),
    (_LISTING.format(modified="2025-01-01T00:00:00.000Z").replace("<Size>1<", "<Size>one<"),
     "reply cannot be read.*one"),
], ids=["good", "words", "month-13", "huge-number", "cut-short", "no-time", "no-size",
        "size-words"])
def test_a_listing_reply_that_cannot_be_read_is_a_clear_error(
        monkeypatch: pytest.MonkeyPatch, body: str, error: str | None) -> None:
    """A store (or a proxy) that answers a listing with a value that is not of its type (a
    timestamp that is no time, a size that is no number), an entry with no time or no size,
    or XML cut short: the backend's error for a store that cannot be used now (exit 10),
    never a bare ValueError or KeyError (an "internal error"); nothing of the reply is taken.
    A good reply lists its name."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "calls-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "calls-secret")
    script = Script([(200, {"Content-Type": "application/xml"}, body.encode())])
    with serving(script) as endpoint:
        backend = S3Backend("bucket", "pre", S3Options(endpoint=endpoint, region="us-east-1",
                                                       max_attempts=1))
        try:
            if error is None:
                assert [i.name for i in backend.list("packs/")] == ["packs/ab/a.pack"]
            else:
                with pytest.raises(BackendUnavailable, match=error):
                    backend.list("packs/")
        finally:
            backend.close()
