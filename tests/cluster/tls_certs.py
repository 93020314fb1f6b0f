"""Certificates made in the test with `cryptography`: a CA, a server certificate for localhost /
127.0.0.1, a client certificate, and a second, unrelated CA (what a client that does not trust the
server's CA holds)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NAMED_HOST = "gateway.internal"


@dataclass(frozen=True)
class CertFiles:
    ca: str  # the CA that signed the server and the client certificates
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str  # a CA that signed none of them
    other_client_cert: str  # a client certificate signed by other_ca
    other_client_key: str
    named_cert: str  # a server certificate for the name gateway.internal only (no address, no localhost)
    named_key: str


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    cn: str,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    usage: x509.ObjectIdentifier,
    sans: list[x509.GeneralName] | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = ca
    key = _key()
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _write(
    directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None
) -> None:
    (directory / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path = directory / f"{name}.key"
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)


def make_certs(directory: Path) -> CertFiles:
    """Write the CA, server, client and unrelated-CA files under `directory`; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca("mlaserve test CA")
    other = _ca("some other CA")
    server = _leaf(
        "localhost",
        ca,
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client = _leaf("mlaserve test client", ca, ExtendedKeyUsageOID.CLIENT_AUTH)
    stranger = _leaf("a stranger", other, ExtendedKeyUsageOID.CLIENT_AUTH)
    named = _leaf("gateway.internal", ca, ExtendedKeyUsageOID.SERVER_AUTH, [x509.DNSName(NAMED_HOST)])
    _write(directory, "ca", ca[0], None)
    _write(directory, "other-ca", other[0], None)
    _write(directory, "server", *server)
    _write(directory, "client", *client)
    _write(directory, "stranger", *stranger)
    _write(directory, "named", *named)
    d = str(directory)
    return CertFiles(
        ca=f"{d}/ca.crt",
        server_cert=f"{d}/server.crt",
        server_key=f"{d}/server.key",
        client_cert=f"{d}/client.crt",
        client_key=f"{d}/client.key",
        other_ca=f"{d}/other-ca.crt",
        other_client_cert=f"{d}/stranger.crt",
        other_client_key=f"{d}/stranger.key",
        named_cert=f"{d}/named.crt",
        named_key=f"{d}/named.key",
    )
