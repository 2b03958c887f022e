"""Where a host is and how to talk to it: its endpoint, its API's paths, its token file.
Light on purpose: every command that talks to a host imports this, none needs the server."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

from blocktrail.errors import InvalidArgument

TOKEN_FILE = "api-token"  # in the host's data directory: the API's bearer token (TCP)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a server listens: ``unix:PATH``, ``tcp:HOST:PORT`` or ``http://HOST:PORT``."""

    unix_path: str | None = None
    host: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        if text.startswith("unix:"):
            path = text.removeprefix("unix:")
            if not path or "\0" in path:
                raise InvalidArgument(f"invalid endpoint {text!r}: unix: needs a socket path")
            return cls(unix_path=path)
        rest = text.removeprefix("http://").removeprefix("tcp:").removeprefix("nbd://")
        rest = rest.rstrip("/")
        host, sep, port = rest.rpartition(":")
        bracketed = host.startswith("[") and host.endswith("]")
        host = host[1:-1] if bracketed else host
        if not (sep and port.isascii() and port.isdigit() and 0 < int(port) < 65536 and host
                and host.isascii() and host.isprintable() and not set(host) & set("/?#@[] ")
                and (bracketed or host.count(":") == 0 or host.count(":") > 1)):
            raise InvalidArgument(f"invalid endpoint {text!r}: use unix:PATH or HOST:PORT "
                                  "(a port from 1 to 65535)")
        return cls(host=host, port=int(port))

    def __str__(self) -> str:
        return f"unix:{self.unix_path}" if self.unix_path else f"http://{self.host}:{self.port}"



def api_path(*segments: str) -> str:
    """``/disks/a%20b/snapshots/x%3Fy``: every segment percent-encoded whole."""
    try:
        return "".join("/" + quote(segment, safe="") for segment in segments)
    except UnicodeEncodeError as exc:  # a lone surrogate: no name has one
        raise InvalidArgument(f"{exc.object!r} cannot be sent to the host: it is not "
                                     "valid Unicode") from None
