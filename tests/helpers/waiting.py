"""Polling until something holds: `wait_for` inside the event loop, `wait_until` outside it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> None:
    """Poll until `predicate()` holds, or fail with the time it took."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


def wait_until(what: str, fn: Callable[[], Any], timeout: float = 20.0, interval: float = 0.2) -> Any:
    """Call `fn` until it returns something true (exceptions count as not yet) and return that; after
    `timeout` fail, naming `what` and the last value."""
    deadline = time.monotonic() + timeout
    value = None
    while True:
        with contextlib.suppress(Exception):
            value = fn()
            if value:
                return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s (last: {str(value)[:500]})") from None
        time.sleep(interval)
