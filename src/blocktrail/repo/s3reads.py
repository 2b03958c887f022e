"""Reads of S3 objects (whole or a byte range) without boto3's per-call machinery.

A repository's reads are many and small: an incremental backup's audit reads hundreds of
sampled chunks, each a ranged GET of tens of kilobytes. Through a boto3 client each costs about
2 ms of CPU (request serialisation, endpoint rules, event hooks, response parsing), as much as
the server spends answering it. Here a GET is an `AWSRequest` signed with botocore's
`S3SigV4Auth`, from the same session's credentials (refreshed as boto3 refreshes them), sent
through botocore's own `URLLib3Session` (the same CA bundle, proxies and timeouts boto3 uses):
about 0.6 ms. Retries follow boto3's "standard" mode: connection errors, 5xx and throttling,
up to the same number of attempts, with jittered exponential backoff.

Errors are reported as the boto3 calls report them (`ErrorReply`: the status and the S3 error
code of the reply, the caller maps them to the backend's errors once, as for every other call).
"""

from __future__ import annotations

import random
import re
import time
import urllib.parse
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import botocore.exceptions
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.httpsession import URLLib3Session
from botocore.utils import get_environ_proxies

RETRY_STATUSES = frozenset({500, 502, 503, 504, 429})
RETRY_CODES = frozenset({"SlowDown", "RequestTimeout", "Throttling", "ThrottlingException",
                         "RequestThrottled", "InternalError", "ServiceUnavailable"})
MAX_BACKOFF_S = 20.0
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """The server answered with an error: its HTTP status and S3 error code and message."""

    status: int
    code: str
    message: str
    bucket_region: str | None = None  # x-amz-bucket-region: the bucket lives elsewhere


class Unreachable(Exception):
    """No answer after the retries: connection refused, reset or timed out."""


class ObjectReads:
    """GETs of ``bucket_url`` + key (``https://host/bucket/``: path-style), signed for
    ``region``."""

    def __init__(self, bucket_url: str, region: str,
                 credentials: Callable[[], Any], *, verify: bool | str,
                 connect_timeout_s: float, read_timeout_s: float, connections: int,
                 max_attempts: int) -> None:
        self.bucket_url = bucket_url
        self._region = region
        self._credentials = credentials
        self._attempts = max(1, max_attempts)
        self.on_request: Callable[[], None] | None = None  # called for each request sent
        self._http = URLLib3Session(verify=verify, proxies=get_environ_proxies(bucket_url),
                                    timeout=(connect_timeout_s, read_timeout_s),
                                    max_pool_connections=connections)

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes | ErrorReply:
        """The object's bytes from ``offset`` (``length`` of them, fewer at its end; all when
        None), or the server's error reply. `Unreachable` after the retries (of a reply cut
        short, or of another range than asked); None credentials
        raise `botocore.exceptions.NoCredentialsError`, as a boto3 call does, and credentials
        that cannot be refreshed raise botocore's error of that (CredentialRetrievalError…)."""
        asked = byte_range(offset, length)
        headers = {} if asked is None else {"Range": asked}
        url = self.bucket_url + urllib.parse.quote(key, safe="/~")
        attempt = 0
        while True:
            reply = self._get_once(url, headers, offset, length)
            retry = (isinstance(reply, Unreachable) or (isinstance(reply, ErrorReply) and (
                reply.status in RETRY_STATUSES or reply.code in RETRY_CODES)))
            attempt += 1
            if not retry or attempt >= self._attempts:
                if isinstance(reply, Unreachable):
                    raise reply
                return reply
            pause(attempt)

    def _get_once(self, url: str, headers: dict[str, str], offset: int,
                  length: int | None) -> bytes | ErrorReply | Unreachable:
        credentials = self._credentials()
        if credentials is None:
            raise botocore.exceptions.NoCredentialsError()
        request = AWSRequest(method="GET", url=url, headers=headers)
        S3SigV4Auth(credentials.get_frozen_credentials(), "s3", self._region).add_auth(request)
        if self.on_request is not None:
            self.on_request()
        try:
            response = self._http.send(request.prepare())
        except (botocore.exceptions.ConnectionError,  # refused, unresolved, TLS
                botocore.exceptions.HTTPClientError) as exc:  # reset, timed out
            return Unreachable(str(exc))
        if response.status_code not in (200, 206):
            return _error_reply(response.status_code, response.content,
                                response.headers.get("x-amz-bucket-region"))
        body = bytes(response.content)
        promised = response.headers.get("Content-Length")
        if promised is not None and promised != str(len(body)):  # the connection broke
            return Unreachable(f"the reply ended after {len(body)} of {promised!r} bytes")
        if response.status_code == 200 and "Range" in headers:  # the whole object came
            return body[offset : None if length is None else offset + length]
        if response.status_code == 206:
            wrong = range_problem(offset, length, response.headers.get("Content-Range"),
                                  len(body))
            if wrong is not None:  # taken as data, it would pass for a damaged object
                return Unreachable(wrong)
        return body

    def close(self) -> None:
        self._http.close()


def byte_range(offset: int, length: int | None) -> str | None:
    """The ``Range`` header of bytes from ``offset`` (``length`` of them; all when None), or
    None for the whole object."""
    if not offset and length is None:
        return None
    return f"bytes={offset}-{'' if length is None else offset + length - 1}"


def range_problem(offset: int, length: int | None, content_range: str | None,
                  size: int) -> str | None:
    """Why a 206 reply of ``size`` bytes whose ``Content-Range`` is ``content_range`` is not
    the range asked for (from ``offset``, ``length`` bytes or to the end of the object, fewer
    only at its end), or None when it is. A reply of fewer bytes than asked before the end is
    never data: a server (or proxy) that cuts a range short is retried, like a reply cut
    short."""
    asked = byte_range(offset, length)
    match = _CONTENT_RANGE.fullmatch((content_range or "").strip())
    if match is None:
        return f"the reply to {asked} has no byte range (Content-Range {content_range!r})"
    start, end, total = int(match[1]), int(match[2]), match[3]
    if total == "*":  # the object's size unknown: only the whole range asked will do
        expected = None if length is None else offset + length - 1
    else:
        expected = (int(total) if length is None else min(offset + length, int(total))) - 1
    if start != offset or end < start or (expected is not None and end != expected):
        return f"the reply to {asked} is another range ({content_range})"
    if size != end - start + 1:
        return (f"the reply to {asked} ({content_range}) holds {size} bytes, not "
                f"{end - start + 1}")
    return None


def pause(attempt: int) -> None:
    """Wait before attempt ``attempt + 1``: jittered, exponential, capped (as boto3's
    "standard" retries wait)."""
    time.sleep(random.random() * min(MAX_BACKOFF_S, 2.0 ** attempt))


def _error_reply(status: int, body: bytes, bucket_region: str | None = None) -> ErrorReply:
    """The S3 error document's code and message (``<Error><Code>…</Code>…``); the status
    alone when the body is none."""
    code = message = ""
    try:
        root = ElementTree.fromstring(body) if body else None
    except ElementTree.ParseError:
        root = None
    if root is not None:
        code = root.findtext("Code") or ""
        message = root.findtext("Message") or ""
    return ErrorReply(status, code or str(status), message, bucket_region)
