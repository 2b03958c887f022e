"""NBD errors: protocol violations, ours (LocalProtocolError) and the peer's
(RemoteProtocolError), a server's refusals and error replies, and lost connections."""

from __future__ import annotations

from blocktrail.errors import BlocktrailError, ExitCode


class NbdError(BlocktrailError):
    exit_code = ExitCode.NBD


class LocalProtocolError(NbdError):
    """This side tried to do something the protocol does not allow (a bug here)."""


class RemoteProtocolError(NbdError):
    """The peer sent something the protocol does not allow; the connection is over."""


class ConnectionsDisagree(RemoteProtocolError):
    """Connections opened to one export (multi-conn) were told different things about it: size,
    transmission flags, meta contexts or block sizes. They cannot share its requests."""


class TlsError(NbdError):
    """TLS could not be set up or went wrong: credentials, handshake, or a server or client that
    will not use it."""


class TlsNotOffered(TlsError):
    """The client requires TLS and the server refused STARTTLS (never a plaintext fallback)."""


class TlsRequiredByServer(TlsError):
    """The server requires TLS and the client was not configured to use it."""


class NegotiationRefused(NbdError):
    """The server refused an option the connection cannot go without (the export, mostly)."""


class RequestFailed(NbdError):
    """One request failed with an NBD errno; the connection carries on. Both roles use it: an
    export raises it to have the server answer the request with an error reply (``errno``, and
    ``message`` as the reply's text); the client raises it when a server answered so
    (``server_message`` is the server's text, ``command`` the request's name)."""

    def __init__(self, message: str, *, errno: int, server_message: str = "",
                 command: str = "") -> None:
        super().__init__(message)
        self.errno = errno
        self.server_message = server_message
        self.command = command


class CommandNotSupported(NbdError):
    """The export does not offer what was asked (write on a read-only export, trim, FUA...)."""


class ConnectionLost(NbdError):
    """The connection ended (closed by the server, reset, or closed here) with work undone."""


class ServerUnreachable(NbdError):
    """No NBD server answers at the address given."""

    exit_code = ExitCode.UNREACHABLE
