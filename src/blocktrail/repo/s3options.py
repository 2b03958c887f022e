"""How to reach an S3 service: a light module, so that naming S3 options does not import boto3
(only an s3:// repository loads the backend)."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from blocktrail.errors import InvalidArgument


@dataclass(frozen=True, slots=True)
class S3Options:
    """Where and how to reach the store; None: where boto3 looks (environment, profile)."""

    endpoint: str | None = None
    region: str | None = None
    profile: str | None = None
    max_attempts: int = 6  # boto3 "standard" retries: about 15 s of backoff in all
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    connections: int = 32

    def __post_init__(self) -> None:
        if self.endpoint is not None:
            check_endpoint(self.endpoint, "--endpoint")


def check_endpoint(url: str, given_by: str) -> str:
    """``url`` if it is an endpoint URL (``http`` or ``https``, a host, a port if any), else
    `InvalidArgument` saying so and naming where it was given (``given_by``)."""
    try:
        parts = urllib.parse.urlsplit(url)
        valid = (parts.scheme in ("http", "https") and bool(parts.hostname)
                 and parts.port != 0)  # .port: a ValueError when no number or out of range
    except ValueError:  # that, or a broken [IPv6] host
        valid = False
    if not valid:
        raise InvalidArgument(f"S3 endpoint {url!r} ({given_by}) is no URL of the form "
                              "http://HOST[:PORT] or https://HOST[:PORT]")
    return url
