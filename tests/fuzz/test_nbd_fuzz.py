"""Garbage and truncated input to the NBD server core yields only protocol errors."""

from __future__ import annotations

import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blocktrail.nbd.proto import (
    NEED_DATA,
    Disconnect,
    ExportChosen,
    ExportInfo,
    RemoteProtocolError,
    ServerConnection,
)
from blocktrail.nbd.proto.constants import IHAVEOPT, Option

EXAMPLES = 10_000 if os.environ.get("HYPOTHESIS_PROFILE") == "ci" else 500


class Catalog:
    def lookup(self, name: str) -> ExportInfo | None:
        return ExportInfo("d", 1 << 20, False, contexts=("base:allocation",)) \
            if name == "d" else None

    def names(self) -> list[str]:
        return ["d"]


PREFIX = (struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, Option.STRUCTURED_REPLY, 0)
          + struct.pack(">QII", IHAVEOPT, Option.GO, 7) + struct.pack(">I", 1) + b"d"
          + struct.pack(">H", 0))


def feed(data: bytes, step: int) -> None:
    conn = ServerConnection(Catalog())
    try:
        for i in range(0, len(data), step):
            conn.receive_data(data[i : i + step])
            while (event := conn.next_event()) is not NEED_DATA:
                if isinstance(event, Disconnect):
                    return
        conn.receive_data(b"")
        while not isinstance(conn.next_event(), Disconnect):
            pass
    except RemoteProtocolError:
        return


def test_the_prefix_reaches_transmission() -> None:
    conn = ServerConnection(Catalog())
    conn.receive_data(PREFIX)
    assert isinstance(conn.next_event(), ExportChosen)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=512), st.integers(1, 64), st.booleans())
def test_garbage_yields_only_protocol_errors(data: bytes, step: int, after_go: bool) -> None:
    feed((PREFIX if after_go else b"") + data, step)
