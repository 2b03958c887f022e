"""The real host (`blocktrail host --tls...`) with real TLS clients: qemu-io writes and qemu-img,
nbdcopy and nbdinfo read over STARTTLS (x509 and PSK, TLS 1.3 and 1.2), and a client without TLS
gets nothing when TLS is required."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from hostproc import cli_json, require_tools, running_host
from tlscreds import Credentials, make_credentials

pytestmark = pytest.mark.interop
TLS12_PSK = "NORMAL:-VERS-TLS1.3:+ECDHE-PSK:+DHE-PSK:+PSK"
Start = Callable[..., tuple[str, Path]]


def _tools() -> None:
    require_tools("qemu-io", "qemu-img", "qemu-nbd", "nbdinfo", "nbdcopy")


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    return make_credentials(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    _tools()
    with ExitStack() as stack:
        yield lambda *tls_args: stack.enter_context(running_host(tmp_path, *tls_args))


cli = cli_json


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120)


def qemu_tls(creds: Credentials, kind: str, nbd: Path, export: str,
             priority: str = "") -> list[str]:
    extra = f",priority={priority}" if priority else ""
    if kind == "psk":
        obj = (f"tls-creds-psk,id=tls0,endpoint=client,dir={creds.psk_dir},"
               f"username={creds.psk_username}{extra}")
    else:
        obj = f"tls-creds-x509,id=tls0,endpoint=client,dir={creds.client_dir}{extra}"
    return ["--object", obj, "--image-opts",
            f"driver=nbd,path={nbd},export={export},tls-creds=tls0,tls-hostname=localhost"]


def libnbd_uri(creds: Credentials, kind: str, nbd: Path, export: str) -> str:
    if kind == "psk":
        return (f"nbds+unix://{creds.psk_username}@/{export}?socket={nbd}"
                f"&tls-psk-file={creds.psk_file}")
    return f"nbds+unix:///{export}?socket={nbd}&tls-certificates={creds.client_dir}"


@pytest.mark.parametrize("kind,priority", [("x509", ""), ("psk", ""), ("psk", TLS12_PSK)],
                         ids=["x509", "psk", "psk-tls12"])
def test_write_and_copy_over_tls(creds: Credentials, start: Start, tmp_path: Path, kind: str,
                                 priority: str) -> None:
    tls_args = ["--tls-creds", str(creds.server_dir)] if kind == "x509" else \
        ["--tls-psk", str(creds.psk_dir)]
    api, nbd = start(*tls_args)
    assert cli("disk", "create", "disk0", "--size", "8M", "--host", api)["name"] == "disk0"
    write = run("qemu-io", *qemu_tls(creds, kind, nbd, "disk0", priority),
                "-c", "write -P 0x5a 1M 256k", "-c", "write -z 3M 64k")
    assert write.returncode == 0 and "wrote" in write.stdout, write.stderr
    cli("snapshot", "create", "disk0", "s1", "--host", api)
    by_qemu, by_nbdcopy = tmp_path / "a.raw", tmp_path / "b.raw"
    convert = run("qemu-img", "convert", "-O", "raw", *qemu_tls(creds, kind, nbd, "disk0@s1",
                                                                 priority), str(by_qemu))
    assert convert.returncode == 0, convert.stderr
    copy = run("nbdcopy", libnbd_uri(creds, kind, nbd, "disk0@s1"), str(by_nbdcopy))
    assert copy.returncode == 0, copy.stderr
    expected = bytearray(8 << 20)
    expected[1 << 20 : (1 << 20) + (256 << 10)] = b"\x5a" * (256 << 10)
    assert by_qemu.read_bytes() == by_nbdcopy.read_bytes() == expected
    info = run("nbdinfo", "--json", libnbd_uri(creds, kind, nbd, "disk0"))
    assert info.returncode == 0 and json.loads(info.stdout)["TLS"] is True, info.stderr


def test_required_tls_refuses_plaintext_clients(creds: Credentials, start: Start) -> None:
    api, nbd = start("--tls-creds", str(creds.server_dir))
    cli("disk", "create", "disk0", "--size", "1M", "--host", api)
    plain = f"nbd+unix:///disk0?socket={nbd}"
    assert run("nbdinfo", plain).returncode != 0
    qemu = run("qemu-img", "info", plain)
    assert qemu.returncode != 0 and "TLS" in qemu.stderr
    assert run("qemu-io", "-f", "raw", "-c", "write 0 4k", plain).returncode != 0


def test_allowed_tls_serves_both(creds: Credentials, start: Start) -> None:
    api, nbd = start("--tls", "allow", "--tls-creds", str(creds.server_dir))
    cli("disk", "create", "disk0", "--size", "1M", "--host", api)
    assert run("nbdinfo", f"nbd+unix:///disk0?socket={nbd}").returncode == 0
    assert run("nbdinfo", libnbd_uri(creds, "x509", nbd, "disk0")).returncode == 0


def test_client_certificates_when_required(creds: Credentials, start: Start) -> None:
    api, nbd = start("--tls-creds", str(creds.server_dir), "--tls-verify-client")
    cli("disk", "create", "disk0", "--size", "1M", "--host", api)
    assert run("nbdinfo", libnbd_uri(creds, "x509", nbd, "disk0")).returncode == 0
    no_cert = (f"nbds+unix:///disk0?socket={nbd}"
               f"&tls-certificates={creds.client_dir_no_cert}")
    assert run("nbdinfo", no_cert).returncode != 0


def test_bad_credentials_stop_the_host_at_start(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "blocktrail.cli.main", "host", "--data",
                             str(tmp_path / "data"), "--api", f"unix:{tmp_path / 'api.sock'}",
                             "--nbd", f"unix:{tmp_path / 'nbd.sock'}", "--tls-creds",
                             str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "server-cert.pem" in result.stderr


def _tls_options(creds: Credentials, kind: str) -> list[str]:
    if kind == "psk":
        return ["--tls-psk-file", str(creds.psk_file), "--tls-username", creds.psk_username]
    return ["--tls-certificates", str(creds.client_dir)]


@pytest.mark.parametrize("kind", ["x509", "psk"])
def test_backups_of_a_host_that_requires_tls(creds: Credentials, start: Start, tmp_path: Path,
                                             kind: str) -> None:
    server_args = ["--tls-creds", str(creds.server_dir)] if kind == "x509" else \
        ["--tls-psk", str(creds.psk_dir)]
    api, nbd = start(*server_args)
    repo = str(tmp_path / "repo")
    cli("disk", "create", "disk0", "--size", "8M", "--host", api)
    cli("repo", "init", repo)
    run("qemu-io", *qemu_tls(creds, kind, nbd, "disk0"), "-c", "write -P 0x11 0 1M")
    refused = subprocess.run([sys.executable, "-m", "blocktrail.cli.main", "backup", "disk0",
                              "--host", api, "--repo", repo], capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode != 0 and "requires TLS" in refused.stderr
    full = cli("backup", "disk0", "--host", api, "--repo", repo, *_tls_options(creds, kind))
    assert full["kind"] == "full"
    write = run("qemu-io", *qemu_tls(creds, kind, nbd, "disk0"), "-c", "write -P 0x22 4M 64k")
    assert write.returncode == 0, write.stderr
    incremental = cli("backup", "disk0", "--host", api, "--repo", repo,
                      *_tls_options(creds, kind))
    assert incremental["kind"] == "incremental", incremental
    restored = tmp_path / "restored.raw"
    point = incremental["point"]["id"]  # type: ignore[index]
    cli("restore", repo, str(point), "--to", str(restored))
    expected = bytearray(8 << 20)
    expected[: 1 << 20] = b"\x11" * (1 << 20)
    expected[4 << 20 : (4 << 20) + (64 << 10)] = b"\x22" * (64 << 10)
    assert restored.read_bytes() == expected


def test_our_client_backs_up_qemu_nbd_over_tls(creds: Credentials, tmp_path: Path) -> None:
    _tools()
    image, sock, repo = tmp_path / "disk.raw", tmp_path / "q.sock", str(tmp_path / "repo")
    image.write_bytes(bytes(range(256)) * 8192)
    proc = subprocess.Popen(["qemu-nbd", "-r", "-f", "raw", "-x", "disk0", "-k", str(sock),
                             "--object", f"tls-creds-psk,id=tls0,endpoint=server,"
                                         f"dir={creds.psk_dir}", "--tls-creds", "tls0",
                             str(image)])
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        cli("repo", "init", repo)
        uri = (f"nbds+unix://{creds.psk_username}@/disk0?socket={sock}"
               f"&tls-psk-file={creds.psk_file}")
        point = cli("backup", uri, "--repo", repo)["point"]["id"]  # type: ignore[index]
    finally:
        proc.terminate()
        proc.wait(30)
    restored = tmp_path / "restored.raw"
    cli("restore", repo, str(point), "--to", str(restored))
    assert restored.read_bytes() == image.read_bytes()
