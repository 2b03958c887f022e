"""A floor for an NBD server written in Python: replay what a real server sent in one recorded
connection, with no NBD logic at all.

`record` puts a relay between one client run and a server, and notes each piece the server
sent with how many bytes the client had sent before it. `python -m bench.nbd_replay SOCKET FILE`
then serves that recording on a Unix socket from a minimal asyncio server (a `Protocol`: one
callback per arrival, no task, no parsing): to each connection it sends each recorded piece as
soon as the client has sent as many bytes as it had then. A client that repeats the recorded
run byte for byte gets the same replies, so timing it against the replay shows what the same
exchange costs when the server does nothing but the asyncio loop and the socket calls: what
the server's own work adds is the rest.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import select
import socket
import sys
import tempfile
import threading
from collections.abc import Callable

Recording = list[tuple[int, bytes]]  # (bytes the client had sent, what the server sent then)


def record(upstream: str, run_client: Callable[[str], object]) -> Recording:
    """Run ``run_client(socket path)`` once through a relay to the server at ``upstream``."""
    pieces: Recording = []
    with tempfile.TemporaryDirectory(prefix="bt-relay-") as work:
        path = os.path.join(work, "relay.sock")
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(path)
            listener.listen(1)
            relay = threading.Thread(target=_relay, args=(listener, upstream, pieces),
                                     daemon=True)  # a client that never came: no hang at exit
            relay.start()
            try:
                run_client(path)
            finally:
                relay.join(timeout=10)
    merged: Recording = []
    for sent, data in pieces:  # pieces the server sent at the same point are one reply
        if merged and merged[-1][0] == sent:
            merged[-1] = (sent, merged[-1][1] + data)
        else:
            merged.append((sent, data))
    return merged


def _relay(listener: socket.socket, upstream: str, pieces: Recording) -> None:
    client, _ = listener.accept()
    with client, socket.socket(socket.AF_UNIX) as server:
        server.connect(upstream)
        sent = 0
        while True:
            readable, _, _ = select.select([client, server], [], [])
            if client in readable:
                data = client.recv(1 << 20)
                if not data:
                    return
                sent += len(data)
                server.sendall(data)
            if server in readable:
                data = server.recv(1 << 20)
                if not data:
                    return
                pieces.append((sent, data))
                client.sendall(data)


def save(recording: Recording, path: str) -> None:
    with open(path, "w") as f:
        json.dump([[sent, base64.b64encode(data).decode()] for sent, data in recording], f)


def load(path: str) -> Recording:
    with open(path) as f:
        return [(int(sent), base64.b64decode(data)) for sent, data in json.load(f)]


class _Replay(asyncio.Protocol):
    def __init__(self, recording: Recording) -> None:
        self._recording = recording
        self._next = 0
        self._received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        self._transport = transport
        self._send_due()

    def data_received(self, data: bytes) -> None:
        self._received += len(data)
        self._send_due()

    def _send_due(self) -> None:
        recording = self._recording
        while self._next < len(recording) and recording[self._next][0] <= self._received:
            self._transport.write(recording[self._next][1])
            self._next += 1


async def serve(path: str, recording: Recording) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = await asyncio.get_running_loop().create_unix_server(
        lambda: _Replay(recording), path)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m bench.nbd_replay SOCKET RECORDING", file=sys.stderr)
        return 2
    asyncio.run(serve(argv[0], load(argv[1])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
