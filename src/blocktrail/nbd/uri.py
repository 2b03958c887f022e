"""NBD URIs, as libnbd and QEMU write them (NetworkBlockDevice/nbd doc/uri.md).

    nbd://HOST[:PORT]/EXPORT                 TCP (port 10809 by default)
    nbd+unix:///EXPORT?socket=PATH           a unix socket
    nbds://HOST[:PORT]/EXPORT                TCP with TLS
    nbds+unix:///EXPORT?socket=PATH          a unix socket with TLS

The export name is the path after the first "/", percent-decoded ("" is the default export).
Percent escapes must decode to UTF-8 without NUL bytes, and ``+`` is a plus sign (as libnbd
reads it), never a space; each query parameter may be given once, and a port is 1 to 65535:
anything else is refused rather than read as some other name, path or port. The TLS query
parameters ``tls-certificates=DIR``, ``tls-psk-file=FILE`` and
``tls-username=NAME`` are kept, as given, in `TlsParameters` (the credentials themselves are
`blocktrail.nbd.tls.TlsConfig`'s business); they are refused on a plain nbd:// URI.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote_to_bytes, urlsplit

from blocktrail.errors import InvalidArgument

DEFAULT_PORT = 10809
_SCHEMES = {"nbd": (False, False), "nbd+unix": (False, True), "nbds": (True, False),
            "nbds+unix": (True, True)}  # scheme -> (TLS, unix socket)
_TLS_PARAMETERS = {"tls-certificates": "certificates", "tls-psk-file": "psk_file",
                   "tls-username": "username"}


@dataclass(frozen=True, slots=True)
class TlsParameters:
    """The TLS query parameters of an nbds:// URI (none given: x509 with libnbd's default
    certificate directories)."""

    certificates: str | None = None  # directory with ca-cert.pem, client-cert.pem, ...
    psk_file: str | None = None  # pre-shared keys (username:hexkey lines)
    username: str | None = None  # the PSK identity


@dataclass(frozen=True, slots=True)
class NbdEndpoint:
    """Where an NBD server listens: a unix socket, or a TCP host and port."""

    unix_path: str | None = None
    host: str | None = None
    port: int = DEFAULT_PORT

    def __post_init__(self) -> None:
        if (self.unix_path is None) == (self.host is None):
            raise InvalidArgument("an NBD endpoint is a unix socket path or a TCP host, "
                                  "exactly one of them")
        if not 0 < self.port < 65536:
            raise InvalidArgument(f"invalid TCP port {self.port}")

    @classmethod
    def parse(cls, text: str) -> NbdEndpoint:
        """``unix:PATH``, ``tcp:HOST:PORT`` or ``HOST:PORT`` (IPv6 hosts in brackets)."""
        if text.startswith("unix:"):
            path = text.removeprefix("unix:")
            if not path:
                raise InvalidArgument(f"invalid NBD endpoint {text!r}: unix: needs a path")
            return cls(unix_path=path)
        rest = text.removeprefix("tcp:")
        match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", rest)
        if match is None:
            raise InvalidArgument(f"invalid NBD endpoint {text!r}: use unix:PATH or "
                                  "tcp:HOST:PORT")
        host = match.group(1) or match.group(3)
        return cls(host=host, port=int(match.group(2) or match.group(4)))

    def __str__(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class NbdUri:
    endpoint: NbdEndpoint
    export: str = ""
    tls: TlsParameters | None = None  # None: plain NBD

    @classmethod
    def parse(cls, text: str) -> NbdUri:
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as exc:
            raise InvalidArgument(f"invalid NBD URI {text!r}: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in _SCHEMES:
            raise InvalidArgument(f"invalid NBD URI {text!r}: the scheme must be one of "
                                  f"{', '.join(s + '://' for s in _SCHEMES)}")
        tls, unix = _SCHEMES[scheme]
        if parts.fragment:
            raise InvalidArgument(f"invalid NBD URI {text!r}: no #fragment allowed")
        params = _query(text, parts.query)
        unknown = sorted(set(params) - {"socket", *_TLS_PARAMETERS})
        if unknown:
            raise InvalidArgument(f"invalid NBD URI {text!r}: unknown parameter(s) "
                                  f"{', '.join(unknown)} (known: socket, "
                                  f"{', '.join(_TLS_PARAMETERS)})")
        tls_given = {_TLS_PARAMETERS[k]: v for k, v in params.items() if k in _TLS_PARAMETERS}
        user = _decode(text, parts.username, "the user name") if parts.username else None
        if user is not None:  # libnbd: the PSK username may be the URI's user part
            if not tls:
                raise InvalidArgument(f"invalid NBD URI {text!r}: no user@ part allowed "
                                      "(it names a TLS PSK user, for nbds:// URIs)")
            tls_given.setdefault("username", user)
        if tls_given and not tls:
            raise InvalidArgument(f"invalid NBD URI {text!r}: TLS parameters need an nbds:// "
                                  "or nbds+unix:// URI")
        if unix:
            if parts.netloc.rpartition("@")[2]:
                raise InvalidArgument(f"invalid NBD URI {text!r}: {scheme}:// takes no host "
                                      f"(write {scheme}:///EXPORT?socket=PATH)")
            if not params.get("socket"):
                raise InvalidArgument(f"invalid NBD URI {text!r}: {scheme}:// needs "
                                      "?socket=PATH")
            endpoint = NbdEndpoint(unix_path=params["socket"])
        else:
            if "socket" in params:
                raise InvalidArgument(f"invalid NBD URI {text!r}: socket= is for "
                                      "nbd+unix:// URIs")
            if not parts.hostname:
                raise InvalidArgument(f"invalid NBD URI {text!r}: {scheme}:// needs a host")
            if port == 0:
                raise InvalidArgument(f"invalid NBD URI {text!r}: port 0 (leave the port out "
                                      f"for the default, {DEFAULT_PORT})")
            endpoint = NbdEndpoint(host=parts.hostname,
                                   port=DEFAULT_PORT if port is None else port)
        export = _decode(text, parts.path.removeprefix("/"), "the export name")
        return cls(endpoint, export, TlsParameters(**tls_given) if tls else None)

    def __str__(self) -> str:
        """The URI in its normal form (default port and parameters spelled out)."""
        scheme = "nbds" if self.tls else "nbd"
        path = "/" + quote(self.export, safe="/@:")
        query = []
        if self.endpoint.unix_path is not None:
            scheme += "+unix"
            query.append(("socket", self.endpoint.unix_path))
            authority = ""
        else:
            host = self.endpoint.host or ""
            authority = f"[{host}]:{self.endpoint.port}" if ":" in host else \
                f"{host}:{self.endpoint.port}"
        if self.tls is not None:
            for key, attr in _TLS_PARAMETERS.items():
                value = getattr(self.tls, attr)
                if value is not None:
                    query.append((key, value))
        rest = "&".join(f"{k}={quote(v, safe='/:@')}" for k, v in query)
        return f"{scheme}://{authority}{path}" + (f"?{rest}" if rest else "")


def _query(text: str, query: str) -> dict[str, str]:
    """The query's parameters (``&``-separated ``key=value``, percent-decoded; ``+`` kept;
    empty items between ``&`` skipped)."""
    params: dict[str, str] = {}
    for item in query.split("&") if query else ():
        if not item:
            continue
        raw_key, _, raw_value = item.partition("=")
        key = _decode(text, raw_key, "a query parameter's name")
        if key in params:
            raise InvalidArgument(f"invalid NBD URI {text!r}: {key}= is given more than once")
        params[key] = _decode(text, raw_value, f"{key}=")
    return params


def _decode(text: str, part: str, what: str) -> str:
    """``part`` percent-decoded as UTF-8; a malformed escape or a NUL byte is refused."""
    try:
        decoded = unquote_to_bytes(part).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument(f"invalid NBD URI {text!r}: {what} is not UTF-8 once its "
                              "%-escapes are decoded") from None
    if "\0" in decoded:
        raise InvalidArgument(f"invalid NBD URI {text!r}: {what} holds a NUL byte (%00)")
    return decoded


def is_nbd_uri(text: str) -> bool:
    """Does ``text`` look like an NBD URI (rather than a path or a disk name)?"""
    return re.match(r"(?i)nbds?(\+unix)?://", text) is not None
