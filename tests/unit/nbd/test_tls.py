"""TLS sessions in memory, client <-> server, x509 and PSK: handshakes, data both ways, identities,
and the failures a user must be able to act on (wrong CA, wrong key, unknown PSK username...)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from blocktrail.nbd.proto import LocalProtocolError
from blocktrail.nbd.tls import (
    TlsConfig,
    TlsCredentialsError,
    TlsError,
    TlsHandshakeError,
    TlsSession,
    TlsSessionError,
    client_context,
    read_psk_keys,
    server_context,
)
from tlscreds import Credentials, make_credentials


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    return make_credentials(tmp_path_factory.mktemp("tls"))


def _move(source: TlsSession, target: TlsSession, step: int) -> None:
    data = source.ciphertext_to_send()
    for i in range(0, len(data), step):
        target.receive_ciphertext(data[i : i + step])


def handshake(client: TlsSession, server: TlsSession, step: int = 1 << 20) -> None:
    """Run both handshakes to the end, moving ciphertext ``step`` bytes at a time."""
    for _ in range(10):
        client_done = client.do_handshake()
        _move(client, server, step)
        server_done = server.do_handshake()
        _move(server, client, step)
        if client_done and server_done:
            return
    raise AssertionError("handshake did not finish")


def read_all(session: TlsSession) -> bytes:
    out = bytearray()
    while chunk := session.read_plaintext():
        out += chunk
    return bytes(out)


def pair(creds: Credentials, kind: str, hostname: str | None = None
         ) -> tuple[TlsSession, TlsSession]:
    if kind == "x509":
        server = server_context(TlsConfig.x509(creds.server_dir, verify_client=True))
        client = client_context(TlsConfig.x509(creds.client_dir))
    else:
        server = server_context(TlsConfig.psk(creds.psk_dir))
        client = client_context(TlsConfig.psk(creds.psk_file, creds.psk_username))
    return client.session(hostname), server.session()


@pytest.mark.parametrize("kind", ["x509", "psk"])
@pytest.mark.parametrize("step", [1, 7, 1 << 20])
def test_handshake_and_data_both_ways(creds: Credentials, kind: str, step: int) -> None:
    client, server = pair(creds, kind, "localhost" if kind == "x509" else None)
    handshake(client, server, step)
    assert client.version == server.version == "TLSv1.3"
    if kind == "x509":
        assert server.peer_identity == "CN=backup-client,O=blocktrail tests"
        assert client.peer_identity == "CN=localhost,O=blocktrail tests"
    else:
        assert server.peer_identity == client.peer_identity == creds.psk_username
    assert server.read_plaintext() is None  # nothing yet: need more ciphertext
    payload = bytes(range(256)) * 600
    client.write_plaintext(payload)
    _move(client, server, step)
    assert read_all(server) == payload
    server.write_plaintext(b"reply")
    _move(server, client, step)
    assert read_all(client) == b"reply"
    client.close()
    _move(client, server, step)
    assert server.read_plaintext() == b"" and server.clean_close
    assert server.read_plaintext() == b""  # the end stays the end


def test_bare_eof_ends_the_stream_without_clean_close(creds: Credentials) -> None:
    client, server = pair(creds, "psk")
    handshake(client, server)
    server.receive_ciphertext(b"")
    assert server.read_plaintext() == b"" and not server.clean_close


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1"])
def test_client_checks_the_host_name(creds: Credentials, hostname: str) -> None:
    client, server = pair(creds, "x509", hostname)
    handshake(client, server)


def test_wrong_host_name_is_refused(creds: Credentials) -> None:
    client, server = pair(creds, "x509", "backup.example.com")
    with pytest.raises(TlsHandshakeError, match=r"does not name the host"):
        handshake(client, server)


def test_server_signed_by_an_unknown_ca_is_refused(creds: Credentials) -> None:
    server = server_context(TlsConfig.x509(creds.server_dir)).session()
    client = client_context(TlsConfig.x509(creds.other_ca_client_dir)).session("localhost")
    with pytest.raises(TlsHandshakeError, match=r"server's certificate was not accepted.*"
                       r"ca-cert.pem"):
        handshake(client, server)
    # the alert tells the server why
    _move(client, server, 1 << 20)
    with pytest.raises(TlsHandshakeError, match=r"does not accept our certificate"):
        server.do_handshake()


def test_client_signed_by_an_unknown_ca_is_refused(creds: Credentials, tmp_path: Path) -> None:
    # a client that trusts our CA but holds a certificate from another one
    mixed = tmp_path / "mixed"
    shutil.copytree(creds.other_ca_client_dir, mixed)
    shutil.copy(creds.client_dir / "ca-cert.pem", mixed / "ca-cert.pem")
    server = server_context(TlsConfig.x509(creds.server_dir, verify_client=True)).session()
    client = client_context(TlsConfig.x509(mixed)).session("localhost")
    with pytest.raises(TlsHandshakeError, match=r"client's certificate was not accepted"):
        handshake(client, server)
    _move(server, client, 1 << 20)
    # TLS 1.3: the client's handshake is over before the server judged its certificate
    with pytest.raises(TlsHandshakeError, match=r"does not accept our certificate"):
        client.read_plaintext()


def test_server_that_verifies_clients_needs_a_certificate(creds: Credentials) -> None:
    server = server_context(TlsConfig.x509(creds.server_dir, verify_client=True)).session()
    client = client_context(TlsConfig.x509(creds.client_dir_no_cert)).session(None)
    with pytest.raises(TlsHandshakeError, match=r"sent no certificate"):
        handshake(client, server)
    _move(server, client, 1 << 20)
    with pytest.raises(TlsHandshakeError, match=r"requires a client certificate: put "
                       r"client-cert.pem"):
        client.read_plaintext()


def test_server_without_client_verification_accepts_a_client_without_certificate(
        creds: Credentials) -> None:
    server = server_context(TlsConfig.x509(creds.server_dir)).session()
    client = client_context(TlsConfig.x509(creds.client_dir_no_cert)).session(None)
    handshake(client, server)
    assert server.peer_identity is None


@pytest.fixture
def server_dir(creds: Credentials, tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "server"
    shutil.copytree(creds.server_dir, directory)
    yield directory


@pytest.mark.parametrize("name", ["server-cert.pem", "server-key.pem"])
def test_missing_server_file_is_named(server_dir: Path, name: str) -> None:
    (server_dir / name).unlink()
    with pytest.raises(TlsCredentialsError, match=f"{server_dir / name} does not exist"):
        server_context(TlsConfig.x509(server_dir))


def test_ca_is_needed_only_to_verify_clients(server_dir: Path) -> None:
    (server_dir / "ca-cert.pem").unlink()
    server_context(TlsConfig.x509(server_dir))
    with pytest.raises(TlsCredentialsError, match=r"ca-cert.pem does not exist"):
        server_context(TlsConfig.x509(server_dir, verify_client=True))


def test_unreadable_file_is_named(server_dir: Path) -> None:
    (server_dir / "server-key.pem").unlink()
    (server_dir / "server-key.pem").mkdir()
    with pytest.raises(TlsCredentialsError, match=r"cannot read private key file .*server-key"):
        server_context(TlsConfig.x509(server_dir))


def test_key_of_another_certificate_is_refused(server_dir: Path, creds: Credentials) -> None:
    shutil.copy(creds.client_dir / "client-key.pem", server_dir / "server-key.pem")
    with pytest.raises(TlsCredentialsError, match=r"server-key.pem is not the key of the "
                       r"certificate in .*server-cert.pem"):
        server_context(TlsConfig.x509(server_dir))


def test_garbage_certificate_is_refused(server_dir: Path) -> None:
    (server_dir / "server-cert.pem").write_text("not a certificate\n")
    with pytest.raises(TlsCredentialsError, match=r"server-cert.pem holds no PEM certificate"):
        server_context(TlsConfig.x509(server_dir))


def test_client_key_without_certificate_is_refused(creds: Credentials, tmp_path: Path) -> None:
    directory = tmp_path / "client"
    shutil.copytree(creds.client_dir, directory)
    (directory / "client-cert.pem").unlink()
    with pytest.raises(TlsCredentialsError, match=r"client-cert.pem does not exist"):
        client_context(TlsConfig.x509(directory))


def test_psk_unknown_username_is_named(creds: Credentials, tmp_path: Path) -> None:
    keys = tmp_path / "keys.psk"
    keys.write_text(f"mallory:{'ab' * 32}\n")
    server = server_context(TlsConfig.psk(creds.psk_dir)).session()
    client = client_context(TlsConfig.psk(keys, "mallory")).session()
    with pytest.raises(TlsHandshakeError) as info:
        handshake(client, server)
    _move(server, client, 1 << 20)
    message = str(info.value)
    if "mallory" in message and "is not in" in message:  # the server failed first
        with pytest.raises(TlsHandshakeError, match=r"mallory"):
            client.do_handshake()
    else:
        with pytest.raises(TlsHandshakeError, match=r"'mallory' is not in"):
            server.do_handshake()


def test_psk_wrong_key_is_refused(creds: Credentials) -> None:
    server = server_context(TlsConfig.psk(creds.psk_dir)).session()
    client = client_context(TlsConfig.psk(creds.other_psk_file, creds.psk_username)).session()
    errors: list[TlsError] = []
    for _ in range(6):
        for session, peer in ((client, server), (server, client)):
            try:
                session.do_handshake()
            except TlsHandshakeError as exc:
                errors.append(exc)
            _move(session, peer, 1 << 20)
        if errors:
            break
    assert errors and all("differs" in str(e) for e in errors), errors
    assert not (client.handshake_done and server.handshake_done)


def test_psk_client_username_must_be_in_its_file(creds: Credentials) -> None:
    with pytest.raises(TlsCredentialsError, match=r"no key for the PSK username 'bob'"):
        client_context(TlsConfig.psk(creds.psk_file, "bob"))


@pytest.mark.parametrize("text,match", [
    ("alice\n", "line 1 .* is not 'username:hexkey'"),
    ("\nalice:zz\n", "line 2 .* is not 'username:hexkey'"),
    ("alice:\n", "line 1 .* empty key"),
    ("\n\n", "holds no 'username:hexkey' line"),
])
def test_malformed_psk_file_is_refused(tmp_path: Path, text: str, match: str) -> None:
    keys = tmp_path / "keys.psk"
    keys.write_text(text)
    with pytest.raises(TlsCredentialsError, match=match):
        read_psk_keys(keys)


def test_psk_file_in_psktool_format(tmp_path: Path) -> None:
    keys = tmp_path / "keys.psk"
    keys.write_text("alice:00ff\nbob:" + "11" * 64 + "\n")
    assert read_psk_keys(keys) == {"alice": b"\x00\xff", "bob": b"\x11" * 64}


def test_psk_client_against_x509_server_fails_clearly(creds: Credentials) -> None:
    server = server_context(TlsConfig.x509(creds.server_dir)).session()
    client = client_context(TlsConfig.psk(creds.psk_file, creds.psk_username)).session()
    with pytest.raises(TlsHandshakeError, match=r"shows a certificate instead of using PSK"):
        handshake(client, server)


def test_x509_client_against_psk_server_fails(creds: Credentials) -> None:
    server = server_context(TlsConfig.psk(creds.psk_dir)).session()
    client = client_context(TlsConfig.x509(creds.client_dir)).session("localhost")
    with pytest.raises(TlsHandshakeError):
        handshake(client, server)


def test_plaintext_peer_is_not_tls(creds: Credentials) -> None:
    for kind in ("x509", "psk"):
        _, server = pair(creds, kind)
        server.receive_ciphertext(b"GET / HTTP/1.0\r\n\r\n")
        with pytest.raises(TlsHandshakeError):
            server.do_handshake()


def test_eof_during_handshake(creds: Credentials) -> None:
    client, _ = pair(creds, "x509", "localhost")
    client.do_handshake()
    client.receive_ciphertext(b"")
    with pytest.raises(TlsHandshakeError, match=r"closed the connection during the TLS"):
        client.do_handshake()


@pytest.mark.parametrize("kind", ["x509", "psk"])
def test_tampered_record_breaks_the_stream(creds: Credentials, kind: str) -> None:
    client, server = pair(creds, kind, "localhost" if kind == "x509" else None)
    handshake(client, server)
    client.write_plaintext(b"x" * 100)
    record = bytearray(client.ciphertext_to_send())
    record[-5] ^= 1
    server.receive_ciphertext(bytes(record))
    with pytest.raises(TlsSessionError):
        server.read_plaintext()


def test_plaintext_before_the_handshake_is_a_local_error(creds: Credentials) -> None:
    client, _ = pair(creds, "psk")
    with pytest.raises(LocalProtocolError):
        client.write_plaintext(b"x")
    with pytest.raises(LocalProtocolError):
        client.read_plaintext()


def test_config_needs_exactly_one_kind_and_a_good_username(tmp_path: Path) -> None:
    with pytest.raises(TlsCredentialsError):
        TlsConfig()
    with pytest.raises(TlsCredentialsError):
        TlsConfig(x509_dir=tmp_path, psk_file=tmp_path)
    with pytest.raises(TlsCredentialsError, match=r"without ':'"):
        TlsConfig.psk(tmp_path, "a:b")


@pytest.mark.parametrize("kind", ["x509", "psk"])
def test_ciphertext_as_a_buffer_and_nothing_after_eof(creds: Credentials, kind: str) -> None:
    client, server = pair(creds, kind, "localhost" if kind == "x509" else None)
    handshake(client, server)
    client.write_plaintext(b"abc")
    server.receive_ciphertext(memoryview(bytearray(client.ciphertext_to_send())))
    assert server.read_plaintext() == b"abc"
    server.receive_ciphertext(b"")
    server.receive_ciphertext(b"")  # EOF twice is still EOF
    with pytest.raises(LocalProtocolError, match="after the end"):
        server.receive_ciphertext(b"x")
