"""A scripted HTTP server standing in for an S3 store: it answers each request with the next
step of a script, so that answers a real server gives rarely (a reset, a reply cut short, a
body that cannot be read) can be tested against the real boto3 and urllib3 clients."""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

OBJECT = bytes(range(256)) * 4


@dataclass
class Script:
    """What the server answers, in turn: (status, headers, body), "reset" (the connection is
    closed without an answer), "short" (a 206 that promises more bytes than it sends) or "bad
    length" (a Content-Length that is no number)."""

    steps: list[object] = field(default_factory=list)
    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)


def handler(script: Script) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            script.seen.append((self.path, dict(self.headers.items())))
            step = script.steps.pop(0) if script.steps else (200, {}, OBJECT)
            if step == "reset":
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            if step == "bad length":  # a Content-Length that is no number
                self.send_response(200)
                self.send_header("Content-Length", "4O")
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(OBJECT[:40])
                self.close_connection = True
                return
            if step == "short":
                self.send_response(206)
                self.send_header("Content-Length", "100")
                self.send_header("Content-Range", f"bytes 0-99/{len(OBJECT)}")
                self.end_headers()
                self.wfile.write(OBJECT[:40])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            assert isinstance(step, tuple)
            status, headers, body = step
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_CONNECT(self) -> None:  # as an HTTPS proxy: note where to, and refuse
            script.seen.append(("CONNECT " + self.path, dict(self.headers.items())))
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()
            self.close_connection = True

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@contextlib.contextmanager
def serving(script: Script) -> Iterator[str]:
    """The server on loopback, answering from ``script``; -> its endpoint URL."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler(script))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
