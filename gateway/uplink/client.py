"""What both uplink clients share: an authenticated HTTP session to the aggregator and one loop task."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import aiohttp

from gateway.common.tasks import cancel_and_wait
from gateway.config import UplinkSection


class UplinkClient:
    """Owns the session (Bearer token, `uplink.timeout_s`) and the task; `stop()` ends both."""

    def __init__(self, uplink: UplinkSection) -> None:
        self._up = uplink
        self._task: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None

    def _launch(self, loop: Coroutine[Any, Any, None], name: str) -> None:
        self._http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {self._up.token}"},
                                           timeout=aiohttp.ClientTimeout(total=self._up.timeout_s))
        self._task = asyncio.create_task(loop, name=name)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self._http is not None:
            await self._http.close()
            self._http = None
