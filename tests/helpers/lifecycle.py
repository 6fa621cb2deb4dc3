"""Things a test starts and that must all be stopped at its end, whatever happened."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Protocol, TypeVar


class Startable(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


S = TypeVar("S", bound=Startable)


@asynccontextmanager
async def all_stopped() -> AsyncIterator[Callable[[S], Awaitable[S]]]:
    """Yields `start`: `await start(x)` starts x and returns it; every x started so is stopped at the
    end, in the order they were started."""
    started: list[Startable] = []

    async def start(x: S) -> S:
        await x.start()
        started.append(x)
        return x

    try:
        yield start
    finally:
        for x in started:
            await x.stop()
