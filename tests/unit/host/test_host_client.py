"""HostClient.call: the decoded answer or a typed error, whatever the other end sends (not
JSON, an error it does not name, a proxy's page, a dropped connection); never a raw exception.
Path segments are percent-encoded whole."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from blocktrail import errors
from blocktrail.host.client import HostAnswerError, HostClient
from blocktrail.host.endpoint import api_path


def client_answering(handler: Callable[[httpx.Request], httpx.Response]) -> HostClient:
    client = HostClient("unix:/nonexistent/api.sock")
    client._http = httpx.Client(transport=httpx.MockTransport(handler),
                                base_url="http://blocktrail")
    return client


@pytest.mark.parametrize(("status", "content", "kind", "excerpt"), [
    (200, b"<html>hello</html>", HostAnswerError, "<html>hello</html>"),
    (502, b"Bad Gateway", HostAnswerError, "Bad Gateway"),
    (500, b"Internal Server Error", HostAnswerError, "Internal Server Error"),
    (404, b'{"detail": "Not Found"}', HostAnswerError, "not an error body"),
    (400, b"[1, 2]", HostAnswerError, "not an error body"),
    (200, b"\xff\xfe garbage \x00" * 50, HostAnswerError, "garbage"),
    (404, b'{"error": "NotFound", "message": "GET /x: Not Found"}', HostAnswerError,
     "HTTP 404 NotFound: GET /x: Not Found"),
    (418, b'{"error": "BlocktrailError", "message": "?"}', HostAnswerError, "HTTP 418"),
    (409, b'{"error": "HostBusy", "message": "served elsewhere"}', errors.HostBusy,
     "served elsewhere"),
    (507, b'{"error": "NoSpace", "message": "full"}', errors.NoSpace, "full"),
    (507, b'{"error": "Unheard", "message": "full"}', errors.NoSpace, "full"),
    (400, b'{"error": "Unheard", "message": "bad"}', errors.InvalidArgument, "bad"),
])
def test_every_answer_becomes_a_typed_error(status: int, content: bytes,
                                            kind: type[errors.BlocktrailError],
                                            excerpt: str) -> None:
    client = client_answering(lambda _request: httpx.Response(status, content=content))
    with pytest.raises(kind) as raised:
        client.call("GET", "/disks")
    assert type(raised.value) is kind
    assert excerpt in raised.value.message
    if kind is HostAnswerError and status != 404:
        assert f"HTTP {status}" in raised.value.message
    assert len(raised.value.message) < 600  # a short excerpt, not the whole page


def test_a_dropped_connection_is_unreachable() -> None:
    def drop(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("server disconnected", request=request)

    with pytest.raises(errors.HostUnreachable, match="server disconnected"):
        client_answering(drop).call("GET", "/disks")
    with pytest.raises(errors.HostUnreachable, match="cannot reach"):
        HostClient("unix:/nonexistent/api.sock").call("GET", "/disks")


def test_what_cannot_be_sent_is_an_invalid_argument() -> None:
    client = client_answering(lambda _request: httpx.Response(200, json={}))
    with pytest.raises(errors.InvalidArgument):
        client.call("POST", "/disks", json={"name": "\ud800"})
    with pytest.raises(errors.InvalidArgument):
        api_path("disks", "\udcff")
    with pytest.raises(errors.InvalidArgument):
        HostClient("unix:/x", token="caf\u00e9\n")


def test_segments_are_encoded_whole() -> None:
    assert api_path("disks", "d0", "snapshots", "a%20b", "revert") == \
        "/disks/d0/snapshots/a%2520b/revert"
    assert api_path("disks", "d0", "snapshots", "?x#y/z") == "/disks/d0/snapshots/%3Fx%23y%2Fz"
    seen: list[bytes] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.raw_path)
        return httpx.Response(200, json={"removed": "a%20b"})

    client_answering(record).call("DELETE", api_path("disks", "d0", "snapshots", "a%20b"))
    assert seen == [b"/disks/d0/snapshots/a%2520b"]


@pytest.mark.parametrize("endpoint", ["", "unix:", "tcp:", "http://", "host", "host:",
                                      "host:0", "host:65536", "host:99999999999999999999",
                                      "http://h/ x:80", "[::1:80", "h:٣٣"])
def test_bad_endpoints_are_invalid_arguments(endpoint: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        HostClient(endpoint)
