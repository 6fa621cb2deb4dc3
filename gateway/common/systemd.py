"""systemd's notify protocol, without a dependency: READY=1 once a service (gateway or aggregator)
serves, STOPPING=1 on the way out, and WATCHDOG=1 pings from the event loop, so a hung loop gets the
service restarted."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator
from typing import Protocol

log = logging.getLogger(__name__)


def notify(message: str) -> bool:
    """Send one notification to systemd; False when not started by systemd (no NOTIFY_SOCKET)."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(message.encode(), address)
        except OSError:
            return False
    return True


def watchdog_interval_s() -> float | None:
    """Half the watchdog period systemd asked for (WatchdogSec=), or None when there is none."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


async def watchdog_loop(interval_s: float) -> None:
    """Ping systemd while the event loop runs; if it hangs, the pings stop and systemd restarts us."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval_s)


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[None]:
    """READY=1 on entry, watchdog pings (when systemd asked for them) inside, STOPPING=1 on the way out."""
    notify("READY=1")
    interval = watchdog_interval_s()
    pinger = asyncio.create_task(watchdog_loop(interval)) if interval else None
    try:
        yield
    finally:
        notify("STOPPING=1")
        if pinger is not None:
            pinger.cancel()


class Service(Protocol):
    """A long-lived part with `start()` and `stop()` (stop also undoes a start that failed half-way)."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...


async def run_until_signalled(service: Service, name: str) -> None:
    """Start `service`, tell systemd it serves (and keep its watchdog fed) until SIGTERM or SIGINT,
    then stop it gracefully. A start that fails is undone before the error is reported."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await service.start()
    except BaseException:
        await service.stop()
        raise
    try:
        async with serving():
            await stop.wait()
            log.info("shutting down", extra={"service": name})
    finally:
        await service.stop()
