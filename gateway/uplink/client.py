"""What both uplink clients share: an authenticated HTTP session to the aggregator and one loop task."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Coroutine
from typing import Any

import aiohttp

from gateway.common.tasks import cancel_and_wait
from gateway.common.tls import client_context
from gateway.config import UplinkSection


def uplink_ssl(up: UplinkSection) -> ssl.SSLContext | bool:
    """The TLS context of an https:// uplink: the site CA (or the system's), pins, a client certificate."""
    if not up.url.startswith("https://"):
        return True  # plain http: nothing to verify (refused at start unless loopback or allowed)
    return client_context(up.ca_file, up.pin_sha256, up.cert_file, up.key_file)


class UplinkClient:
    """Owns the session (Bearer token, `uplink.timeout_s`, TLS) and the task; `stop()` ends both."""

    def __init__(self, uplink: UplinkSection) -> None:
        self._up = uplink
        self._task: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None

    def _launch(self, loop: Coroutine[Any, Any, None], name: str) -> None:
        self._http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {self._up.token}"},
                                           timeout=aiohttp.ClientTimeout(total=self._up.timeout_s),
                                           connector=aiohttp.TCPConnector(ssl=uplink_ssl(self._up)))
        self._task = asyncio.create_task(loop, name=name)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self._http is not None:
            await self._http.close()
            self._http = None
