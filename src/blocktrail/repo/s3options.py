"""How to reach an S3 service: a light module, so that naming S3 options does not import boto3
(only an s3:// repository loads the backend)."""

from __future__ import annotations

from dataclasses import dataclass


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
