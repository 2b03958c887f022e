"""What one NBD server allows: connections, negotiation time, and per connection the requests
and bytes in flight (a light module: the command line shows the defaults)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ServerLimits:
    max_connections: int = 100
    handshake_seconds: float = 10.0
    requests_in_flight: int = 64  # per connection
    bytes_in_flight: int = 64 << 20  # per connection: write payloads held, read replies queued
    disk_threads: int = 8
