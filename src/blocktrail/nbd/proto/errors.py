"""Protocol errors: ours (LocalProtocolError) and the peer's (RemoteProtocolError)."""

from __future__ import annotations

from blocktrail.errors import BlocktrailError


class NbdError(BlocktrailError):
    exit_code = 14


class LocalProtocolError(NbdError):
    """This side tried to do something the protocol does not allow (a bug here)."""


class RemoteProtocolError(NbdError):
    """The peer sent something the protocol does not allow; the connection is over."""


class TlsError(NbdError):
    """TLS could not be set up or went wrong: credentials, handshake, or a server or client that
    will not use it."""


class TlsNotOffered(TlsError):
    """The client requires TLS and the server refused STARTTLS (never a plaintext fallback)."""


class TlsRequiredByServer(TlsError):
    """The server requires TLS and the client was not configured to use it."""
