"""The S3 backend: one object per name under ``s3://BUCKET/PREFIX/``, through boto3.

Create-only writes are ``PUT`` with ``If-None-Match: *`` (412: the name is taken); conditional
replaces and deletes send ``If-Match: ETAG``. boto3's retry configuration ("standard" mode)
retries transient failures (connection errors, 5xx, throttling) with backoff, and this backend
retries a conditional request in conflict with another (409 ConditionalRequestConflict) the same
way; what still fails becomes `BackendUnavailable`. Reads (GET) are signed and sent without the
client's per-call machinery, and retried the same way (s3reads.py). A create (or a conditional
replace) whose first attempt reached the server but whose answer was lost is retried, refused
(412), and then finds its own object: an object with the same MD5 (the ETag of a single-part
PUT) counts as written. Nothing is uploaded in parts, and every PUT carries the CRC32 of its
body (``x-amz-checksum-crc32``), which the server checks: an upload cut short (a killed process)
never leaves an object behind, not even on a server that would otherwise keep the bytes it got.
SeaweedFS does: a PUT with neither a checksum header nor Content-MD5 whose connection is closed
cleanly after its headers (or after the server's ``100 Continue``) and before the first byte of
its body becomes an empty object, whether the payload is signed or not (the server does not
compare the signed SHA-256 with the body of a plain PUT).

The body of a PUT is not part of its signature (``UNSIGNED-PAYLOAD``, as boto3 does over
HTTPS when a checksum header is sent; over plain HTTP it would hash every byte again, a fifth of
an upload's time on loopback): the body's CRC32, in a signed header, makes the server refuse a
body damaged on the way. Against someone who can change the traffic, plain HTTP protects nothing
either way (replies are not signed): that takes HTTPS, or an encrypted repository's AEAD and
MACs, which refuse any object changed by anyone without its keys.

Credentials and endpoint come from where boto3 looks (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL, AWS_PROFILE, ~/.aws), unless given; addressing is path-style.
"""

from __future__ import annotations

import base64
import builtins
import functools
import hashlib
import os
import urllib.parse
import zlib
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

import boto3
import botocore.exceptions
import botocore.loaders
import botocore.parsers
import botocore.session
import botocore.utils
from botocore.config import Config
from botocore.parsers import ResponseParserError

from blocktrail.errors import InvalidArgument
from blocktrail.repo import s3reads
from blocktrail.repo.backend import (
    BackendDenied,
    BackendError,
    BackendUnavailable,
    BucketNotFound,
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    PreconditionFailed,
    check_name,
)
from blocktrail.repo.s3options import S3Options
from blocktrail.repo.s3reads import (
    ErrorReply,
    ObjectReads,
    Unreachable,
    byte_range,
    range_problem,
)

_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403",
           "InvalidToken", "ExpiredToken", "AllAccessDisabled"}
_MISSING = {"NoSuchKey", "404", "NotFound"}
# 409 of a conditional write or delete while another is under way (AWS): to be retried.
_CONFLICT = "ConditionalRequestConflict"
# The credentials cannot be had (none configured, or their source fails: a credential_process
# that exits non-zero, an expired SSO login, an MFA role that cannot refresh): refused, as
# wrong credentials are, never taken for a store that cannot be reached.
_CREDENTIAL_ERRORS = (botocore.exceptions.NoCredentialsError,
                      botocore.exceptions.PartialCredentialsError,
                      botocore.exceptions.CredentialRetrievalError,
                      botocore.exceptions.RefreshWithMFAUnsupportedError,
                      botocore.exceptions.UnknownCredentialError,
                      botocore.exceptions.TokenRetrievalError,
                      botocore.exceptions.NoAuthTokenError,
                      botocore.exceptions.SSOError)


def _md5(body: bytes) -> str:
    """The ETag of an object written by one PUT of ``body``."""
    return f'"{hashlib.md5(body, usedforsecurity=False).hexdigest()}"'


def _code(exc: botocore.exceptions.ClientError) -> str:
    """The S3 error code of a reply (``NoSuchKey``, ``PreconditionFailed``…)."""
    return str(exc.response.get("Error", {}).get("Code", ""))


def _crc32(body: bytes) -> str:
    """The body's CRC32 as S3 takes it: the server refuses a body that does not match."""
    return base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode()


