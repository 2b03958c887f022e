"""TLS for NBD's STARTTLS, as sessions that do no I/O (memory BIOs).

    server = server_context(TlsConfig.x509(Path("/etc/blocktrail/tls")))   # once, at start
    session = server.session()                                             # per connection
    # after the NBD core's StartTls event (its ACK sent in plaintext):
    while not session.do_handshake():
        send(session.ciphertext_to_send())
        session.receive_ciphertext(recv())               # b"" at EOF
    send(session.ciphertext_to_send())
    # then: plaintext = session.read_plaintext()  (None: need more ciphertext; b"": EOF)
    #       session.write_plaintext(out); send(session.ciphertext_to_send())

Two kinds of credentials, in QEMU's layouts so one directory serves QEMU, libnbd and us:

* x509 (`tls-creds-x509`, libnbd's `tls-certificates=DIR`): a server reads `server-cert.pem`,
  `server-key.pem`, and `ca-cert.pem` when it verifies client certificates; a client reads
  `ca-cert.pem` and, when present, `client-cert.pem` with `client-key.pem`. Implemented with the
  standard library (`ssl.MemoryBIO` and `SSLContext.wrap_bio`).
* PSK (`tls-creds-psk` with `DIR/keys.psk`, libnbd's `tls-psk-file=FILE`): `username:hexkey`
  lines as `psktool` writes them; a client presents one username. The standard library cannot do
  PSK before Python 3.13, and pyOpenSSL has no PSK methods, so the PSK session is a pyOpenSSL
  connection whose SSL_CTX gets the PSK callbacks through cryptography's OpenSSL bindings.

Both need TLS 1.2 or newer (the NBD spec requires 1.2; older versions are refused).

PSK between OpenSSL (here) and GnuTLS (QEMU, libnbd) works with TLS 1.3 in both directions
(checked with nbdinfo, qemu-img and qemu-nbd, GnuTLS 3.7). It works because OpenSSL's legacy PSK
callbacks (SSL_CTX_set_psk_*_callback) also serve TLS 1.3: OpenSSL turns the key into an external
PSK bound to SHA-256 (TLS_AES_128_GCM_SHA256), and GnuTLS binds external PSKs to SHA-256 too, so
both sides compute the same binder. TLS 1.2 stays on for peers without TLS 1.3, with the suites
in _PSK_TLS12_CIPHERS (no certificate, hence only PSK suites; forward-secret ones only).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import ssl
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from blocktrail.nbd.proto.errors import LocalProtocolError, TlsError

__all__ = ["ClientTlsContext", "ServerTlsContext", "TlsConfig", "TlsCredentialsError",
           "TlsError", "TlsHandshakeError", "TlsSession", "TlsSessionError", "client_context",
           "read_psk_keys", "server_context"]

# TLS 1.2 suites for PSK: the forward-secret AEAD ones that GnuTLS's NORMAL:+ECDHE-PSK:+DHE-PSK
# (QEMU's and libnbd's PSK priority) offers. It offers ECDHE-PSK only with ChaCha20 (OpenSSL has
# no ECDHE-PSK with AES-GCM, and GnuTLS's NORMAL no SHA-2 CBC suites), so AES-GCM is DHE-PSK.
# Plain PSK-AES*-GCM would work with GnuTLS too, but has no forward secrecy.
_PSK_TLS12_CIPHERS = (b"ECDHE-PSK-CHACHA20-POLY1305:DHE-PSK-AES256-GCM-SHA384:"
                      b"DHE-PSK-AES128-GCM-SHA256:DHE-PSK-CHACHA20-POLY1305")
_READ_CHUNK = 256 * 1024
_CLOSED_DURING_HANDSHAKE = ("the peer closed the connection during the TLS handshake (it may "
                            "not accept our credentials, or it does not speak TLS)")
_MAX_PSK_USERNAME = 128  # bytes; OpenSSL's PSK_MAX_IDENTITY_LEN


class TlsCredentialsError(TlsError):
    """A credentials file is missing, unreadable or invalid; the message names it."""


class TlsHandshakeError(TlsError):
    """The TLS handshake failed; the message says why (certificate not trusted, unknown PSK
    username, keys that differ, no TLS at all on the other side...)."""


class TlsSessionError(TlsError):
    """The TLS stream broke after the handshake (corrupt or forged records)."""


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """Credentials for one side of NBD's STARTTLS: exactly one of ``x509_dir`` (QEMU's
    tls-creds-x509 directory) and ``psk_file`` (a psktool keys file, or a directory holding
    ``keys.psk`` as QEMU's tls-creds-psk expects)."""

    x509_dir: Path | None = None
    psk_file: Path | None = None
    username: str = "qemu"  # PSK: the identity a client presents (QEMU's default)
    verify_client: bool = False  # x509 server: require a client certificate from ca-cert.pem

    def __post_init__(self) -> None:
        if (self.x509_dir is None) == (self.psk_file is None):
            raise TlsCredentialsError("give either an x509 credentials directory or a PSK keys "
                                      "file (exactly one)")
        if self.psk_file is not None:
            _check_username(self.username, "the PSK username")

    @classmethod
    def x509(cls, directory: Path | str, *, verify_client: bool = False) -> TlsConfig:
        return cls(x509_dir=Path(directory), verify_client=verify_client)

    @classmethod
    def psk(cls, keys_file: Path | str, username: str = "qemu") -> TlsConfig:
        return cls(psk_file=Path(keys_file), username=username)

    @property
    def psk_keys_path(self) -> Path:
        if self.psk_file is None:
            raise LocalProtocolError("not a PSK configuration")
        return self.psk_file / "keys.psk" if self.psk_file.is_dir() else self.psk_file


# ---------------------------------------------------------------------------------- sessions


class TlsSession(ABC):
    """One TLS connection over memory buffers. The caller moves bytes: ciphertext in with
    `receive_ciphertext` (b"" at EOF), ciphertext out with `ciphertext_to_send` after every
    other call. Errors are `TlsHandshakeError` / `TlsSessionError`; after one the session is
    over (send what `ciphertext_to_send` holds, the alert, then close the socket)."""

    def __init__(self) -> None:
        self.handshake_done = False
        self.peer_identity: str | None = None
        self.clean_close = False  # the peer ended with close_notify, not a bare EOF
        self._eof = False  # no more ciphertext will come
        self._ended = False  # read_plaintext has reported the end of the stream
        self._failed: TlsHandshakeError | None = None

    def receive_ciphertext(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the socket; b"" when the peer closed it."""
        if self._eof:
            if data:
                raise LocalProtocolError("ciphertext after the end of the stream")
            return
        if not data:
            self._eof = True
        self._receive(bytes(data))

    @abstractmethod
    def _receive(self, data: bytes) -> None: ...

    def do_handshake(self) -> bool:
        """Advance the handshake: True once it is done, False while it needs more ciphertext
        (send `ciphertext_to_send()` first). Raises TlsHandshakeError when it fails."""
        if self.handshake_done:
            return True
        if self._failed is not None:
            raise self._failed
        try:
            finished = self._handshake_step()
        except TlsHandshakeError as exc:
            self._failed = exc
            raise
        if not finished:
            if self._eof:
                raise TlsHandshakeError(_CLOSED_DURING_HANDSHAKE)
            return False
        self.handshake_done = True
        self.peer_identity = self._identity()
        return True

    @abstractmethod
    def _handshake_step(self) -> bool: ...

    @abstractmethod
    def _identity(self) -> str | None: ...

    def read_plaintext(self) -> bytes | None:
        """Decrypted bytes received so far; None when more ciphertext is needed; b"" once the
        peer has ended the stream (close_notify or EOF), as a socket's recv does."""
        self._check_handshake()
        if self._ended:
            return b""
        data = self._read()
        if data:
            return data
        if self._eof or self.clean_close:
            self._ended = True
            return b""
        return None

    @abstractmethod
    def _read(self) -> bytes: ...

    def write_plaintext(self, data: bytes) -> None:
        """Encrypt ``data``; its records are then in `ciphertext_to_send()`."""
        self._check_handshake()
        if data:
            self._write(data)

    @abstractmethod
    def _write(self, data: bytes) -> None: ...

    @abstractmethod
    def ciphertext_to_send(self) -> bytes: ...

    @abstractmethod
    def close(self) -> None:
        """Queue close_notify (send `ciphertext_to_send()`, then close the socket)."""

    @property
    @abstractmethod
    def version(self) -> str | None:
        """The negotiated TLS version ("TLSv1.3"), once the handshake is done."""

    @property
    @abstractmethod
    def cipher(self) -> str | None: ...

    def _check_handshake(self) -> None:
        if not self.handshake_done:
            raise LocalProtocolError("the TLS handshake is not done")


class _StdlibSession(TlsSession):
    """x509, with the standard library's ssl module."""

    def __init__(self, context: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None, describe: Callable[[ssl.SSLError], str]) -> None:
        super().__init__()
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                     server_hostname=server_hostname)
        self._describe = describe
        self._got_data = False

    def _receive(self, data: bytes) -> None:
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    def _handshake_step(self) -> bool:
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLError as exc:
            raise TlsHandshakeError(self._describe(exc)) from exc
        return True

    def _identity(self) -> str | None:
        der = self._ssl.getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).subject.rfc4514_string() if der else None

    def _read(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            try:
                chunk = self._ssl.read(_READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.clean_close = True
                break
            except ssl.SSLEOFError:
                self._eof = True  # EOF without close_notify: many NBD clients just close
                break
            except ssl.SSLError as exc:
                raise self._after_handshake_error(exc) from exc
            if not chunk:  # the ssl module's answer to close_notify
                self.clean_close = True
                break
            chunks.append(chunk)
        if chunks:
            self._got_data = True
        return b"".join(chunks)

    def _after_handshake_error(self, exc: ssl.SSLError) -> TlsError:
        # With TLS 1.3 a client's handshake ends before the server has checked its
        # certificate; a refusal then arrives as an alert on the first read.
        if not self._got_data and "ALERT" in (exc.reason or ""):
            return TlsHandshakeError(self._describe(exc))
        return TlsSessionError(f"the TLS stream is broken: {exc.reason or exc}")

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = self._ssl.write(view)
            view = view[written:]

    def ciphertext_to_send(self) -> bytes:
        return self._outgoing.read()

    def close(self) -> None:
        with contextlib.suppress(ssl.SSLError):  # close_notify is queued; no answer awaited
            self._ssl.unwrap()

    @property
    def version(self) -> str | None:
        return self._ssl.version() if self.handshake_done else None

    @property
    def cipher(self) -> str | None:
        cipher = self._ssl.cipher()
        return cipher[0] if cipher and self.handshake_done else None


# ---------------------------------------------------------------------------------- x509


@dataclass(frozen=True, slots=True)
class ServerTlsContext:
    """Loaded server credentials; `session()` makes one TlsSession per connection."""

    config: TlsConfig
    _make: Callable[[], TlsSession]

    def session(self) -> TlsSession:
        return self._make()


@dataclass(frozen=True, slots=True)
class ClientTlsContext:
    """Loaded client credentials; `session(server_hostname)` makes one TlsSession per
    connection. Give the host name (or IP address) for TCP: the server's certificate must name
    it. None (Unix sockets) checks the certificate's chain only, as QEMU and libnbd do."""

    config: TlsConfig
    _make: Callable[[str | None], TlsSession]

    def session(self, server_hostname: str | None = None) -> TlsSession:
        return self._make(server_hostname)


def server_context(config: TlsConfig) -> ServerTlsContext:
    """Read and check the server's credentials (TlsCredentialsError names the file at fault)."""
    if config.psk_file is not None:
        keys = read_psk_keys(config.psk_keys_path)
        path = config.psk_keys_path
        return ServerTlsContext(config, lambda: _PskSession(keys, path, server=True))
    directory = _x509_dir(config)
    cert, key = directory / "server-cert.pem", directory / "server-key.pem"
    _check_pair(cert, key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context)
    context.num_tickets = 0  # no resumption: NBD clients do not use it
    _load_chain(context, cert, key)
    if config.verify_client:
        _load_ca(context, directory)
        context.verify_mode = ssl.CERT_REQUIRED

    def describe(exc: ssl.SSLError) -> str:
        return _describe_x509(exc, directory, server=True)

    return ServerTlsContext(config, lambda: _StdlibSession(
        context, server_side=True, server_hostname=None, describe=describe))


def client_context(config: TlsConfig) -> ClientTlsContext:
    """Read and check the client's credentials (TlsCredentialsError names the file at fault)."""
    if config.psk_file is not None:
        path = config.psk_keys_path
        keys = read_psk_keys(path)
        if config.username not in keys:
            raise TlsCredentialsError(f"{path} has no key for the PSK username "
                                      f"{config.username!r} (it has: {', '.join(keys)})")
        own = {config.username: keys[config.username]}
        return ClientTlsContext(config, lambda _hostname: _PskSession(
            own, path, server=False, username=config.username))
    directory = _x509_dir(config)
    contexts = {}
    for check_hostname in (False, True):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        _harden(context)
        context.check_hostname = check_hostname
        _load_ca(context, directory)
        cert, key = directory / "client-cert.pem", directory / "client-key.pem"
        if cert.exists() or key.exists():
            _check_pair(cert, key)
            _load_chain(context, cert, key)
        contexts[check_hostname] = context

    def describe(exc: ssl.SSLError) -> str:
        return _describe_x509(exc, directory, server=False)

    def make(hostname: str | None) -> TlsSession:
        return _StdlibSession(contexts[hostname is not None], server_side=False,
                              server_hostname=hostname, describe=describe)

    return ClientTlsContext(config, make)


def _x509_dir(config: TlsConfig) -> Path:
    if config.x509_dir is None:  # TlsConfig holds exactly one of the two
        raise LocalProtocolError("not an x509 configuration")
    return config.x509_dir


def _harden(context: ssl.SSLContext) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TlsCredentialsError(f"{what} {path} does not exist") from None
    except PermissionError:
        raise TlsCredentialsError(f"cannot read {what} {path}: permission denied (running as "
                                  f"uid {os.getuid()})") from None
    except OSError as exc:
        raise TlsCredentialsError(f"cannot read {what} {path}: {exc.strerror}") from None


def _certificates(path: Path) -> list[x509.Certificate]:
    data = _read(path, "certificate file")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise TlsCredentialsError(f"{path} holds no PEM certificate (expected "
                                  f"'-----BEGIN CERTIFICATE-----')")
    now = datetime.datetime.now(datetime.UTC)
    for cert in certs:
        if cert.not_valid_after_utc < now:
            raise TlsCredentialsError(f"the certificate {cert.subject.rfc4514_string()} in "
                                      f"{path} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    return certs


def _check_pair(cert_path: Path, key_path: Path) -> None:
    cert = _certificates(cert_path)[0]
    data = _read(key_path, "private key file")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TlsCredentialsError(f"{key_path} is encrypted; QEMU's layout expects an "
                                  f"unencrypted key (readable by this user only)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise TlsCredentialsError(f"{key_path} holds no PEM private key") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, public) != cert.public_key().public_bytes(der, public):
        raise TlsCredentialsError(f"{key_path} is not the key of the certificate in "
                                  f"{cert_path}")


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise TlsCredentialsError(f"cannot use {cert} with {key}: {exc}") from exc


def _load_ca(context: ssl.SSLContext, directory: Path) -> None:
    ca = directory / "ca-cert.pem"
    certs = _certificates(ca)
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    try:
        context.load_verify_locations(cadata=pem.decode())
    except ssl.SSLError as exc:
        raise TlsCredentialsError(f"cannot use {ca} as a CA: {exc}") from exc
    crl = directory / "ca-crl.pem"
    if crl.exists():
        _read(crl, "revocation list")
        try:
            context.load_verify_locations(cafile=crl)
        except ssl.SSLError as exc:
            raise TlsCredentialsError(f"cannot use {crl} as a revocation list: {exc}") from exc
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def _describe_x509(exc: ssl.SSLError, directory: Path, *, server: bool) -> str:
    peer = "client" if server else "server"
    reason = exc.reason or ""
    if isinstance(exc, ssl.SSLCertVerificationError):
        if server:
            return (f"the client's certificate was not accepted ({exc.verify_message}); it must "
                    f"be signed by the CA in {directory / 'ca-cert.pem'}")
        hint = ("the server's certificate does not name the host we connected to"
                if exc.verify_code == 62 else  # X509_V_ERR_HOSTNAME_MISMATCH
                f"it must be signed by the CA in {directory / 'ca-cert.pem'}")
        return f"the server's certificate was not accepted ({exc.verify_message}); {hint}"
    if reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"):
        return ("the server requires a client certificate: put client-cert.pem and "
                f"client-key.pem in {directory}" if not server else
                "the client sent no certificate, and this server requires one")
    if reason in ("TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE",
                  "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "TLSV1_ALERT_DECRYPT_ERROR"):
        return (f"the {peer} does not accept our certificate ({reason.lower()}): it must trust "
                f"the CA that signed the certificate in {directory}")
    if isinstance(exc, ssl.SSLEOFError) or reason == "UNEXPECTED_EOF_WHILE_READING":
        return _CLOSED_DURING_HANDSHAKE
    if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG",
                  "RECORD_LAYER_FAILURE"):
        return f"the {peer} does not speak TLS 1.2 or newer here ({reason.lower()})"
    if reason in ("NO_SHARED_CIPHER", "SSLV3_ALERT_HANDSHAKE_FAILURE",
                  "UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION"):
        return (f"no TLS version or cipher in common with the {peer} ({reason.lower()}); does "
                f"it use PSK while we use certificates?")
    return f"TLS handshake with the {peer} failed: {reason.lower() or exc}"


# ---------------------------------------------------------------------------------- PSK


def read_psk_keys(path: Path) -> dict[str, bytes]:
    """A psktool keys file: `username:hexkey` lines (blank lines are skipped)."""
    text = _read(path, "PSK keys file")
    keys: dict[str, bytes] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        try:
            username, hexkey = line.decode().split(":", 1)
            _check_username(username, f"line {number} of {path}")
            key = bytes.fromhex(hexkey)
        except (UnicodeDecodeError, ValueError):
            raise TlsCredentialsError(f"line {number} of {path} is not 'username:hexkey' "
                                      f"(as psktool writes it)") from None
        if not key:
            raise TlsCredentialsError(f"line {number} of {path} has an empty key")
        keys[username] = key
    if not keys:
        raise TlsCredentialsError(f"{path} holds no 'username:hexkey' line")
    return keys


def _check_username(username: str, what: str) -> None:
    raw = username.encode()
    if not raw or len(raw) > _MAX_PSK_USERNAME or ":" in username or "\0" in username:
        raise TlsCredentialsError(f"{what}: a PSK username is 1 to {_MAX_PSK_USERNAME} bytes, "
                                  f"without ':' (got {username!r})")


class _PskSession(TlsSession):
    """PSK with pyOpenSSL over memory BIOs. The server looks the client's username up in
    ``keys``; a client presents ``username``. The ffi callback is kept on the session, which the
    SSL_CTX (one per session) never outlives."""

    def __init__(self, keys: dict[str, bytes], path: Path, *, server: bool,
                 username: str = "") -> None:
        super().__init__()
        from cryptography.hazmat.bindings.openssl.binding import Binding
        from OpenSSL import SSL

        self._SSL = SSL
        binding = Binding()
        self._ffi: Any = binding.ffi
        lib: Any = binding.lib
        self._keys = keys
        self._path = path
        self._server = server
        self._username = username
        self._offered: str | None = None  # the username a client presented to us
        self._unknown = False
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_RENEGOTIATION
                            | SSL.OP_CIPHER_SERVER_PREFERENCE)
        context.set_cipher_list(_PSK_TLS12_CIPHERS)
        if not server:
            # No CA is loaded: a server that shows a certificate instead of knowing the key
            # fails verification (with TLS 1.3 a client would otherwise accept any certificate).
            context.set_verify(SSL.VERIFY_PEER)
        raw_context = context._context
        if server:
            self._callback = self._ffi.callback(
                "unsigned int(SSL *, const char *, unsigned char *, unsigned int)",
                self._server_key, onerror=_callback_failed)
            lib.SSL_CTX_set_psk_server_callback(raw_context, self._callback)
        else:
            self._callback = self._ffi.callback(
                "unsigned int(SSL *, const char *, char *, unsigned int, unsigned char *, "
                "unsigned int)", self._client_key, onerror=_callback_failed)
            lib.SSL_CTX_set_psk_client_callback(raw_context, self._callback)
        self._context = context
        self._conn = SSL.Connection(context, None)
        if server:
            self._conn.set_accept_state()
        else:
            self._conn.set_connect_state()

    def _server_key(self, _ssl: Any, identity: Any, psk: Any, max_psk_len: int) -> int:
        name = self._ffi.string(identity).decode(errors="replace") if identity else ""
        self._offered = name
        key = self._keys.get(name)
        if key is None or len(key) > max_psk_len:
            self._unknown = True
            return 0
        self._ffi.memmove(psk, key, len(key))
        return len(key)

    def _client_key(self, _ssl: Any, _hint: Any, identity: Any, max_identity_len: int,
                    psk: Any, max_psk_len: int) -> int:
        raw = self._username.encode()
        key = self._keys[self._username]
        if len(raw) + 1 > max_identity_len or len(key) > max_psk_len:
            return 0
        self._ffi.memmove(identity, raw + b"\0", len(raw) + 1)
        self._ffi.memmove(psk, key, len(key))
        return len(key)

    def _receive(self, data: bytes) -> None:
        if data:
            self._conn.bio_write(data)
        else:
            self._conn.bio_shutdown()

    def _handshake_step(self) -> bool:
        SSL = self._SSL
        try:
            self._conn.do_handshake()
        except SSL.WantReadError:
            return False
        except SSL.Error as exc:
            raise TlsHandshakeError(self._describe(exc)) from exc
        if (self._offered is None if self._server
                else self._conn.get_peer_certificate() is not None):
            raise TlsHandshakeError(f"the {'client' if self._server else 'server'} did not "
                                    f"authenticate with PSK")
        return True

    def _identity(self) -> str | None:
        return self._offered if self._server else self._username

    def _describe(self, exc: Exception) -> str:
        reason = _openssl_reason(exc)
        if self._server:
            if self._offered is None:
                return (f"the client offered no PSK ({reason}): does it use certificates while "
                        f"this server uses a PSK keys file?")
            if self._unknown:
                return (f"the client's PSK username {self._offered!r} is not in {self._path}")
            if "binder" in reason or "decrypt" in reason or "bad record mac" in reason:
                return (f"the client's key for PSK username {self._offered!r} differs from the "
                        f"one in {self._path}")
        else:
            if "unknown psk identity" in reason:
                return (f"the server does not know the PSK username {self._username!r}; add "
                        f"its line from {self._path} to the server's keys file")
            if "decrypt" in reason or "bad record mac" in reason or "illegal parameter" in reason:
                return (f"the server's key for PSK username {self._username!r} differs from the "
                        f"one in {self._path} (or it does not know that username)")
        if "unexpected eof" in reason or "syscall" in reason:
            return _CLOSED_DURING_HANDSHAKE
        if "certificate verify failed" in reason:
            return ("the server shows a certificate instead of using PSK: it is set up for x509 "
                    "credentials, not a PSK keys file")
        if "wrong version number" in reason or "packet length too long" in reason:
            return "the peer does not speak TLS 1.2 or newer here"
        if "no shared cipher" in reason or "handshake failure" in reason:
            return (f"no TLS version or cipher in common with the peer ({reason}); does it use "
                    f"certificates while we use PSK, or does it not know username "
                    f"{self._username or self._offered!r}?")
        return f"TLS handshake failed: {reason}"

    def _read(self) -> bytes:
        SSL = self._SSL
        chunks: list[bytes] = []
        while True:
            try:
                chunk = self._conn.recv(_READ_CHUNK)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self.clean_close = True
                break
            except SSL.SysCallError:
                self._eof = True  # EOF without close_notify
                break
            except SSL.Error as exc:
                reason = _openssl_reason(exc)
                if "unexpected eof" in reason:
                    self._eof = True
                    break
                raise TlsSessionError(f"the TLS stream is broken: {reason}") from exc
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = self._conn.send(view)
            view = view[written:]

    def ciphertext_to_send(self) -> bytes:
        SSL = self._SSL
        chunks: list[bytes] = []
        while True:
            try:
                chunks.append(self._conn.bio_read(_READ_CHUNK))
            except SSL.WantReadError:
                return b"".join(chunks)

    def close(self) -> None:
        with contextlib.suppress(self._SSL.Error):  # close_notify is queued; no answer awaited
            self._conn.shutdown()

    @property
    def version(self) -> str | None:
        return self._conn.get_protocol_version_name() if self.handshake_done else None

    @property
    def cipher(self) -> str | None:
        return self._conn.get_cipher_name() if self.handshake_done else None


def _callback_failed(_exc_type: object, _exc: object, _traceback: object) -> None:
    """A PSK callback that raised answers 0 (no key), and prints nothing."""


def _openssl_reason(exc: Exception) -> str:
    errors = exc.args[0] if exc.args else None
    if isinstance(errors, list) and errors and isinstance(errors[-1], tuple):
        return "; ".join(str(e[-1]) for e in errors).lower()
    return str(exc).lower()
