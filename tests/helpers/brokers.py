"""Brokers of a test's own: a private Mosquitto on a free port with a generated config, and reading
what arrives."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import aiomqtt

from gateway.broker import BrokerProcess, BrokerSettings, find_free_port
from tests.helpers.services import need_mosquitto


def private_mosquitto(tmp_path: Path, **settings: Any) -> BrokerProcess:
    """A Mosquitto (not yet started) on a free port with its files in tmp_path/broker, anonymous unless
    `settings` say otherwise; `async with` starts and stops it. Skips (fails under CI) without the binary."""
    need_mosquitto()
    settings.setdefault("allow_anonymous", True)
    return BrokerProcess(BrokerSettings(port=find_free_port(), data_dir=tmp_path / "broker", **settings))


async def receive(client: aiomqtt.Client, n: int, timeout: float = 5.0) -> list[aiomqtt.Message]:
    """Up to n messages; fewer when they do not come in time (the caller's assertion shows what came)."""
    got: list[aiomqtt.Message] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            async for message in client.messages:
                got.append(message)
                if len(got) == n:
                    break
    return got
