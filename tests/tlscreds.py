"""TLS credentials for tests, generated with `cryptography`, in QEMU's directory layout.

    creds = make_credentials(tmp_path)
    creds.server_dir   ca-cert.pem, server-cert.pem, server-key.pem   (tls-creds-x509,
                       endpoint=server)
    creds.client_dir   ca-cert.pem, client-cert.pem, client-key.pem   (endpoint=client;
                       libnbd's tls-certificates=DIR)
    creds.psk_dir      keys.psk ("username:hexkey", psktool's format)  (tls-creds-psk; libnbd's
                       tls-psk-file=DIR/keys.psk)

The same directories serve QEMU, libnbd and blocktrail. `other_*` are signed by another CA, or
hold another key, for the tests that must fail.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PSK_USERNAME = "alice"
PSK_KEY = bytes(range(32))
OTHER_PSK_KEY = bytes(range(1, 33))


@dataclass(frozen=True, slots=True)
class Credentials:
    server_dir: Path
    client_dir: Path
    client_dir_no_cert: Path  # only ca-cert.pem: a client without a certificate of its own
    other_ca_client_dir: Path  # client credentials from a CA the server does not know
    psk_dir: Path
    other_psk_dir: Path  # the same username with another key
    psk_username: str = PSK_USERNAME

    @property
    def psk_file(self) -> Path:
        return self.psk_dir / "keys.psk"

    @property
    def other_psk_file(self) -> Path:
        return self.other_psk_dir / "keys.psk"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "blocktrail tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _builder(subject: str, issuer: x509.Name, public: ec.EllipticCurvePublicKey
             ) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
            .public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=30)))


def _ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    cert = (_builder(common_name, _name(common_name), key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def _leaf(common_name: str, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], *,
          server: bool) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (_builder(common_name, ca[0].subject, key.public_key())
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               # QEMU checks digitalSignature and keyEncipherment when keyUsage is critical
               .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False,
                                            False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(ca[1], hashes.SHA256()), key


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(directory: Path, files: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
        (directory / name).chmod(0o600)
    return directory


def make_credentials(root: Path) -> Credentials:
    ca = _ca("blocktrail test CA")
    other_ca = _ca("another CA")
    server = _leaf("localhost", ca, server=True)
    client = _leaf("backup-client", ca, server=False)
    stranger = _leaf("stranger", other_ca, server=False)
    ca_pem = _pem(ca[0])
    return Credentials(
        server_dir=_write(root / "server", {"ca-cert.pem": ca_pem,
                                            "server-cert.pem": _pem(server[0]),
                                            "server-key.pem": _key_pem(server[1])}),
        client_dir=_write(root / "client", {"ca-cert.pem": ca_pem,
                                            "client-cert.pem": _pem(client[0]),
                                            "client-key.pem": _key_pem(client[1])}),
        client_dir_no_cert=_write(root / "client-no-cert", {"ca-cert.pem": ca_pem}),
        other_ca_client_dir=_write(root / "other-ca-client", {
            "ca-cert.pem": _pem(other_ca[0]), "client-cert.pem": _pem(stranger[0]),
            "client-key.pem": _key_pem(stranger[1])}),
        psk_dir=_write(root / "psk", {"keys.psk": f"{PSK_USERNAME}:{PSK_KEY.hex()}\n".encode()}),
        other_psk_dir=_write(root / "other-psk", {
            "keys.psk": f"{PSK_USERNAME}:{OTHER_PSK_KEY.hex()}\n".encode()}),
    )
