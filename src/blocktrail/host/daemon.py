"""`blocktrail host`: owns the disks under a data directory and serves the control API.

The API listens on a unix socket (mode 0600, no token needed: the file mode is the access
control) or on TCP (a bearer token is required; it is generated into DATA/api-token unless given).
The data directory is locked (datadir.py) before any socket is bound: a second host on the same
directory stops at once, naming the first, and takes nobody's socket path.
"""

from __future__ import annotations

import asyncio
import functools
import os
import secrets
import signal
import socket
import stat
from dataclasses import dataclass, field

import uvicorn

from blocktrail.errors import CorruptMetadata, InvalidArgument, io_error
from blocktrail.fileio import OsFileIO
from blocktrail.host.api import create_app
from blocktrail.host.endpoint import TOKEN_FILE, Endpoint
from blocktrail.host.exports import DiskCatalog
from blocktrail.host.fill import FillScheduler
from blocktrail.host.registry import DiskRegistry
from blocktrail.nbd.limits import ServerLimits
from blocktrail.nbd.proto import TlsMode
from blocktrail.nbd.server import NbdServer, ServerTls
from blocktrail.nbd.tls import TlsConfig, server_context
from blocktrail.passwords import NO_SOURCES, PasswordSources

__all__ = ["TOKEN_FILE", "Endpoint", "HostConfig", "serve"]


@dataclass(frozen=True, slots=True)
class HostConfig:
    data_dir: str
    api: Endpoint
    token: str | None = None
    nbd: Endpoint | None = None
    nbd_tls_mode: TlsMode = TlsMode.OFF
    nbd_tls: TlsConfig | None = None  # required unless the mode is OFF
    nbd_limits: ServerLimits = field(default_factory=ServerLimits)
    repositories: tuple[str, ...] = ()  # shown by the console, which can back up into them
    backup_bandwidth: int | None = None  # bytes a second, for the console's backups
    repo_password: PasswordSources = NO_SOURCES  # of the encrypted ones among them


def load_or_create_token(data_dir: str) -> str:
    """The API's token from DATA/api-token, generated there first if there is none. The file
    is written whole (temp file, fsync, rename), so a crash or a full file system never leaves
    an empty one; an empty or malformed file is refused, never taken as the token "" (which
    would let every request in)."""
    path = os.path.join(data_dir, TOKEN_FILE)
    try:
        if os.path.exists(path):
            with open(path, "rb") as f:
                return _checked_token(f.read(), path)
        token = secrets.token_urlsafe(32)
        OsFileIO().replace_atomic(path, (token + "\n").encode())
    except OSError as exc:
        raise io_error(f"cannot read or create the API token {path}", exc) from exc
    return token


def _checked_token(data: bytes, path: str) -> str:
    token = data.strip()
    if not token or any(b < 0x21 or b > 0x7E for b in token):
        what = "is empty" if not token else "holds other than one line of visible ASCII"
        raise CorruptMetadata(f"the API token file {path} {what}; delete it and start the "
                              "host again to generate a new token (clients then need it)")
    return token.decode("ascii")


def bind(endpoint: Endpoint) -> socket.socket:
    """A bound socket; a unix socket is made 0600 before it listens, so no one else can ever
    connect to it."""
    try:
        return _bind(endpoint)
    except OSError as exc:
        raise InvalidArgument(f"cannot listen on {endpoint}: {exc.strerror or exc}") from None


def _bind(endpoint: Endpoint) -> socket.socket:
    if endpoint.unix_path is not None:
        _remove_stale_socket(endpoint.unix_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(endpoint.unix_path)
        os.chmod(endpoint.unix_path, stat.S_IRUSR | stat.S_IWUSR)
    else:
        family = socket.AF_INET6 if ":" in (endpoint.host or "") else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((endpoint.host or "127.0.0.1", endpoint.port or 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _remove_stale_socket(path: str) -> None:
    """A socket file nobody listens on any more is replaced; anything else is not touched."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise InvalidArgument(f"cannot listen on unix:{path}: it exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # left by a process that is gone
    else:
        raise InvalidArgument(f"cannot listen on unix:{path}: another process listens there")
    finally:
        probe.close()


def _nbd_address(sock: socket.socket | None) -> str | None:
    if sock is None:
        return None
    if sock.family == socket.AF_UNIX:
        return f"unix:{sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"


async def serve(config: HostConfig, started: asyncio.Event | None = None, *,
                handle_signals: bool = False) -> None:
    """Serve until cancelled (or SIGTERM/SIGINT with ``handle_signals``); every disk is closed
    cleanly on the way out."""
    tls = None
    if config.nbd_tls_mode is not TlsMode.OFF:
        if config.nbd_tls is None:
            raise InvalidArgument("NBD TLS needs credentials (an x509 directory or a PSK file)")
        tls = ServerTls(config.nbd_tls_mode, server_context(config.nbd_tls))  # checked now
    from blocktrail.backup.chunksource import open_chunk_source

    registry = DiskRegistry(config.data_dir, api=str(config.api),  # HostBusy: before any bind
                            chunk_sources=functools.partial(open_chunk_source,
                                                            password=config.repo_password))
    fills = FillScheduler(registry)
    try:
        fills.resume()  # the fills a stop (or a crash) interrupted
        await _serve(config, registry, tls, started, fills, handle_signals=handle_signals)
    finally:
        fills.close()
        registry.close()


async def _serve(config: HostConfig, registry: DiskRegistry, tls: ServerTls | None,
                 started: asyncio.Event | None, fills: FillScheduler, *,
                 handle_signals: bool) -> None:
    token = None
    if config.api.unix_path is None:
        token = config.token or load_or_create_token(registry.data_dir)
    nbd_sock = bind(config.nbd) if config.nbd is not None else None
    try:
        sock = bind(config.api)
    except BaseException:
        if nbd_sock is not None:
            nbd_sock.close()
        raise
    app = create_app(registry, token, nbd=_nbd_address(nbd_sock),
                     nbd_tls=config.nbd_tls_mode.name.lower(), repositories=config.repositories,
                     backup_bandwidth=config.backup_bandwidth, fills=fills,
                     repo_password=config.repo_password)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    if handle_signals:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, setattr, server, "should_exit", True)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    nbd_server = None
    if nbd_sock is not None:
        nbd_server = NbdServer(DiskCatalog(registry.get, registry.names), config.nbd_limits, tls)
        nbd_server.listen(nbd_sock)
    try:
        while not server.started:
            if task.done():
                await task
            await asyncio.sleep(0.01)
        if started is not None:
            started.set()
        await task
    finally:
        if nbd_server is not None:
            await nbd_server.close()
        server.should_exit = True
        if not task.done():
            await asyncio.wait([task], timeout=5)
        app.state.catalog.close()
