"""STARTTLS in the sans-IO cores: server modes off / allow / require, the client's demands, and
the injection and downgrade cases; fed whole, byte by byte, and with trailing bytes."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from blocktrail.nbd.proto import (
    NEED_DATA,
    ClientConnection,
    Command,
    Disconnect,
    ExportChosen,
    ExportInfo,
    LocalProtocolError,
    Ready,
    RemoteProtocolError,
    ReplyChunk,
    ReplyDone,
    Request,
    ServerConnection,
    StartTls,
    TlsMode,
    TlsNotOffered,
    TlsRequiredByServer,
)
from blocktrail.nbd.proto.constants import (
    IHAVEOPT,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    ClientFlag,
    HandshakeFlag,
    Info,
    Option,
    OptionReply,
    ReplyType,
)
from blocktrail.nbd.proto.server import State
from blocktrail.nbd.tls import TlsConfig, TlsSession, client_context, server_context
from tlscreds import Credentials, make_credentials

EXPORT = ExportInfo("disk0", 1 << 20, False, "test", ("base:allocation",))
FLAGS = struct.pack(">I", ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)


class Catalog:
    def lookup(self, name: str) -> ExportInfo | None:
        return EXPORT if name == "disk0" else None

    def names(self) -> list[str]:
        return ["disk0"]


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def go(name: bytes = b"disk0") -> bytes:
    return option(Option.GO, struct.pack(">I", len(name)) + name + struct.pack(">HH", 1,
                                                                             Info.BLOCK_SIZE))


def meta_set() -> bytes:
    query = b"base:allocation"
    return option(Option.SET_META_CONTEXT, struct.pack(">I", 5) + b"disk0" + struct.pack(
        ">II", 1, len(query)) + query)


def read_request(cookie: int = 9) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, 0, Command.READ, cookie, 0, 512)


def replies(out: bytes) -> list[tuple[int, int, bytes]]:
    """(option, reply type, data) of each option reply in ``out``."""
    found = []
    pos = 0
    while pos < len(out):
        magic, opt, kind, length = struct.unpack_from(">QIII", out, pos)
        assert magic == OPTION_REPLY_MAGIC
        found.append((opt, kind, out[pos + 20 : pos + 20 + length]))
        pos += 20 + length
    return found


def events(conn: ServerConnection, data: bytes, step: int) -> list[object]:
    """Feed ``data`` ``step`` bytes at a time; collect the events up to StartTls (after which
    the bytes go to the TLS session) or Disconnect."""
    found: list[object] = []
    for i in range(0, len(data), step):
        conn.receive_data(data[i : i + step])
        while (event := conn.next_event()) is not NEED_DATA:
            found.append(event)
            if isinstance(event, StartTls | Disconnect):
                return found
    return found


def server(mode: TlsMode) -> ServerConnection:
    conn = ServerConnection(Catalog(), tls=mode)
    conn.data_to_send()  # the greeting
    return conn


STEPS = [1, 5, 1 << 20]


# ---------------------------------------------------------------------------------- server


@pytest.mark.parametrize("mode", [TlsMode.ALLOW, TlsMode.REQUIRE])
@pytest.mark.parametrize("step", STEPS)
def test_starttls_then_go_over_tls(mode: TlsMode, step: int) -> None:
    conn = server(mode)
    assert events(conn, FLAGS + option(Option.STARTTLS), step) == [StartTls()]
    assert replies(conn.data_to_send()) == [(Option.STARTTLS, OptionReply.ACK, b"")]
    assert conn.state is State.TLS_HANDSHAKE and not conn.tls_active
    conn.tls_established()
    assert conn.tls_active
    # after the handshake the same receive_data takes the decrypted bytes; a request may follow
    # GO in the same read (trailing bytes)
    chosen, request = events(conn, option(Option.STRUCTURED_REPLY) + go() + read_request(),
                             step)
    assert isinstance(chosen, ExportChosen) and chosen.structured_replies
    assert isinstance(request, Request) and request.cookie == 9


@pytest.mark.parametrize("step", STEPS)
def test_off_refuses_starttls_and_goes_on(step: int) -> None:
    conn = server(TlsMode.OFF)
    found = events(conn, FLAGS + option(Option.STARTTLS) + go(), step)
    assert isinstance(found[-1], ExportChosen)
    assert replies(conn.data_to_send())[0] == (Option.STARTTLS, OptionReply.ERR_UNSUP,
                                               b"TLS is not configured")


@pytest.mark.parametrize("opt", [Option.LIST, Option.INFO, Option.GO, Option.STRUCTURED_REPLY,
                                 Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT, 99])
@pytest.mark.parametrize("step", STEPS)
def test_require_refuses_every_option_before_starttls(opt: int, step: int) -> None:
    conn = server(TlsMode.REQUIRE)
    body = go()[16:] if opt in (Option.INFO, Option.GO) else b""
    assert events(conn, FLAGS + option(opt, body) + option(Option.STARTTLS), step) == [
        StartTls()]
    assert [(o, k) for o, k, _ in replies(conn.data_to_send())] == [
        (opt, OptionReply.ERR_TLS_REQD), (Option.STARTTLS, OptionReply.ACK)]


def test_require_lists_nothing_before_tls() -> None:
    conn = server(TlsMode.REQUIRE)
    events(conn, FLAGS + option(Option.LIST) + go(), 1 << 20)
    out = conn.data_to_send()
    assert b"disk0" not in out and conn.export is None


def test_require_closes_on_export_name_before_tls() -> None:
    conn = server(TlsMode.REQUIRE)
    conn.receive_data(FLAGS + option(Option.EXPORT_NAME, b"disk0"))
    with pytest.raises(RemoteProtocolError, match="requires TLS"):
        conn.next_event()
    assert conn.state is State.CLOSED and conn.data_to_send() == b""


def test_require_answers_abort() -> None:
    conn = server(TlsMode.REQUIRE)
    assert events(conn, FLAGS + option(Option.ABORT), 1) == [Disconnect()]
    assert replies(conn.data_to_send()) == [(Option.ABORT, OptionReply.ACK, b"")]


def test_export_name_after_tls_is_served() -> None:
    conn = server(TlsMode.REQUIRE)
    events(conn, FLAGS + option(Option.STARTTLS), 1 << 20)
    conn.tls_established()
    found = events(conn, option(Option.EXPORT_NAME, b"disk0"), 1)
    assert isinstance(found[-1], ExportChosen)


@pytest.mark.parametrize("mode", [TlsMode.ALLOW, TlsMode.REQUIRE])
@pytest.mark.parametrize("injected", [go(), option(Option.STRUCTURED_REPLY), b"\x16\x03\x01",
                                      b"x"])
def test_plaintext_after_starttls_is_never_processed(mode: TlsMode, injected: bytes) -> None:
    """nbdkit CVE-2021-3716: bytes behind STARTTLS in the same plaintext read came from a man in
    the middle (a client waits for the ACK); they end the connection, nothing is answered."""
    conn = server(mode)
    conn.receive_data(FLAGS + option(Option.STARTTLS) + injected)
    with pytest.raises(RemoteProtocolError, match="plaintext followed STARTTLS"):
        conn.next_event()
    assert conn.state is State.CLOSED
    assert conn.data_to_send() == b""  # not even the ACK
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"more")


@pytest.mark.parametrize("step", STEPS)
def test_nothing_negotiated_before_starttls_survives_it(step: int) -> None:
    conn = server(TlsMode.ALLOW)
    found = events(conn, FLAGS + option(Option.STRUCTURED_REPLY) + meta_set()
                   + option(Option.STARTTLS), step)
    assert found == [StartTls()]
    conn.data_to_send()
    conn.tls_established()
    chosen = events(conn, go(), step)[-1]
    assert isinstance(chosen, ExportChosen)
    assert not chosen.structured_replies and chosen.contexts == {}


def test_starttls_twice_is_invalid() -> None:
    conn = server(TlsMode.ALLOW)
    events(conn, FLAGS + option(Option.STARTTLS), 1 << 20)
    conn.data_to_send()
    conn.tls_established()
    found = events(conn, option(Option.STARTTLS) + go(), 1 << 20)
    assert isinstance(found[-1], ExportChosen)
    assert replies(conn.data_to_send())[0][:2] == (Option.STARTTLS, OptionReply.ERR_INVALID)


def test_starttls_with_data_is_invalid() -> None:
    conn = server(TlsMode.REQUIRE)
    events(conn, FLAGS + option(Option.STARTTLS, b"x"), 1 << 20)
    assert replies(conn.data_to_send())[0][:2] == (Option.STARTTLS, OptionReply.ERR_INVALID)
    assert conn.state is State.OPTIONS


def test_io_layer_mistakes_during_the_handshake_are_local_errors() -> None:
    conn = server(TlsMode.ALLOW)
    with pytest.raises(LocalProtocolError):
        conn.tls_established()
    events(conn, FLAGS + option(Option.STARTTLS), 1 << 20)
    with pytest.raises(LocalProtocolError, match="handshake"):
        conn.receive_data(b"\x16\x03\x01")
    with pytest.raises(LocalProtocolError, match="tls_established"):
        conn.next_event()
    conn.tls_established()
    with pytest.raises(LocalProtocolError):
        conn.tls_established()


# ---------------------------------------------------------------------------------- client

GREETING = struct.pack(">QQH", 0x4E42444D41474943, IHAVEOPT,
                       HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)


def reply(opt: int, kind: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", OPTION_REPLY_MAGIC, opt, kind, len(data)) + data


def sent_options(out: bytes) -> list[int]:
    pos, found = 0, []
    while pos < len(out):
        _, opt, length = struct.unpack_from(">QII", out, pos)
        found.append(opt)
        pos += 16 + length
    return found


def client_events(conn: ClientConnection, data: bytes, step: int) -> list[object]:
    found: list[object] = []
    for i in range(0, len(data), step):
        conn.receive_data(data[i : i + step])
        while (event := conn.next_event()) is not NEED_DATA:
            found.append(event)
            if isinstance(event, StartTls | Ready):
                return found
    return found


@pytest.mark.parametrize("mode", [TlsMode.ALLOW, TlsMode.REQUIRE])
@pytest.mark.parametrize("step", STEPS)
def test_client_sends_starttls_alone_then_negotiates_over_tls(mode: TlsMode, step: int) -> None:
    conn = ClientConnection("disk0", ["base:allocation"], tls=mode)
    assert client_events(conn, GREETING, step) == []
    out = conn.data_to_send()
    assert out[:4] == FLAGS and sent_options(out[4:]) == [Option.STARTTLS]
    assert client_events(conn, reply(Option.STARTTLS, OptionReply.ACK), step) == [StartTls()]
    assert conn.data_to_send() == b""
    conn.tls_established()
    assert conn.tls_active
    assert sent_options(conn.data_to_send()) == [Option.STRUCTURED_REPLY,
                                                 Option.SET_META_CONTEXT, Option.GO]


@pytest.mark.parametrize("refusal", [OptionReply.ERR_UNSUP, OptionReply.ERR_POLICY,
                                     OptionReply.ERR_INVALID])
@pytest.mark.parametrize("step", STEPS)
def test_client_that_requires_tls_never_falls_back(refusal: int, step: int) -> None:
    conn = ClientConnection("disk0", tls=TlsMode.REQUIRE)
    client_events(conn, GREETING, step)
    conn.data_to_send()
    with pytest.raises(TlsNotOffered, match="TLS is required"):
        client_events(conn, reply(Option.STARTTLS, refusal, b"no TLS here"), step)
    assert sent_options(conn.data_to_send()) == [Option.ABORT]  # nothing about the export
    assert isinstance(conn.next_event(), Disconnect)


def test_client_that_allows_tls_goes_on_in_plaintext() -> None:
    conn = ClientConnection("disk0", tls=TlsMode.ALLOW)
    client_events(conn, GREETING, 1 << 20)
    conn.data_to_send()
    client_events(conn, reply(Option.STARTTLS, OptionReply.ERR_UNSUP), 1 << 20)
    assert sent_options(conn.data_to_send()) == [Option.STRUCTURED_REPLY, Option.GO]
    assert not conn.tls_active


def test_client_without_tls_is_told_the_server_requires_it() -> None:
    conn = ClientConnection("disk0")
    client_events(conn, GREETING, 1 << 20)
    conn.data_to_send()
    with pytest.raises(TlsRequiredByServer, match="nbds://"):
        client_events(conn, reply(Option.STRUCTURED_REPLY, OptionReply.ERR_TLS_REQD), 1)


@pytest.mark.parametrize("injected", [reply(Option.STARTTLS, OptionReply.ACK), b"\x16"])
def test_client_refuses_plaintext_after_the_ack(injected: bytes) -> None:
    conn = ClientConnection("disk0", tls=TlsMode.REQUIRE)
    client_events(conn, GREETING, 1 << 20)
    conn.data_to_send()
    conn.receive_data(reply(Option.STARTTLS, OptionReply.ACK) + injected)
    with pytest.raises(RemoteProtocolError, match="plaintext followed"):
        conn.next_event()


def test_client_refuses_an_odd_reply_to_starttls() -> None:
    conn = ClientConnection("disk0", tls=TlsMode.REQUIRE)
    client_events(conn, GREETING, 1 << 20)
    with pytest.raises(RemoteProtocolError):
        client_events(conn, reply(Option.STARTTLS, OptionReply.SERVER, b"x"), 1 << 20)


def test_client_io_layer_mistakes_are_local_errors() -> None:
    conn = ClientConnection("disk0", tls=TlsMode.REQUIRE)
    with pytest.raises(LocalProtocolError):
        conn.tls_established()
    client_events(conn, GREETING + reply(Option.STARTTLS, OptionReply.ACK), 1 << 20)
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"\x16\x03")
    with pytest.raises(LocalProtocolError):
        conn.next_event()


# ------------------------------------------------------------- both cores with real TLS


class _Link:
    """One side of an in-memory connection: NBD core bytes, through a TlsSession once set."""

    def __init__(self) -> None:
        self.session: TlsSession | None = None

    def wrap(self, plaintext: bytes) -> bytes:
        if self.session is None or not plaintext:
            return plaintext
        self.session.write_plaintext(plaintext)
        return self.session.ciphertext_to_send()

    def unwrap(self, wire: bytes) -> bytes:
        if self.session is None:
            return wire
        if wire:
            self.session.receive_ciphertext(wire)
        return self.session.read_plaintext() or b""


def _handshake(client: TlsSession, server: TlsSession) -> None:
    for _ in range(10):
        done = client.do_handshake()
        if data := client.ciphertext_to_send():
            server.receive_ciphertext(data)
        done = server.do_handshake() and done
        if data := server.ciphertext_to_send():
            client.receive_ciphertext(data)
        if done and client.do_handshake():
            return
    raise AssertionError("handshake did not finish")


@pytest.mark.parametrize("kind", ["x509", "psk"])
def test_both_cores_over_real_tls(tmp_path: Path, kind: str) -> None:
    creds: Credentials = make_credentials(tmp_path)
    if kind == "x509":
        server_tls = server_context(TlsConfig.x509(creds.server_dir)).session()
        client_tls = client_context(TlsConfig.x509(creds.client_dir)).session("localhost")
    else:
        server_tls = server_context(TlsConfig.psk(creds.psk_dir)).session()
        client_tls = client_context(TlsConfig.psk(creds.psk_file, "alice")).session()
    srv = ServerConnection(Catalog(), tls=TlsMode.REQUIRE)
    cli = ClientConnection("disk0", tls=TlsMode.REQUIRE)
    s_link, c_link = _Link(), _Link()
    to_client = s_link.wrap(srv.data_to_send())
    ready: Ready | None = None
    data = b""
    for _ in range(50):
        if to_client:
            cli.receive_data(c_link.unwrap(to_client))
        to_client = b""
        while (event := cli.next_event()) is not NEED_DATA:
            if isinstance(event, StartTls):
                _handshake(client_tls, server_tls)
                c_link.session, s_link.session = client_tls, server_tls
                cli.tls_established()
                srv.tls_established()
            elif isinstance(event, Ready):
                ready = event
                cli.send_request(Command.READ, 0, 512)
            elif isinstance(event, ReplyChunk):
                data = event.payload[8:]
            elif isinstance(event, ReplyDone):
                assert ready is not None and data == b"\x5a" * 512
                return
        to_server = c_link.wrap(cli.data_to_send())
        if to_server:
            srv.receive_data(s_link.unwrap(to_server))
        while (sevent := srv.next_event()) is not NEED_DATA:
            if isinstance(sevent, StartTls):
                break  # the client drives the handshake in this test
            if isinstance(sevent, Request):
                srv.reply_chunk(sevent.cookie, ReplyType.OFFSET_DATA,
                                struct.pack(">Q", 0) + b"\x5a" * 512, done=True)
        to_client = s_link.wrap(srv.data_to_send())
    raise AssertionError("no reply")
