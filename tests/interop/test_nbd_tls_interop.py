"""STARTTLS against GnuTLS-based tools nobody here wrote: nbdinfo, nbdcopy and qemu-img as
clients of our sans-IO server with our TLS sessions (OpenSSL), and our client against qemu-nbd;
x509 and PSK, TLS 1.3 and (for PSK) TLS 1.2."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from blocktrail.nbd.proto import TlsMode, TlsNotOffered
from blocktrail.nbd.tls import (
    ServerTlsContext,
    TlsConfig,
    TlsHandshakeError,
    client_context,
    server_context,
)
from hostproc import require_tools
from nbdtls import EXPORT, NbdTlsServer, client_read, pattern
from tlscreds import Credentials, make_credentials

pytestmark = pytest.mark.interop
DATA = pattern(1 << 20)
# GnuTLS priority for QEMU's PSK objects without TLS 1.3 (QEMU adds the PSK suites itself only
# when no priority is given)
TLS12_PSK_PRIORITY = "NORMAL:-VERS-TLS1.3:+ECDHE-PSK:+DHE-PSK:+PSK"
VARIANTS = pytest.mark.parametrize("kind,priority", [("x509", ""), ("psk", ""),
                                                     ("psk", TLS12_PSK_PRIORITY)],
                                   ids=["x509", "psk", "psk-tls12"])
Serve = Callable[..., NbdTlsServer]


_tools = require_tools


def run(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(list(args), capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    return make_credentials(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    servers: list[NbdTlsServer] = []

    def start(mode: TlsMode, tls: ServerTlsContext | None, *, tcp: bool = False
              ) -> NbdTlsServer:
        server = NbdTlsServer(DATA, mode, tls, unix_path=None if tcp else tmp_path / "nbd.sock")
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def server_tls(creds: Credentials, kind: str, *, verify_client: bool = False
               ) -> ServerTlsContext:
    if kind == "psk":
        return server_context(TlsConfig.psk(creds.psk_dir))
    return server_context(TlsConfig.x509(creds.server_dir, verify_client=verify_client))


def nbd_uri(server: NbdTlsServer, creds: Credentials, kind: str) -> str:
    assert server.unix_path is not None
    if kind == "psk":  # libnbd 1.14 takes the PSK username from the URI's user part
        return (f"nbds+unix://{creds.psk_username}@/{EXPORT}?socket={server.unix_path}"
                f"&tls-psk-file={creds.psk_file}")
    return f"nbds+unix:///{EXPORT}?socket={server.unix_path}&tls-certificates={creds.client_dir}"


def qemu_object(creds: Credentials, kind: str, endpoint: str, priority: str = "") -> str:
    extra = f",priority={priority}" if priority else ""
    if kind == "psk":
        username = f",username={creds.psk_username}" if endpoint == "client" else ""
        return f"tls-creds-psk,id=tls0,endpoint={endpoint},dir={creds.psk_dir}{username}{extra}"
    directory = creds.client_dir if endpoint == "client" else creds.server_dir
    return f"tls-creds-x509,id=tls0,endpoint={endpoint},dir={directory}{extra}"


def qemu_image_opts(server: NbdTlsServer) -> str:
    # QEMU checks the server certificate's name even on a Unix socket, so it needs tls-hostname
    return (f"driver=nbd,path={server.unix_path},export={EXPORT},tls-creds=tls0,"
            f"tls-hostname=localhost")


@pytest.mark.parametrize("kind", ["x509", "psk"])
def test_nbdinfo_and_nbdcopy_read_over_tls(creds: Credentials, serve: Serve, kind: str) -> None:
    _tools("nbdinfo", "nbdcopy")
    server = serve(TlsMode.REQUIRE, server_tls(creds, kind))
    info = run("nbdinfo", "--json", nbd_uri(server, creds, kind))
    assert info.returncode == 0, info.stderr
    doc = json.loads(info.stdout)
    assert doc["TLS"] is True and doc["exports"][0]["export-size"] == len(DATA)
    copy = run("nbdcopy", nbd_uri(server, creds, kind), "-")
    assert copy.returncode == 0, copy.stderr
    assert copy.stdout == DATA
    server.wait_idle()
    assert all(o.error is None and o.tls_version == "TLSv1.3" for o in server.outcomes)
    if kind == "psk":
        assert {o.peer_identity for o in server.outcomes} == {creds.psk_username}


@VARIANTS
def test_qemu_img_info_and_convert_over_tls(creds: Credentials, serve: Serve, tmp_path: Path,
                                            kind: str, priority: str) -> None:
    _tools("qemu-img")
    server = serve(TlsMode.REQUIRE, server_tls(creds, kind))
    obj = qemu_object(creds, kind, "client", priority)
    info = run("qemu-img", "info", "--output=json", "--object", obj, "--image-opts",
               qemu_image_opts(server))
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["virtual-size"] == len(DATA)
    copy = tmp_path / "copy.raw"
    convert = run("qemu-img", "convert", "-O", "raw", "--object", obj, "--image-opts",
                  qemu_image_opts(server), str(copy))
    assert convert.returncode == 0, convert.stderr
    assert copy.read_bytes() == DATA
    server.wait_idle()
    assert all(o.error is None for o in server.outcomes), server.outcomes
    assert {o.tls_version for o in server.outcomes} == {"TLSv1.2" if priority else "TLSv1.3"}


def test_require_mode_refuses_clients_without_tls(creds: Credentials, serve: Serve) -> None:
    _tools("nbdinfo", "qemu-img")
    server = serve(TlsMode.REQUIRE, server_tls(creds, "x509"))
    plain = f"nbd+unix:///{EXPORT}?socket={server.unix_path}"
    assert run("nbdinfo", plain).returncode != 0
    qemu = run("qemu-img", "info", plain)
    assert qemu.returncode != 0 and b"TLS" in qemu.stderr
    server.wait_idle()
    assert server.outcomes and not any(o.chosen or o.reads for o in server.outcomes)


def test_allow_mode_serves_both(creds: Credentials, serve: Serve) -> None:
    _tools("nbdinfo")
    server = serve(TlsMode.ALLOW, server_tls(creds, "x509"))
    assert run("nbdinfo", f"nbd+unix:///{EXPORT}?socket={server.unix_path}").returncode == 0
    assert run("nbdinfo", nbd_uri(server, creds, "x509")).returncode == 0
    server.wait_idle()
    assert [o.tls_version for o in server.outcomes] == [None, "TLSv1.3"]


def test_server_verifies_client_certificates(creds: Credentials, serve: Serve) -> None:
    _tools("nbdinfo")
    server = serve(TlsMode.REQUIRE,
                   server_tls(creds, "x509", verify_client=True))
    assert run("nbdinfo", nbd_uri(server, creds, "x509")).returncode == 0
    no_cert = (f"nbds+unix:///{EXPORT}?socket={server.unix_path}"
               f"&tls-certificates={creds.client_dir_no_cert}")
    assert run("nbdinfo", no_cert).returncode != 0
    server.wait_idle()
    good, bad = server.outcomes
    assert good.peer_identity == "CN=backup-client,O=blocktrail tests" and good.chosen
    assert isinstance(bad.error, TlsHandshakeError) and not bad.chosen
    assert "sent no certificate" in str(bad.error)


def test_wrong_psk_key_is_refused(creds: Credentials, serve: Serve) -> None:
    _tools("nbdinfo")
    server = serve(TlsMode.REQUIRE, server_tls(creds, "psk"))
    uri = nbd_uri(server, creds, "psk").replace(str(creds.psk_file), str(creds.other_psk_file))
    assert run("nbdinfo", uri).returncode != 0
    server.wait_idle()
    [outcome] = server.outcomes
    assert isinstance(outcome.error, TlsHandshakeError) and "differs" in str(outcome.error)


def test_nbdinfo_over_tcp_checks_the_host_name(creds: Credentials, serve: Serve) -> None:
    _tools("nbdinfo")
    server = serve(TlsMode.REQUIRE, server_tls(creds, "x509"), tcp=True)
    good = run("nbdinfo", f"nbds://localhost:{server.port}/{EXPORT}"
                          f"?tls-certificates={creds.client_dir}")
    assert good.returncode == 0, good.stderr


# ------------------------------------------------------------------ our client, qemu-nbd


@contextmanager
def qemu_nbd(tmp_path: Path, *tls_args: str) -> Iterator[Path]:
    _tools("qemu-nbd")
    image, sock = tmp_path / "disk.raw", tmp_path / "qemu-nbd.sock"
    image.write_bytes(DATA)
    proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "-r", "-x", EXPORT, "-k", str(sock),
                             *tls_args, str(image)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.02)
        yield sock
    finally:
        proc.terminate()
        proc.wait(10)


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(path))
    return sock


@VARIANTS
def test_our_client_reads_from_qemu_nbd_over_tls(creds: Credentials, tmp_path: Path, kind: str,
                                                 priority: str) -> None:
    config = (TlsConfig.psk(creds.psk_file, creds.psk_username) if kind == "psk"
              else TlsConfig.x509(creds.client_dir))
    obj = qemu_object(creds, kind, "server", priority)
    with qemu_nbd(tmp_path, "--object", obj, "--tls-creds", "tls0") as path:
        data, session = client_read(connect(path), EXPORT, TlsMode.REQUIRE,
                                    client_context(config), 4096, 65536)
    assert data == DATA[4096 : 4096 + 65536]
    assert session is not None
    assert session.version == ("TLSv1.2" if priority else "TLSv1.3")
    if kind == "x509":
        assert session.peer_identity == "CN=localhost,O=blocktrail tests"


def test_our_client_that_requires_tls_refuses_a_plaintext_qemu_nbd(creds: Credentials,
                                                                    tmp_path: Path) -> None:
    with qemu_nbd(tmp_path) as path, pytest.raises(TlsNotOffered):
        client_read(connect(path), EXPORT, TlsMode.REQUIRE,
                    client_context(TlsConfig.x509(creds.client_dir)), 0, 512)


def test_our_client_refuses_qemu_nbd_with_another_ca(creds: Credentials, tmp_path: Path) -> None:
    obj = qemu_object(creds, "x509", "server") + ",verify-peer=off"
    with qemu_nbd(tmp_path, "--object", obj, "--tls-creds", "tls0") as path, \
            pytest.raises(TlsHandshakeError, match="server's certificate was not accepted"):
        client_read(connect(path), EXPORT, TlsMode.REQUIRE,
                    client_context(TlsConfig.x509(creds.other_ca_client_dir)), 0, 512)
