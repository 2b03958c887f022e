"""Where the host listens: a unix socket path left by a process that is gone is taken over;
a path that is not a socket, or a socket someone listens on, is never removed."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from blocktrail.errors import InvalidArgument
from blocktrail.host.daemon import Endpoint, bind


def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    gone = socket.socket(socket.AF_UNIX)
    gone.bind(str(path))
    gone.close()  # the file stays, nobody listens
    bind(Endpoint(unix_path=str(path))).close()


def test_a_file_that_is_not_a_socket_is_never_removed(tmp_path: Path) -> None:
    path = tmp_path / "precious"
    path.write_text("data")
    with pytest.raises(InvalidArgument, match="is not a socket"):
        bind(Endpoint(unix_path=str(path)))
    assert path.read_text() == "data"


def test_a_socket_in_use_is_not_taken(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    listening = bind(Endpoint(unix_path=str(path)))
    try:
        with pytest.raises(InvalidArgument, match="another process listens there"):
            bind(Endpoint(unix_path=str(path)))
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(str(path))  # still the first one's
        probe.close()
    finally:
        listening.close()


def test_an_address_that_cannot_be_bound_is_an_invalid_argument(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="cannot listen on"):
        bind(Endpoint(unix_path=str(tmp_path / "no" / "such" / "dir" / "api.sock")))
    taken = bind(Endpoint(host="127.0.0.1", port=0))
    try:
        port = taken.getsockname()[1]
        with pytest.raises(InvalidArgument, match=r"cannot listen on .*Address already in use"):
            bind(Endpoint(host="127.0.0.1", port=port))
    finally:
        taken.close()