def _timestamp(value: str) -> datetime:
    """A timestamp of a reply. botocore's own parser (dateutil) takes most of the client's
    time in a listing: 0.1 ms a name, 4 s for 25,600 packs. Read with
    `datetime.fromisoformat` where it is ISO 8601 with its zone (a listing's LastModified);
    anything else (an HTTP date, a time with no zone) as botocore reads it (what reads as no
    time at all raises, as any value that is not of its type: `_CheckedParser`)."""
    try:
        found = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        found = None
    if found is None or found.tzinfo is None:
        parsed: datetime = botocore.utils.parse_timestamp(value)
        return parsed
    return found


_UNREADABLE_VALUE = (TypeError, ValueError, OverflowError, RuntimeError)


class _CheckedParser:
    """One of botocore's reply parsers. A value that does not read as its type (a size that is
    no number, a timestamp that is no time) raises a bare ValueError or RuntimeError out of
    botocore's: here it is what it is, a reply that cannot be parsed (`ResponseParserError`,
    as malformed XML is)."""

    def __init__(self, parser: Any) -> None:
        self._parser = parser

    def parse(self, response: dict[str, Any], shape: Any) -> Any:
        try:
            return self._parser.parse(response, shape)
        except _UNREADABLE_VALUE as exc:
            raise ResponseParserError(f"a value that is not of its type: {exc}") from exc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)


class _CheckedParserFactory:
    """botocore's parser factory (the client asks it only for `create_parser`), its parsers
    checked (`_CheckedParser`), timestamps read by `_timestamp`."""

    def __init__(self) -> None:
        self._factory = botocore.parsers.ResponseParserFactory()
        self._factory.set_parser_defaults(timestamp_parser=_timestamp)

    def create_parser(self, protocol_name: str) -> _CheckedParser:
        return _CheckedParser(self._factory.create_parser(protocol_name))


@functools.cache
def _service_descriptions() -> Any:
    """botocore's loader of its (static) service descriptions, shared by every client of this
    process: loading them again for each repository opened costs a quarter of a second.
    Credentials and configuration are never shared."""
    return botocore.loaders.create_loader()


