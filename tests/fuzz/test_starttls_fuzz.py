"""Garbage in the TLS modes of the NBD cores yields only protocol errors (or TLS refusals on the
client), before STARTTLS, in place of the handshake's plaintext, and after it."""

from __future__ import annotations

import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blocktrail.nbd.proto import (
    NEED_DATA,
    ClientConnection,
    Disconnect,
    ExportInfo,
    RemoteProtocolError,
    ServerConnection,
    StartTls,
    TlsError,
    TlsMode,
)
from blocktrail.nbd.proto.constants import IHAVEOPT, OPTION_REPLY_MAGIC, Option, OptionReply

EXAMPLES = 10_000 if os.environ.get("HYPOTHESIS_PROFILE") == "ci" else 300
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))


class Catalog:
    def lookup(self, name: str) -> ExportInfo | None:
        return ExportInfo("d", 1 << 20, False, contexts=("base:allocation",)) \
            if name == "d" else None

    def names(self) -> list[str]:
        return ["d"]


FLAGS = struct.pack(">I", 3)
STARTTLS = struct.pack(">QII", IHAVEOPT, Option.STARTTLS, 0)
OPTIONS = [Option.STARTTLS, Option.GO, Option.EXPORT_NAME, Option.STRUCTURED_REPLY,
           Option.SET_META_CONTEXT, Option.LIST, Option.ABORT, Option.INFO, 77]


def option_strategy() -> st.SearchStrategy[bytes]:
    """Well-framed options with random bodies: they get past the framing to the TLS rules."""
    return st.builds(lambda opt, body: struct.pack(">QII", IHAVEOPT, opt, len(body)) + body,
                     st.sampled_from(OPTIONS), st.binary(max_size=24))


def drive_server(mode: TlsMode, data: bytes, step: int) -> None:
    """Feed ``data``; at StartTls pretend the handshake worked and go on feeding the rest as
    decrypted bytes (the I/O layer does so only for bytes read after the ACK went out)."""
    conn = ServerConnection(Catalog(), tls=mode)
    try:
        pos = 0
        while pos < len(data):
            conn.receive_data(data[pos : pos + step])
            pos += step
            while (event := conn.next_event()) is not NEED_DATA:
                if isinstance(event, Disconnect):
                    return
                if isinstance(event, StartTls):
                    conn.data_to_send()
                    conn.tls_established()
        conn.receive_data(b"")
        while not isinstance(conn.next_event(), Disconnect):
            pass
    except RemoteProtocolError:
        return


@FUZZ
@given(st.sampled_from([TlsMode.ALLOW, TlsMode.REQUIRE, TlsMode.OFF]),
       st.lists(st.one_of(option_strategy(), st.just(STARTTLS), st.binary(max_size=32)),
                max_size=8),
       st.integers(1, 64), st.booleans())
def test_server_garbage_yields_only_protocol_errors(mode: TlsMode, parts: list[bytes],
                                                    step: int, flags_first: bool) -> None:
    drive_server(mode, (FLAGS if flags_first else b"") + b"".join(parts), step)


@FUZZ
@given(st.lists(option_strategy(), max_size=6))
def test_require_mode_never_chooses_an_export_before_tls(parts: list[bytes]) -> None:
    conn = ServerConnection(Catalog(), tls=TlsMode.REQUIRE)
    conn.receive_data(FLAGS + b"".join(parts))
    try:
        while (event := conn.next_event()) is not NEED_DATA:
            assert isinstance(event, StartTls | Disconnect), event
            return
    except RemoteProtocolError:
        return
    assert conn.export is None


GREETING = struct.pack(">QQH", 0x4E42444D41474943, IHAVEOPT, 3)


def reply_strategy() -> st.SearchStrategy[bytes]:
    kinds = st.sampled_from([OptionReply.ACK, OptionReply.ERR_UNSUP, OptionReply.ERR_TLS_REQD,
                             OptionReply.ERR_POLICY, OptionReply.INFO, OptionReply.SERVER, 9])
    return st.builds(lambda opt, kind, body: struct.pack(">QIII", OPTION_REPLY_MAGIC, opt, kind,
                                                         len(body)) + body,
                     st.sampled_from(OPTIONS), kinds, st.binary(max_size=16))


@FUZZ
@given(st.sampled_from([TlsMode.ALLOW, TlsMode.REQUIRE]),
       st.lists(st.one_of(reply_strategy(), st.binary(max_size=32)), max_size=8),
       st.integers(1, 64))
def test_client_garbage_yields_only_protocol_or_tls_errors(mode: TlsMode, parts: list[bytes],
                                                           step: int) -> None:
    conn = ClientConnection("d", tls=mode)
    data = GREETING + b"".join(parts)
    try:
        for i in range(0, len(data), step):
            conn.receive_data(data[i : i + step])
            while (event := conn.next_event()) is not NEED_DATA:
                if isinstance(event, StartTls):
                    conn.tls_established()
                elif isinstance(event, Disconnect):
                    return
                else:
                    # plaintext never reaches transmission when TLS is required
                    assert mode is TlsMode.ALLOW or conn.tls_active
                    return
    except (RemoteProtocolError, TlsError):
        return
