"""Mosquitto password hashes and password files, written here so passwords stay off command lines."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from pathlib import Path


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = 101) -> str:
    """A Mosquitto 2.0 password hash (`$7$`: PBKDF2-SHA512), as `mosquitto_passwd` writes it."""
    salt = os.urandom(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    """Whether `password` matches a Mosquitto `$7$` (2.0) or `$6$` (1.x) hash."""
    parts = hashed.split("$")
    try:
        if len(parts) == 5 and parts[1] == "7":
            iterations, salt, digest = int(parts[2]), base64.b64decode(parts[3]), base64.b64decode(parts[4])
            if not 1 <= iterations <= 10_000_000:
                return False
            mine = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
        elif len(parts) == 4 and parts[1] == "6":
            salt, digest = base64.b64decode(parts[2]), base64.b64decode(parts[3])
            mine = hashlib.sha512(password.encode() + salt).digest()
        else:
            return False
    except ValueError:  # corrupt base64 or iteration count
        return False
    return hmac.compare_digest(mine, digest)


def write_password_file(path: Path, users: dict[str, str]) -> None:
    """Write a Mosquitto password file (mode 0600) for `users` {name: password}, replacing it whole.

    Hashing here instead of running `mosquitto_passwd` keeps passwords off command lines.
    """
    lines = []
    for name, password in sorted(users.items()):
        if not name or any(c in name for c in ":\r\n\0"):
            raise ValueError(f"invalid MQTT user name {name!r}: must be non-empty, without ':' or line breaks")
        lines.append(f"{name}:{hash_password(password)}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.writelines(lines)
    os.replace(tmp, path)


def read_password_file(path: Path) -> dict[str, str]:
    """{user: hash} from a Mosquitto password file (blank lines and comments skipped)."""
    users = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and ":" in line:
            name, hashed = line.split(":", 1)
            users[name] = hashed
    return users


