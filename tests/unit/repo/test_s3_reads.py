"""S3 reads (repo/s3reads.py) against a scripted HTTP server: retries of what is transient,
a reply cut short is never data, a server that ignores the range still gives the range, and
errors map as every other S3 call's do. (The real server's answers are the backend contract
suite's, test_backend_contract.py, run on SeaweedFS.)"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from blocktrail.errors import ExitCode, InvalidArgument
from blocktrail.repo import s3reads
from blocktrail.repo.backend import (
    BackendDenied,
    BackendUnavailable,
    BucketNotFound,
    ObjectNotFound,
)
from blocktrail.repo.s3 import S3Backend
from blocktrail.repo.s3options import S3Options
from scriptedhttp import OBJECT, Script, serving


@pytest.fixture
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "reads-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "reads-secret")


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch, credentials: None) -> Iterator[tuple[str, Script]]:
    pauses: list[int] = []
    monkeypatch.setattr(s3reads, "pause", pauses.append)
    script = Script()
    with serving(script) as endpoint:
        yield endpoint, script


def _backend(endpoint: str, attempts: int = 4) -> S3Backend:
    return S3Backend("bucket", "pre", S3Options(endpoint=endpoint, max_attempts=attempts,
                                                connect_timeout_s=2, read_timeout_s=5))


def _range(start: int, end: int) -> tuple[int, dict[str, str], bytes]:
    return (206, {"Content-Range": f"bytes {start}-{end}/{len(OBJECT)}"},
            OBJECT[start : end + 1])


def test_a_ranged_get_is_signed_and_path_style(server: tuple[str, Script]) -> None:
    endpoint, script = server
    script.steps = [_range(10, 19)]
    backend = _backend(endpoint)
    assert backend.load("packs/ab/x.pack", 10, 10) == OBJECT[10:20]
    path, headers = script.seen[0]
    assert path == "/bucket/pre/packs/ab/x.pack"
    assert headers["Range"] == "bytes=10-19"
    assert headers["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=reads-key/")
    assert "x-amz-content-sha256" in {k.lower() for k in headers}
    backend.close()


def test_transient_failures_are_retried(server: tuple[str, Script]) -> None:
    endpoint, script = server
    slow_down: tuple[int, dict[str, str], bytes] = (
        503, {}, b"<Error><Code>SlowDown</Code><Message>busy</Message></Error>")
    script.steps = [slow_down, "reset", "short", "bad length", _range(0, 99)]
    backend = _backend(endpoint, attempts=5)
    assert backend.load("index/a.idx", 0, 100) == OBJECT[:100]  # never the 40 bytes
    assert len(script.seen) == 5
    backend.close()


def test_retries_end_in_a_clear_error(server: tuple[str, Script]) -> None:
    endpoint, script = server
    script.steps = [(500, {}, b"")] * 3
    backend = _backend(endpoint, attempts=3)
    with pytest.raises(BackendUnavailable, match="gave up after the retries"):
        backend.load("index/a.idx")
    assert len(script.seen) == 3
    script.steps = ["short"] * 2
    backend = _backend(endpoint, attempts=2)
    with pytest.raises(BackendUnavailable, match=r"cannot be reached .*ended after 40 of '100'"):
        backend.load("index/a.idx", 0, 100)
    backend.close()


def test_an_endpoint_nobody_answers_at(credentials: None) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused
        backend = S3Backend("bucket", "pre", S3Options(endpoint=f"http://127.0.0.1:{port}",
                                                       max_attempts=1))
        with pytest.raises(BackendUnavailable, match="cannot be reached"):
            backend.load("config")
        backend.close()


def test_errors_map_as_for_every_call(server: tuple[str, Script]) -> None:
    endpoint, script = server
    backend = _backend(endpoint)
    script.steps = [(404, {}, b"<Error><Code>NoSuchKey</Code></Error>")]
    with pytest.raises(ObjectNotFound):
        backend.load("index/missing.idx")
    script.steps = [(404, {}, b"<Error><Code>NoSuchBucket</Code></Error>")]
    with pytest.raises(BucketNotFound, match="bucket bucket does not exist"):
        backend.load("config")
    script.steps = [(403, {}, b"<Error><Code>SignatureDoesNotMatch</Code></Error>")]
    with pytest.raises(BackendDenied, match="refused the credentials"):
        backend.load("config")
    script.steps = [(403, {}, b"not xml")]
    with pytest.raises(BackendDenied):
        backend.load("config")
    script.steps = [(416, {}, b"<Error><Code>InvalidRange</Code></Error>")]
    assert backend.load("index/a.idx", 5000, 10) == b""  # from past the end: nothing
    assert len(script.seen) == 5  # none of these is retried
    backend.close()


def test_a_server_that_ignores_the_range_still_gives_the_range(
        server: tuple[str, Script]) -> None:
    endpoint, script = server
    script.steps = [(200, {}, OBJECT), (200, {}, OBJECT)]
    backend = _backend(endpoint)
    assert backend.load("packs/ab/x.pack", 100, 28) == OBJECT[100:128]
    assert backend.load("packs/ab/x.pack", 1000) == OBJECT[1000:]
    backend.close()


def _short(start: int, end: int, sent: int | None = None) -> tuple[int, dict[str, str], bytes]:
    """A 206 of bytes ``start``-``end`` (its body ``sent`` bytes long: as many when None)."""
    body = OBJECT[start : end + 1]
    return (206, {"Content-Range": f"bytes {start}-{end}/{len(OBJECT)}"},
            body if sent is None else OBJECT[start : start + sent])


@pytest.mark.parametrize(("wrong", "offset", "length"), [
    (_short(0, 49), 0, 100),  # fewer bytes than asked, before the object's end
    (_short(0, 27), 100, 28),  # another start
    (_short(1000, 1009), 1000, 100),  # cut short before the end, which is at 1023
    (_short(0, 99, sent=50), 0, 100),  # a body of another length than its range
    (_short(5, 1022), 5, None),  # the rest of the object asked: one byte short
    ((206, {}, OBJECT[:100]), 0, 100),  # no Content-Range at all
])
def test_a_reply_of_another_range_is_retried_never_data(
        server: tuple[str, Script], wrong: tuple[int, dict[str, str], bytes], offset: int,
        length: int | None) -> None:
    """A 206 that is not the range asked (fewer bytes before the object's end, another start,
    a body of another length) is retried like a reply cut short: taken as data, it would be a
    damaged copy of an intact object (and be quarantined)."""
    endpoint, script = server
    end = len(OBJECT) if length is None else min(offset + length, len(OBJECT))
    script.steps = [wrong, _range(offset, end - 1)]
    backend = _backend(endpoint)
    assert backend.load("packs/ab/x.pack", offset, length) == OBJECT[offset:end]
    assert len(script.seen) == 2
    script.steps = [wrong] * 2
    backend = _backend(endpoint, attempts=2)
    with pytest.raises(BackendUnavailable, match=r"cannot be reached .*the reply to bytes="):
        backend.load("packs/ab/x.pack", offset, length)
    assert len(script.seen) == 4
    backend.close()


def test_fewer_bytes_at_the_end_of_the_object_are_the_range(
        server: tuple[str, Script]) -> None:
    endpoint, script = server
    script.steps = [_range(1000, 1023)]
    backend = _backend(endpoint)
    assert backend.load("packs/ab/x.pack", 1000, 100) == OBJECT[1000:]
    assert len(script.seen) == 1
    backend.close()


def test_a_reply_of_another_range_through_the_client_is_retried(
        server: tuple[str, Script]) -> None:
    """The same on the path through the boto3 client (a bucket in another region), which
    takes a 206 as it comes; and a 200 there (a server that ignores the range) gives the range
    asked."""
    endpoint, script = server
    moved = (301, {"x-amz-bucket-region": "eu-central-1"},
             b"<Error><Code>PermanentRedirect</Code></Error>")
    script.steps = [moved, _short(10, 14), _range(10, 19), (200, {}, OBJECT)]
    backend = _backend(endpoint)
    assert backend.load("packs/ab/x.pack", 10, 10) == OBJECT[10:20]
    assert len(script.seen) == 3
    assert backend.load("packs/ab/x.pack", 30, 10) == OBJECT[30:40]
    script.steps = [_short(10, 14)] * 4
    with pytest.raises(BackendUnavailable, match=r"cannot be reached .*another range"):
        backend.load("packs/ab/x.pack", 10, 10)
    backend.close()


def test_a_bucket_in_another_region_is_read_through_the_client(
        server: tuple[str, Script]) -> None:
    """A read signed for the wrong region is redirected (AWS: 301 or 400 with
    x-amz-bucket-region); boto3's client follows such redirects, so reads go through it."""
    endpoint, script = server
    moved = (301, {"x-amz-bucket-region": "eu-central-1"},
             b"<Error><Code>PermanentRedirect</Code></Error>")
    script.steps = [moved, _range(10, 19), _range(30, 39)]
    backend = _backend(endpoint)
    assert backend.load("packs/ab/x.pack", 10, 10) == OBJECT[10:20]
    assert backend.load("packs/ab/x.pack", 30, 10) == OBJECT[30:40]
    agents = [headers.get("User-Agent", "") for _, headers in script.seen]
    assert "Boto3" not in agents[0] and all("Boto3" in agent for agent in agents[1:])
    backend.close()


