"""Protocol errors: ours (LocalProtocolError) and the peer's (RemoteProtocolError)."""

from __future__ import annotations

from blocktrail.errors import BlocktrailError


class NbdError(BlocktrailError):
    exit_code = 14


class LocalProtocolError(NbdError):
    """This side tried to do something the protocol does not allow (a bug here)."""


class RemoteProtocolError(NbdError):
    """The peer sent something the protocol does not allow; the connection is over."""
