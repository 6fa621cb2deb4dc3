"""Bearer API keys with roles viewer < operator < admin, for HTTP and WebSocket alike."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable

from aiohttp import web

from gateway.common.settings import ROLES, ApiKey

log = logging.getLogger(__name__)
RANK = {role: i for i, role in enumerate(ROLES)}


def role_allows(have: str, need: str) -> bool:
    return RANK[have] >= RANK[need]


class Authenticator:
    """Maps a presented token to its role; keys are kept only as SHA-256 digests in memory."""

    def __init__(self, keys: Iterable[ApiKey], *, open_access: bool = False) -> None:
        keys = list(keys)
        self._roles = {hashlib.sha256(k.key.encode()).digest(): k.role for k in keys}
        self._names = {hashlib.sha256(k.key.encode()).digest(): k.name or f"{k.role} key" for k in keys}
        self.open = open_access

    def caller(self, request: web.Request) -> str:
        """Who is asking, for audit fields (acknowledged by ...): the key's name, never the key."""
        header = request.headers.get("Authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        name = self._names.get(hashlib.sha256(token.encode()).digest()) if token else None
        return name or ("open access" if self.open else "unknown")

    def role_for(self, request: web.Request, *, allow_query_token: bool = False) -> str | None:
        """The caller's role, or None when no valid key was presented (and access is not open)."""
        token = None
        header = request.headers.get("Authorization", "")
        if header[:7].lower() == "bearer ":
            token = header[7:].strip()
        elif allow_query_token:  # browsers cannot set headers on a WebSocket handshake
            token = request.query.get("access_token")
        if token:
            role = self._roles.get(hashlib.sha256(token.encode()).digest())
            if role is not None:
                return role
            if not self.open:
                return None
        return "admin" if self.open else None