def test_a_ca_bundle_that_does_not_exist_is_a_clear_error_on_both_paths(
        credentials: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """AWS_CA_BUNDLE naming no file: a read fails as a call through the client does (exit 10,
    naming the endpoint), not with a traceback."""
    monkeypatch.setenv("AWS_CA_BUNDLE", "/nonexistent/ca.pem")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        endpoint = f"https://127.0.0.1:{listener.getsockname()[1]}"
        backend = S3Backend("bucket", "pre", S3Options(endpoint=endpoint, max_attempts=1))
        with pytest.raises(BackendUnavailable, match=r"cannot be reached .*SSL") as read:
            backend.load("config")
        with pytest.raises(BackendUnavailable, match=r"cannot be reached .*SSL") as head:
            backend.info("config")
        assert str(read.value).replace("reading config", "") == \
            str(head.value).replace("reading config", "")
        backend.close()


@pytest.mark.parametrize(("setting", "host"), [
    ("AWS_USE_FIPS_ENDPOINT", "s3-fips.us-east-1.amazonaws.com"),
    ("AWS_USE_DUALSTACK_ENDPOINT", "s3.dualstack.us-east-1.amazonaws.com"),
    (None, "s3.amazonaws.com")])
def test_reads_go_where_the_client_sends_its_requests(
        server: tuple[str, Script], monkeypatch: pytest.MonkeyPatch, setting: str | None,
        host: str) -> None:
    """A FIPS endpoint is a regional host that the client's endpoint URL does not name
    (s3-fips.aws-global…): a read goes to the host a call through the client goes to. Seen
    through an HTTPS proxy that notes where each connection is for, and refuses it."""
    proxy, script = server
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "NO_PROXY", "no_proxy",
                 "AWS_USE_FIPS_ENDPOINT", "AWS_USE_DUALSTACK_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", proxy)
    if setting is not None:
        monkeypatch.setenv(setting, "true")
    backend = S3Backend("bucket", "pre", S3Options(region="us-east-1", max_attempts=1))
    with pytest.raises(BackendUnavailable):
        backend.load("config")
    assert [path for path, _ in script.seen] == [f"CONNECT {host}:443"]
    with pytest.raises(BackendUnavailable):
        backend.info("config")  # through the client
    assert {path for path, _ in script.seen[1:]} == {f"CONNECT {host}:443"}
    backend.close()


