"""A raw NBD client for server tests: builds requests and parses replies byte by byte itself,
so a test of our server does not lean on our own client code."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF
OPT_GO, OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT = 7, 8, 10
REP_ACK, REP_META_CONTEXT, REP_INFO = 1, 4, 3
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = range(8)
FLAG_DF, FLAG_REQ_ONE = 4, 8
CHUNK_NONE, CHUNK_DATA, CHUNK_HOLE, CHUNK_BLOCK_STATUS = 0, 1, 2, 5
CHUNK_ERROR = 2**15 + 1


@dataclass
class Reply:
    cookie: int
    error: int = 0
    message: str = ""
    data: bytearray = field(default_factory=bytearray)  # a read's bytes, holes filled
    chunks: list[tuple[int, int]] = field(default_factory=list)  # (type, payload length)
    block_status: dict[int, list[tuple[int, int]]] = field(default_factory=dict)


class RawClient:
    def __init__(self, path: str, export: str, *, structured: bool = True,
                 contexts: tuple[str, ...] = (), timeout: float = 30) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.structured = structured
        self.contexts: dict[int, str] = {}
        self._reads: dict[int, tuple[int, int]] = {}  # cookie -> (offset, length)
        self._negotiate(export.encode(), contexts)

    def recv_exactly(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("the server closed the connection")
            out += chunk
        return bytes(out)

    def _option(self, option: int, data: bytes) -> None:
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)

    def _option_replies(self, option: int) -> list[tuple[int, bytes]]:
        out = []
        while True:
            magic, opt, kind, length = struct.unpack(">QIII", self.recv_exactly(20))
            assert magic == OPT_REPLY_MAGIC and opt == option
            out.append((kind, self.recv_exactly(length)))
            if kind == REP_ACK or kind >= 2**31:
                return out

    def _negotiate(self, export: bytes, contexts: tuple[str, ...]) -> None:
        magic, _opt, flags = struct.unpack(">QQH", self.recv_exactly(18))
        assert magic == 0x4E42444D41474943 and flags & 1
        self.sock.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
        if self.structured:
            self._option(OPT_STRUCTURED_REPLY, b"")
            assert self._option_replies(OPT_STRUCTURED_REPLY)[-1][0] == REP_ACK
        if contexts:
            body = struct.pack(">I", len(export)) + export + struct.pack(">I", len(contexts))
            body += b"".join(struct.pack(">I", len(c)) + c.encode() for c in contexts)
            self._option(OPT_SET_META_CONTEXT, body)
            for kind, data in self._option_replies(OPT_SET_META_CONTEXT):
                if kind == REP_META_CONTEXT:
                    self.contexts[struct.unpack_from(">I", data)[0]] = data[4:].decode()
        self._option(OPT_GO, struct.pack(">I", len(export)) + export + struct.pack(">H", 0))
        replies = self._option_replies(OPT_GO)
        if replies[-1][0] != REP_ACK:
            raise ConnectionError(f"GO refused: {replies[-1][1].decode(errors='replace')}")
        info = next(d for k, d in replies if k == REP_INFO and d[:2] == b"\0\0")
        self.size, self.transmission_flags = struct.unpack_from(">QH", info, 2)

    def request_bytes(self, command: int, offset: int = 0, length: int = 0, flags: int = 0,
                      data: bytes = b"", cookie: int = 1) -> bytes:
        if command == READ:
            self._reads[cookie] = (offset, length)
        return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, command, cookie, offset,
                           length) + data

    def send(self, command: int, offset: int = 0, length: int = 0, flags: int = 0,
             data: bytes = b"", cookie: int = 1) -> None:
        self.sock.sendall(self.request_bytes(command, offset, length, flags, data, cookie))

    def reply(self) -> Reply:
        """The next whole reply (all chunks of one cookie; replies of different cookies must
        not interleave their chunks in these tests' use)."""
        (magic,) = struct.unpack(">I", self.recv_exactly(4))
        if magic == SIMPLE_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv_exactly(12))
            reply = Reply(cookie, error)
            if not error and cookie in self._reads:
                reply.data += self.recv_exactly(self._reads.pop(cookie)[1])
            return reply
        assert magic == STRUCTURED_MAGIC, hex(magic)
        reply: Reply | None = None
        while True:
            flags, kind, cookie, length = struct.unpack(">HHQI", self.recv_exactly(16))
            payload = self.recv_exactly(length)
            if reply is None:
                reply = Reply(cookie)
                base, size = self._reads.get(cookie, (0, 0))
                reply.data += bytes(size)
            assert cookie == reply.cookie
            reply.chunks.append((kind, length))
            if kind == CHUNK_DATA:
                (offset,) = struct.unpack_from(">Q", payload)
                reply.data[offset - base : offset - base + length - 8] = payload[8:]
            elif kind == CHUNK_HOLE:
                pass  # already zeros
            elif kind == CHUNK_BLOCK_STATUS:
                (context,) = struct.unpack_from(">I", payload)
                reply.block_status[context] = [struct.unpack_from(">II", payload, i)
                                               for i in range(4, length, 8)]
            elif kind >= 2**15:
                reply.error, size = struct.unpack_from(">IH", payload)
                reply.message = payload[6 : 6 + size].decode()
            if flags & 1:
                self._reads.pop(cookie, None)
                return reply
            (magic,) = struct.unpack(">I", self.recv_exactly(4))
            assert magic == STRUCTURED_MAGIC

    def close(self) -> None:
        self.sock.close()
