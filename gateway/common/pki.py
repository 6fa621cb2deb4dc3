"""A site's own certificate authority: the CA, server and client certificates, and what they hold.

`egiz pki init|issue|list` is this module plus formatting. Keys are ECDSA P-256 (what Mosquitto,
browsers and the ESP32's mbedTLS all accept), written 0600; certificates are PEM, 0644. Nothing
shells out to openssl.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.common.errors import EgizError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
Kind = Literal["server", "client"]
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


class PkiError(EgizError):
    """A CA or certificate that cannot be made or read; `detail` says why."""

    code = "pki"


@dataclass(frozen=True)
class CertInfo:
    """What `egiz pki list` shows of one certificate."""

    path: Path
    subject: str
    issuer: str
    kind: str  # "ca", "server", "client", "server+client"
    dns: tuple[str, ...]
    ips: tuple[str, ...]
    not_after: dt.datetime
    sha256: str  # of the DER certificate: what `uplink.pin_sha256` takes

    @property
    def days_left(self) -> int:
        return (self.not_after - dt.datetime.now(dt.UTC)).days


def init_ca(directory: Path, name: str, *, days: int = 3650) -> Path:
    """Make `ca.key` (0600) and `ca.crt` in `directory`; refuses to replace an existing CA."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if cert_path.exists() or key_path.exists():
        raise PkiError(f"{directory} already holds a CA ({CA_CERT}/{CA_KEY}); it is never replaced")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "OpenEgiz site CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def issue(directory: Path, name: str, *, kind: Kind | Literal["both"] = "server", dns: tuple[str, ...] = (),
          ips: tuple[str, ...] = (), days: int = 825) -> tuple[Path, Path]:
    """Issue `<name>.crt` and `<name>.key` (0600) signed by the CA in `directory`.

    A server certificate names its hosts in SANs (DNS names and IP addresses; `name` itself is added
    as a DNS name when no SAN is given); a client certificate carries `name` as its common name.
    """
    if not _NAME.fullmatch(name) or name == "ca":
        raise PkiError(f"{name!r} is not a certificate name: letters, digits, '.', '_', '-' (not 'ca')")
    ca_cert, ca_key = load_ca(directory)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    if cert_path.exists() or key_path.exists():
        raise PkiError(f"{cert_path} already exists; remove it (and its key) to issue it again")
    try:
        addresses = [ipaddress.ip_address(ip) for ip in ips]
    except ValueError as exc:
        raise PkiError(str(exc)) from None
    names = list(dns) or ([name] if kind != "client" and not ips else [])
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in names]
    sans += [x509.IPAddress(a) for a in addresses]
    usages = {"server": [ExtendedKeyUsageOID.SERVER_AUTH], "client": [ExtendedKeyUsageOID.CLIENT_AUTH],
              "both": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]}[kind]
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=True,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA certificate and key of `directory`, or PkiError saying what is missing."""
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if not cert_path.is_file() or not key_path.is_file():
        raise PkiError(f"{directory} holds no CA; run `egiz pki init` first")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{key_path} is not an EC key")
    return cert, key


def list_certificates(directory: Path) -> list[CertInfo]:
    """Every `*.crt` of `directory`, the CA first, then by name."""
    paths = sorted(directory.glob("*.crt"), key=lambda p: (p.name != CA_CERT, p.name))
    return [describe(p) for p in paths]


def describe(path: Path) -> CertInfo:
    """Subject, issuer, kind, SANs, expiry and fingerprint of one PEM certificate."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as exc:
        raise PkiError(f"{path} is not a PEM certificate: {exc}") from None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(a) for a in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns, ips = (), ()
    return CertInfo(path, cert.subject.rfc4514_string(), cert.issuer.rfc4514_string(), _kind(cert), dns, ips,
                    cert.not_valid_after_utc, cert.fingerprint(hashes.SHA256()).hex())


def _kind(cert: x509.Certificate) -> str:
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return "ca"
    except x509.ExtensionNotFound:
        pass
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return "any"
    kinds = [k for k, oid in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH))
             if oid in eku]
    return "+".join(kinds) or "other"


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """The key in PKCS#8 PEM, created 0600 (never readable by others, not even for a moment)."""
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