def test_without_credentials_nothing_is_sent(server: tuple[str, Script],
                                             monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    """No credentials anywhere: a read is refused as every call is (exit 9, saying which
    variables to set), and no request reaches the server."""
    endpoint, script = server
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    backend = _backend(endpoint)
    with pytest.raises(BackendDenied, match="no credentials") as read:
        backend.load("config")
    assert read.value.exit_code == 9
    assert script.seen == []
    backend.close()


def test_credentials_that_can_no_longer_be_had_are_refused(
        server: tuple[str, Script], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A profile's credential_process that starts failing after the repository was opened (an
    expired login): reads and calls through the client are refused as wrong credentials are
    (exit 9, naming the source to check), not an internal error nor "cannot be reached"."""
    endpoint, script = server
    failing = tmp_path / "failing"
    process = tmp_path / "credentials.py"
    process.write_text(
        "import datetime, json, pathlib, sys\n"
        f"if pathlib.Path({str(failing)!r}).exists():\n"
        "    sys.exit('the login expired')\n"
        "expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5)\n"
        "print(json.dumps({'Version': 1, 'AccessKeyId': 'process-key', 'SecretAccessKey': "
        "'process-secret', 'Expiration': expires.strftime('%Y-%m-%dT%H:%M:%SZ')}))\n")
    config = tmp_path / "config"
    config.write_text(f"[profile refreshed]\ncredential_process = {sys.executable} {process}\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    backend = S3Backend("bucket", "pre", S3Options(endpoint=endpoint, profile="refreshed",
                                                   max_attempts=1))
    assert backend.load("index/a.idx") == OBJECT  # five minutes left: refreshed at each use
    failing.touch()
    for call in (lambda: backend.load("index/a.idx"), lambda: backend.info("index/a.idx")):
        with pytest.raises(BackendDenied, match="credentials cannot be obtained") as refused:
            call()
        assert refused.value.exit_code == 9
    assert len(script.seen) == 1
    backend.close()


@pytest.mark.parametrize("endpoint", ["127.0.0.1:8333", "htp://127.0.0.1:8333", "http://", "",
                                      "http://127.0.0.1:notaport", "https://host:99999",
                                      "http://[::1"])
def test_an_endpoint_that_is_no_url_is_a_usage_error(
        credentials: None, monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Given (--endpoint) or from the environment: a usage error naming where to look, not a
    traceback nor refused credentials."""
    with pytest.raises(InvalidArgument, match=r"\(--endpoint\) is no URL of the form") as given:
        S3Options(endpoint=endpoint)
    assert given.value.exit_code == ExitCode.USAGE
    if not endpoint:
        return  # boto3 takes an empty AWS_ENDPOINT_URL as none
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    with pytest.raises(InvalidArgument, match="check --endpoint, AWS_ENDPOINT_URL_S3"):
        S3Backend("bucket", "pre", S3Options(region="us-east-1"))
