"""Blocking-socket drivers for the sans-IO NBD cores with a TlsSession, for the TLS tests.

`NbdTlsServer` serves one in-memory read-only export ("disk0") on a Unix or TCP socket, one
thread per connection, and records what each connection ended with; `client_read` reads from
any NBD server with our client core. Both show how an I/O layer drives `StartTls`.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from blocktrail.nbd.proto import (
    NEED_DATA,
    ClientConnection,
    Command,
    Disconnect,
    Errno,
    ExportChosen,
    ExportInfo,
    Ready,
    ReplyChunk,
    ReplyDone,
    ReplyType,
    Request,
    ServerConnection,
    StartTls,
    TlsMode,
)
from blocktrail.nbd.tls import ClientTlsContext, ServerTlsContext, TlsHandshakeError, TlsSession

EXPORT = "disk0"


def pattern(size_bytes: int) -> bytes:
    return bytes((i * 7 + (i >> 12)) & 0xFF for i in range(size_bytes))


class Channel:
    """A socket that turns into TLS after `handshake`; `recv` gives plaintext, b"" at EOF."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.session: TlsSession | None = None

    def send(self, plaintext: bytes) -> None:
        if self.session is not None and plaintext:
            self.session.write_plaintext(plaintext)
            plaintext = self.session.ciphertext_to_send()
        if plaintext:
            self.sock.sendall(plaintext)

    def recv(self) -> bytes:
        if self.session is None:
            return self.sock.recv(1 << 20)
        while (plaintext := self.session.read_plaintext()) is None:
            self.session.receive_ciphertext(self.sock.recv(1 << 20))
            if out := self.session.ciphertext_to_send():  # e.g. a TLS 1.3 key update
                self.sock.sendall(out)
        return plaintext

    def handshake(self, session: TlsSession) -> None:
        try:
            while not session.do_handshake():
                self.sock.sendall(session.ciphertext_to_send())
                session.receive_ciphertext(self.sock.recv(1 << 20))
        except TlsHandshakeError:
            with contextlib.suppress(OSError):
                self.sock.sendall(session.ciphertext_to_send())  # the alert that says why
            raise
        self.sock.sendall(session.ciphertext_to_send())
        self.session = session

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            with contextlib.suppress(OSError):
                self.sock.sendall(self.session.ciphertext_to_send())
        self.sock.close()


class _Catalog:
    def __init__(self, size_bytes: int) -> None:
        self.info = ExportInfo(EXPORT, size_bytes, read_only=True, description="TLS test")

    def lookup(self, name: str) -> ExportInfo | None:
        return self.info if name == EXPORT else None

    def names(self) -> list[str]:
        return [EXPORT]


@dataclass
class Outcome:
    """How one connection ended: the export chosen, the peer's TLS identity, the error."""

    chosen: bool = False
    tls_version: str | None = None
    cipher: str | None = None
    peer_identity: str | None = None
    reads: int = 0
    error: Exception | None = None


@dataclass
class NbdTlsServer:
    data: bytes
    mode: TlsMode
    tls: ServerTlsContext | None
    unix_path: Path | None = None  # None: TCP on 127.0.0.1
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.unix_path is not None:
            self._listener = socket.socket(socket.AF_UNIX)
            self._listener.bind(str(self.unix_path))
        else:
            self._listener = socket.socket(socket.AF_INET)
            self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self.port = self._listener.getsockname()[1] if self.unix_path is None else 0
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            outcome = Outcome()
            self.outcomes.append(outcome)
            thread = threading.Thread(target=self._serve, args=(sock, outcome), daemon=True)
            self._threads.append(thread)
            thread.start()

    def wait_idle(self, timeout: float = 10) -> None:
        """Wait until every connection made so far (none still waiting in the listen queue) has
        ended on this side: twice in a row, 20 ms apart, so one being accepted is not missed."""
        deadline = time.monotonic() + timeout
        quiet = 0
        while quiet < 2 and time.monotonic() < deadline:
            pending = select.select([self._listener], [], [], 0)[0]
            busy = pending or any(t.is_alive() for t in list(self._threads))
            quiet = 0 if busy else quiet + 1
            time.sleep(0.02)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._accepter.join(10)
        for thread in self._threads:
            thread.join(10)

    def __enter__(self) -> NbdTlsServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _serve(self, sock: socket.socket, outcome: Outcome) -> None:
        channel = Channel(sock)
        conn = ServerConnection(_Catalog(len(self.data)), tls=self.mode)
        structured = False
        try:
            channel.send(conn.data_to_send())
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    channel.send(conn.data_to_send())
                    conn.receive_data(channel.recv())
                elif isinstance(event, StartTls):
                    channel.send(conn.data_to_send())  # the ACK, in plaintext
                    if self.tls is None:
                        raise RuntimeError("StartTls without TLS credentials")
                    channel.handshake(self.tls.session())
                    conn.tls_established()
                    outcome.tls_version = channel.session.version if channel.session else None
                    outcome.cipher = channel.session.cipher if channel.session else None
                    outcome.peer_identity = (channel.session.peer_identity
                                             if channel.session else None)
                elif isinstance(event, ExportChosen):
                    outcome.chosen = True
                    structured = event.structured_replies
                elif isinstance(event, Request):
                    self._answer(conn, event, structured)
                    outcome.reads += event.command is Command.READ
                elif isinstance(event, Disconnect):
                    channel.send(conn.data_to_send())
                    return
                else:  # a request the core refuses by itself, with its cookie and errno
                    conn.reply_error(event.cookie, event.errno, event.message)  # type: ignore[union-attr]
        except Exception as exc:
            outcome.error = exc
        finally:
            channel.close()

    def _answer(self, conn: ServerConnection, request: Request, structured: bool) -> None:
        end = request.offset + request.length
        if request.command is Command.READ:
            if end > len(self.data):
                conn.reply_error(request.cookie, Errno.EINVAL, "read past the end")
                return
            data = self.data[request.offset : end]
            if structured:
                conn.reply_chunk(request.cookie, ReplyType.OFFSET_DATA,
                                 struct.pack(">Q", request.offset) + data, done=True)
            else:
                conn.reply_simple(request.cookie, 0, data)
        elif request.command in (Command.FLUSH, Command.CACHE):
            conn.reply_simple(request.cookie)
        else:
            conn.reply_error(request.cookie, Errno.EPERM, "read-only export")


def client_read(sock: socket.socket, export: str, mode: TlsMode, tls: ClientTlsContext | None,
                offset: int, length: int, *, hostname: str | None = None
                ) -> tuple[bytes, TlsSession | None]:
    """Connect with our client core over ``sock``, read ``length`` bytes, disconnect."""
    channel = Channel(sock)
    conn = ClientConnection(export, tls=mode)
    data = bytearray()
    try:
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                channel.send(conn.data_to_send())
                conn.receive_data(channel.recv())
            elif isinstance(event, StartTls):
                if tls is None:
                    raise RuntimeError("StartTls without TLS credentials")
                channel.handshake(tls.session(hostname))
                conn.tls_established()
            elif isinstance(event, Ready):
                conn.send_request(Command.READ, offset, length)
                channel.send(conn.data_to_send())
            elif isinstance(event, ReplyChunk):
                data += event.payload[8:] if event.kind is ReplyType.OFFSET_DATA else b""
            elif isinstance(event, ReplyDone):
                if event.error:
                    raise OSError(event.error, event.message)
                conn.send_request(Command.DISC)
                channel.send(conn.data_to_send())
                return bytes(data), channel.session
    finally:
        channel.close()
