"""TLS for both services: the server context of the HTTP API, the uplink's client context with
certificate pinning, and the start-up checks of the files they read.

Pinning: `pin_sha256` values are SHA-256 fingerprints (hex, colons allowed) of either the server's
DER certificate or its public key (SubjectPublicKeyInfo). They are checked during the handshake,
before a request (and its Bearer token) is sent, on top of the usual verification against the CA
and the host name: a pin narrows trust, it never replaces it.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # cryptography is imported only where a certificate is read: a plain service never loads it
    from cryptography import x509

_HEX = frozenset("0123456789abcdef")


def normalise_pin(pin: str) -> str | None:
    """A pin as 64 lowercase hex digits (colons and spaces dropped), or None when it is not one."""
    text = pin.replace(":", "").replace(" ", "").lower()
    return text if len(text) == 64 and set(text) <= _HEX else None


def fingerprints(der: bytes) -> tuple[str, str]:
    """The certificate's SHA-256 and its public key's (SPKI) SHA-256, both as hex."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_der_x509_certificate(der)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest(), hashlib.sha256(spki).hexdigest()


def server_context(cert_file: str, key_file: str, client_ca_file: str = "") -> ssl.SSLContext:
    """The HTTP server's context: TLS 1.2+, and client certificates required when a CA is given."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    if client_ca_file:
        ctx.load_verify_locations(cafile=client_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(ca_file: str = "", pins: Iterable[str] = (), cert_file: str = "",
                   key_file: str = "") -> ssl.SSLContext:
    """A verifying client context (the site CA, or the system's when `ca_file` is empty), pinned to
    `pins` when given, presenting a client certificate when `cert_file` is given."""
    ctx = ssl.create_default_context(cafile=ca_file or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file or None)
    wanted = frozenset(p for p in (normalise_pin(p) for p in pins) if p)
    if wanted:
        ctx.sslobject_class = _pinned(wanted)
    return ctx


def _pinned(wanted: frozenset[str]) -> type[ssl.SSLObject]:
    class PinnedSSLObject(ssl.SSLObject):
        """Fails the handshake when the verified peer certificate matches none of the pins."""

        def do_handshake(self) -> None:
            super().do_handshake()  # raises until the handshake is complete, then the peer is known
            der = self.getpeercert(binary_form=True)
            if der is None or wanted.isdisjoint(fingerprints(der)):
                raise ssl.SSLCertVerificationError(
                    1, "certificate pin mismatch: the server's certificate matches no uplink.pin_sha256")

    return PinnedSSLObject


def check_server_files(prefix: str, cert_file: str, key_file: str, client_ca_file: str) -> list[tuple[str, str]]:
    """Problems with an HTTP server's TLS files, each under its dotted key (`prefix` is e.g. "http")."""
    problems: list[tuple[str, str]] = []
    if bool(cert_file) != bool(key_file):
        missing = "tls_key_file" if cert_file else "tls_cert_file"
        return [(f"{prefix}.{missing}", f"{prefix}.tls_cert_file and {prefix}.tls_key_file must be given together")]
    if client_ca_file and not cert_file:
        return [(f"{prefix}.tls_client_ca_file", f"needs {prefix}.tls_cert_file and {prefix}.tls_key_file")]
    if not cert_file:
        return problems
    cert = _read_cert(f"{prefix}.tls_cert_file", cert_file, problems)
    key = _read_file(f"{prefix}.tls_key_file", key_file, problems)
    if client_ca_file:
        _read_cert(f"{prefix}.tls_client_ca_file", client_ca_file, problems)
    if cert is not None and key is not None:
        problems += key_matches(f"{prefix}.tls_key_file", key_file, key, cert)
    return problems


def check_client_files(prefix: str, ca_file: str, cert_file: str, key_file: str) -> list[tuple[str, str]]:
    """Problems with a TLS client's CA and optional client certificate, each under its dotted key."""
    problems: list[tuple[str, str]] = []
    if ca_file:
        _read_cert(f"{prefix}.ca_file", ca_file, problems)
    if bool(cert_file) != bool(key_file):
        missing = "key_file" if cert_file else "cert_file"
        problems.append((f"{prefix}.{missing}", f"{prefix}.cert_file and {prefix}.key_file must be given together"))
        return problems
    if cert_file:
        cert = _read_cert(f"{prefix}.cert_file", cert_file, problems)
        key = _read_file(f"{prefix}.key_file", key_file, problems)
        if cert is not None and key is not None:
            problems += key_matches(f"{prefix}.key_file", key_file, key, cert)
    return problems


def key_matches(key_name: str, key_file: str, key_pem: bytes, cert: x509.Certificate) -> list[tuple[str, str]]:
    """[] when the PEM private key belongs to `cert`; otherwise the problem, under the key's name."""
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        return [(key_name, f"{key_file} is encrypted; give an unencrypted key (readable only by the service)")]
    except ValueError:
        return [(key_name, f"{key_file} is not a PEM private key")]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.DER, spki)
            != cert.public_key().public_bytes(serialization.Encoding.DER, spki)):
        return [(key_name, f"{key_file} does not match the certificate it is paired with")]
    return []


def _read_file(key: str, path: str, problems: list[tuple[str, str]]) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        problems.append((key, f"{path} does not exist"))
    except IsADirectoryError:
        problems.append((key, f"{path} is not a file"))
    except OSError as exc:
        problems.append((key, f"{path} cannot be read: {exc.strerror}"))
    return None


def _read_cert(key: str, path: str, problems: list[tuple[str, str]]) -> x509.Certificate | None:
    from cryptography import x509

    data = _read_file(key, path, problems)
    if data is None:
        return None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        problems.append((key, f"{path} is not a PEM certificate"))
        return None
