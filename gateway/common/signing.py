"""Model signatures: the aggregator signs what it publishes, a gateway checks before it activates.

What is signed is the published entry itself — equipment type, version and the SHA-256 of every
file — in one canonical JSON form, with Ed25519. A gateway holds only the public key
(`uplink.model_signing_key`, base64 of the 32 raw bytes), so a file swapped anywhere between the
aggregator's registry and the gateway's (a proxy, a misconfigured or absent TLS) no longer matches
a hash the signature covers.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.common.errors import EgizError


class SignatureError(EgizError):
    """A signature that is missing, malformed or does not match; `detail` says which."""

    code = "bad_signature"


def signed_bytes(ttype: str, version: str, files: Mapping[str, str]) -> bytes:
    """The canonical bytes of one published model version (what the signature covers)."""
    doc = {"type": ttype, "version": version, "files": dict(sorted(files.items()))}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The signing key at `path` (PKCS#8 PEM); made there, 0600, when absent."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        data = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption())
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # made by another process meanwhile: read that one
            pass
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 key")
    return key


def public_key_text(key: Ed25519PrivateKey) -> str:
    """The public half as base64 of its 32 raw bytes: the value of a gateway's `uplink.model_signing_key`."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def parse_public_key(text: str) -> Ed25519PublicKey:
    """A public key from its base64 text, or ValueError saying what is wrong."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except binascii.Error:
        raise ValueError("is not base64") from None
    if len(raw) != 32:
        raise ValueError(f"must be 32 bytes of an Ed25519 public key, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def sign(key: Ed25519PrivateKey, ttype: str, version: str, files: Mapping[str, str]) -> str:
    """The base64 signature of one published model version."""
    return base64.b64encode(key.sign(signed_bytes(ttype, version, files))).decode()


def verify(public: Ed25519PublicKey, ttype: str, version: str, files: Mapping[str, str], signature: object) -> None:
    """Return when `signature` is the aggregator's over this entry; raise SignatureError otherwise."""
    if not isinstance(signature, str) or not signature:
        raise SignatureError("the model is not signed")
    try:
        raw = base64.b64decode(signature, validate=True)
    except binascii.Error:
        raise SignatureError("the signature is not base64") from None
    try:
        public.verify(raw, signed_bytes(ttype, version, files))
    except InvalidSignature:
        raise SignatureError("the signature does not match the aggregator's key") from None