def _bucket_url(client: Any, bucket: str) -> str | None:
    """``scheme://host/bucket/``: where the client sends the GET of an object of ``bucket``,
    after every rule of its endpoint resolution (a FIPS endpoint is a regional host, which the
    client's own endpoint URL does not name; dual-stack; path-style), read from a presigned
    URL. None without credentials, or when the URL does not end in the bucket and key."""
    probe = "blocktrail-probe"
    try:
        url = urllib.parse.urlsplit(str(client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": probe}, ExpiresIn=60)))
    except botocore.exceptions.NoCredentialsError:
        return None
    path = f"/{urllib.parse.quote(bucket, safe='')}/"
    if not url.path.endswith(path + probe):
        return None
    return urllib.parse.urlunsplit((url.scheme, url.netloc, url.path[: -len(probe)], "", ""))


def _bad_endpoint(exc: Exception) -> str:
    """An endpoint that boto3 refuses, from the environment or the profile (one given is
    checked in S3Options already)."""
    return (f"the S3 endpoint is no URL of the form http(s)://HOST[:PORT] ({exc}): check "
            "--endpoint, AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL and the profile's endpoint_url")


class S3Backend:
    remote = True
    host_locks = False  # many machines: leases only
    list_page: int | None = None  # names asked per listing page (None: the server's, 1000)

    def __init__(self, bucket: str, prefix: str, options: S3Options | None = None) -> None:
        options = options or S3Options()
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._attempts = max(1, options.max_attempts)
        try:
            core = botocore.session.Session()
            core.register_component("data_loader", _service_descriptions())
            core.register_component("response_parser_factory", _CheckedParserFactory())
            session = boto3.session.Session(botocore_session=core, profile_name=options.profile,
                                            region_name=options.region)
            self.client: Any = self._client(session, options)
            self.endpoint = str(self.client.meta.endpoint_url)
            verify = core.get_config_variable("ca_bundle")  # as the client resolves it
            bucket_url = _bucket_url(self.client, bucket)
            # Where a GET's URL is not known (no credentials yet; an endpoint rule that names
            # no bucket in the path), or the bucket turns out to be in another region, reads
            # go through the client, which knows what to do.
            self.reads = None if bucket_url is None else ObjectReads(
                bucket_url, str(self.client.meta.region_name), session.get_credentials,
                verify=verify if verify is not None else os.environ.get("REQUESTS_CA_BUNDLE",
                                                                        True),
                connect_timeout_s=options.connect_timeout_s,
                read_timeout_s=options.read_timeout_s, connections=options.connections,
                max_attempts=options.max_attempts)
            self._reads_through_client = False  # set once the bucket is found elsewhere
        except _CREDENTIAL_ERRORS as exc:
            raise self._no_credentials(exc) from exc
        except botocore.exceptions.EndpointProviderError as exc:  # another scheme, a bad port
            raise InvalidArgument(_bad_endpoint(exc)) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise BackendDenied(f"{self.url}: {exc}") from exc

    @staticmethod
    def _client(session: boto3.session.Session, options: S3Options) -> Any:
        try:
            return session.client(
                "s3", endpoint_url=options.endpoint,
                region_name=options.region or session.region_name or "us-east-1",
                config=Config(s3={"addressing_style": "path",
                                  # the body's CRC32 goes in a header (below); see the module
                                  "payload_signing_enabled": False},
                              retries={"mode": "standard",
                                       "max_attempts": options.max_attempts},
                              connect_timeout=options.connect_timeout_s,
                              read_timeout=options.read_timeout_s,
                              max_pool_connections=options.connections,
                              request_checksum_calculation="when_required",
                              response_checksum_validation="when_required"))
        except ValueError as exc:  # no scheme or no host: one given is checked in S3Options
            raise InvalidArgument(_bad_endpoint(exc)) from exc

    def key(self, name: str) -> str:
        check_name(name)
        return f"{self.prefix}/{name}" if self.prefix else name

    def _call(self, what: str, name: str, operation: str, **kwargs: Any) -> Any:
        attempt = 0
        while True:
            try:
                return getattr(self.client, operation)(Bucket=self.bucket, **kwargs)
            except botocore.exceptions.ClientError as exc:
                attempt += 1
                if _code(exc) != _CONFLICT or attempt >= self._attempts:
                    raise self._client_error(exc, what, name) from exc
            except _CREDENTIAL_ERRORS as exc:
                raise self._no_credentials(exc) from exc
            except botocore.exceptions.BotoCoreError as exc:  # connection refused, timeouts
                raise self._unreachable(what, name, exc) from exc
            except ResponseParserError as exc:  # malformed XML, a timestamp that is none
                raise self._unreadable(what, name, exc) from exc
            # Another conditional write or delete of the object was under way: retried, as
            # boto3 retries what is transient (it does not retry this one).
            s3reads.pause(attempt)

    def _no_credentials(self, exc: Exception) -> BackendDenied:
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            return BackendDenied(f"{self.url}: no credentials (set AWS_ACCESS_KEY_ID and "
                                 "AWS_SECRET_ACCESS_KEY, or a profile)")
        return BackendDenied(f"{self.url}: the credentials cannot be obtained ({exc}): check "
                             "their source (the profile's credential_process, SSO login or "
                             "role; AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")

    def _unreadable(self, what: str, name: str, why: object) -> BackendUnavailable:
        """A reply that cannot be read: malformed, or without what every such reply holds."""
        return BackendUnavailable(f"{self.url} at {self.endpoint}: {what} {name}: the store's "
                                  f"reply cannot be read ({why}); nothing was taken from it; "
                                  "retry later")

    def _unreachable(self, what: str, name: str, exc: Exception) -> BackendUnavailable:
        return BackendUnavailable(f"{self.url} at {self.endpoint} cannot be reached ({what} "
                                  f"{name}): {exc}; gave up after the retries")

    def _client_error(self, exc: botocore.exceptions.ClientError, what: str,
                      name: str) -> BackendError:
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        message = str(exc.response.get("Error", {}).get("Message", ""))
        return self._error(ErrorReply(status, _code(exc), message), what, name)

    def _error(self, reply: ErrorReply, what: str, name: str) -> BackendError:
        code, status = reply.code, reply.status
        message = f"{self.url}: {what} {name}: {code} {reply.message}".rstrip()
        if code == _CONFLICT:  # retried already
            return BackendUnavailable(f"{message}: another write or delete of the object was "
                                      "under way; gave up after the retries")
        if code == "PreconditionFailed" or status in (409, 412):
            return PreconditionFailed(message)
        if code in _MISSING:
            return ObjectNotFound(message)
        if code == "NoSuchBucket":  # not "no such object": not a missing config.json either
            return BucketNotFound(f"{self.url}: bucket {self.bucket} does not exist at "
                                  f"{self.endpoint} (`blocktrail repo init` creates it)")
        if code in _DENIED or status == 403:
            return BackendDenied(
                f"{self.url} at {self.endpoint} refused the credentials or the access ({code}): "
                "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the profile)")
        if status >= 500 or code in ("SlowDown", "RequestTimeout", "ServiceUnavailable"):
            return BackendUnavailable(f"{message}; gave up after the retries")
        return BackendError(message)

    def _date(self, response: Any) -> float:
        """The store's clock when it answered (its Date header; 0.0 where it gave none: a
        lease then never looks expired by it)."""
        header = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        if not header:
            return 0.0
        try:
            return parsedate_to_datetime(header).timestamp()
        except _UNREADABLE_VALUE as exc:
            raise self._unreadable("reading", "the Date header", f"{header!r}: {exc}") from exc

    def create(self, name: str, data: bytes | bytearray | memoryview) -> ObjectInfo:
        body = bytes(data)
        for _ in range(self._attempts):
            try:
                response = self._call("creating", name, "put_object", Key=self.key(name),
                                      Body=body, ChecksumCRC32=_crc32(body), IfNoneMatch="*")
            except PreconditionFailed:
                try:
                    found = self.info(name)
                except ObjectNotFound:  # deleted since it was found there: free again
                    continue
                if found.etag == _md5(body):  # a retried request of this same write
                    return found
                raise ObjectExists(f"{self.url}: object {name} exists already") from None
            now = self._date(response)
            return ObjectInfo(name, len(body), now, str(response.get("ETag", "")), now)
        raise ObjectExists(f"{self.url}: object {name} exists already (written and deleted "
                           "again by others while this create was retried)")

    def replace(self, name: str, data: bytes, etag: str) -> ObjectInfo:
        body = bytes(data)
        try:
            response = self._call("replacing", name, "put_object", Key=self.key(name),
                                  Body=body, ChecksumCRC32=_crc32(body), IfMatch=etag)
        except ObjectNotFound:
            raise PreconditionFailed(f"{self.url}: object {name} is gone") from None
        except PreconditionFailed:
            try:
                found = self.info(name)
            except ObjectNotFound:
                raise PreconditionFailed(f"{self.url}: object {name} is gone") from None
            if found.etag == _md5(body):  # a retried request of this same write: it landed
                return found
            raise
        now = self._date(response)
        return ObjectInfo(name, len(data), now, str(response.get("ETag", "")), now)

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if length is not None and length <= 0:
            self.info(name)  # no bytes, but ObjectNotFound if there is no object
            return b""
        reads = self.reads
        if reads is None or self._reads_through_client:
            return self._load_through_client(name, offset, length)
        try:  # not through the client: see s3reads.py
            reply = reads.get(self.key(name), offset, length)
        except _CREDENTIAL_ERRORS as exc:
            raise self._no_credentials(exc) from exc
        except Unreachable as exc:
            raise self._unreachable("reading", name, exc) from exc
        if isinstance(reply, ErrorReply):
            if reply.status == 416 or reply.code == "InvalidRange":  # from past the end
                return b""
            if reply.bucket_region and reply.status in (301, 307, 400):
                # The bucket is in another region than the one signed for: the client
                # follows such redirects (and learns the region); reads go through it now.
                self._reads_through_client = True
                return self._load_through_client(name, offset, length)
            raise self._error(reply, "reading", name)
        return reply

    def _load_through_client(self, name: str, offset: int, length: int | None) -> bytes:
        asked = byte_range(offset, length)
        kwargs: dict[str, Any] = {} if asked is None else {"Range": asked}
        attempt = 0
        while True:
            try:
                response = self._call("reading", name, "get_object", Key=self.key(name),
                                      **kwargs)
            except BackendError as exc:
                if "InvalidRange" in exc.message:
                    return b""
                raise
            try:
                body = bytes(response["Body"].read())
            except botocore.exceptions.BotoCoreError as exc:
                raise BackendUnavailable(f"{self.url}: reading {name}: {exc}") from exc
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if asked is None or status != 206:  # 200: the whole object came, whatever asked
                return body[offset : None if length is None else offset + length]
            wrong = range_problem(offset, length, response.get("ContentRange"), len(body))
            if wrong is None:
                return body
            # Another range than asked: retried as s3reads retries it, never taken as data.
            attempt += 1
            if attempt >= self._attempts:
                raise self._unreachable("reading", name, Unreachable(wrong))
            s3reads.pause(attempt)

    def info(self, name: str) -> ObjectInfo:
        response = self._call("reading", name, "head_object", Key=self.key(name))
        try:
            modified: datetime = response["LastModified"]
            size = int(response["ContentLength"])
        except KeyError as exc:
            raise self._unreadable("reading", name, f"no {exc.args[0]}") from exc
        return ObjectInfo(name, size, modified.timestamp(), str(response.get("ETag", "")),
                          self._date(response))

    def list(self, prefix: str) -> list[ObjectInfo]:
        full = self.key(prefix.rstrip("/")) + "/" if prefix.endswith("/") else self.key(prefix)
        skip = len(self.prefix) + 1 if self.prefix else 0
        found: builtins.list[ObjectInfo] = []
        tokens: set[str] = set()
        kwargs: dict[str, Any] = {"Prefix": full}
        if self.list_page is not None:
            kwargs["MaxKeys"] = self.list_page
        while True:
            page = self._call("listing", prefix, "list_objects_v2", **kwargs)
            now = self._date(page)
            for item in page.get("Contents", []):
                try:  # an entry lacking one of these (botocore checks the types of those given)
                    key, size, modified = item["Key"], int(item["Size"]), item["LastModified"]
                except KeyError as exc:
                    raise self._unreadable("listing", prefix,
                                           f"an entry with no {exc.args[0]}") from exc
                found.append(ObjectInfo(key[skip:], size, modified.timestamp(),
                                        str(item.get("ETag", "")), now))
            if not page.get("IsTruncated"):
                return sorted(found, key=lambda i: i.name)
            # A listing taken for whole when it is not would count what it lacks as lost.
            token = page.get("NextContinuationToken")
            if not token or token in tokens:
                why = "repeats a continuation token" if token else "has no continuation token"
                raise BackendUnavailable(
                    f"{self.url}: listing {prefix}: the store cut the listing short (a page "
                    f"marked truncated {why}, after {len(found)} objects); retry later")
            tokens.add(token)
            kwargs["ContinuationToken"] = token

    def delete(self, name: str, etag: str | None = None) -> None:
        kwargs: dict[str, Any] = {"Key": self.key(name)}
        if etag is not None:
            kwargs["IfMatch"] = etag
        try:
            self._call("deleting", name, "delete_object", **kwargs)
        except ObjectNotFound:
            return
        except PreconditionFailed:
            if etag is None:
                raise
            try:  # a store that answers 412 for no object at all (SeaweedFS): gone already
                self.info(name)
            except ObjectNotFound:
                return
            raise

    def now(self) -> float:
        return self._date(self._call("reaching", "the bucket", "head_bucket"))

    def leftovers(self) -> builtins.list[str]:
        return []  # no upload is made in parts: an interrupted PUT leaves nothing

    def delete_leftovers(self) -> int:
        return 0

    def host_lock(self, *, exclusive: bool, wait: bool) -> None:
        return None

    def create_bucket(self) -> None:
        """Create the bucket unless it exists."""
        try:
            self._call("reaching", "the bucket", "head_bucket")
            return
        except (ObjectNotFound, BucketNotFound):
            pass
        except BackendError as exc:
            if "404" not in exc.message and "Not Found" not in exc.message:
                raise
        self._call("creating", "the bucket", "create_bucket")

    def close(self) -> None:
        if self.reads is not None:
            self.reads.close()
        self.client.close()
