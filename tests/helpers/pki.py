"""A site CA of a test's own (made with `gateway.common.pki`, as `egiz pki` makes it): the CA, server
certificates for this machine's loopback names, a client certificate, and a second, foreign CA; and
self-signed OPC UA application instance certificates (the application URI in the SubjectAltName, as
OPC UA asks), made with `cryptography`."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.common.pki import init_ca, issue


@dataclass(frozen=True)
class SitePki:
    """Paths of the test PKI; `server`, `server2` and `client` are (certificate, key) pairs."""

    ca: Path
    server: tuple[Path, Path]  # CN=server, SANs localhost and 127.0.0.1
    server2: tuple[Path, Path]  # the same names, another key: what a renewed (or swapped) certificate is
    client: tuple[Path, Path]  # CN=gw-client, for client-certificate verification
    foreign_ca: Path  # a CA that signed none of the above
    foreign_server: tuple[Path, Path]  # signed by the foreign CA, for the same names


def make_site_pki(root: Path) -> SitePki:
    site, foreign = root / "site", root / "foreign"
    init_ca(site, "Test site CA")
    init_ca(foreign, "Someone else's CA")
    names = {"dns": ("localhost",), "ips": ("127.0.0.1",)}
    return SitePki(
        ca=site / "ca.crt",
        server=issue(site, "server", **names),  # type: ignore[arg-type]
        server2=issue(site, "server2", **names),  # type: ignore[arg-type]
        client=issue(site, "gw-client", kind="client"),
        foreign_ca=foreign / "ca.crt",
        foreign_server=issue(foreign, "server", **names),  # type: ignore[arg-type]
    )


def application_certificate(directory: Path, name: str, uri: str, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """(certificate.der, key.pem) of a 2048-bit RSA self-signed certificate for OPC UA application `uri`."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri), x509.DNSName(host)]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=True,
                                     data_encipherment=True, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}-cert.der", directory / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path
