"""Shared fixtures: a real Mosquitto, and a real gateway service on free ports with files in tmp_path."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config import GatewayConfig, load_config
from gateway.service import GatewayService

BROKER_HOST = "127.0.0.1"
BROKER_PORT = int(os.environ.get("EGIZ_TEST_BROKER_PORT", "1883"))
ADMIN_KEY = "test-admin-key-000000000001"
OPERATOR_KEY = "test-operator-key-00000000002"
VIEWER_KEY = "test-viewer-key-0000000000003"


def need_service(host: str, port: int, what: str, install: str) -> None:
    """Skip when a local service is missing, but fail under CI, which always has it."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return
    except OSError:
        message = f"needs {what} on {host}:{port}: {install}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def mosquitto() -> tuple[str, int]:
    """The machine's Mosquitto (each test uses its own site, so topics never collide)."""
    need_service(BROKER_HOST, BROKER_PORT, "Mosquitto", "apt-get install mosquitto")
    return BROKER_HOST, BROKER_PORT


def unique_site() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def auth(key: str = ADMIN_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class RunningGateway:
    service: GatewayService
    config: GatewayConfig
    http: aiohttp.ClientSession

    @property
    def site(self) -> str:
        return self.config.gateway.site

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.service.http_port}"

    def thing_id(self, equipment_id: str) -> str:
        return f"{self.site}:{equipment_id}"

    async def get(self, path: str, key: str = ADMIN_KEY, **kw: Any) -> tuple[int, Any]:
        async with self.http.get(self.url + path, headers=auth(key), **kw) as r:
            return r.status, await _body(r)

    async def send(self, method: str, path: str, body: Any = None, key: str = ADMIN_KEY,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
        async with self.http.request(method, self.url + path, json=body,
                                     headers={**auth(key), **(headers or {})}) as r:
            return r.status, await _body(r)


async def _body(r: aiohttp.ClientResponse) -> Any:
    if r.content_type == "application/json":
        return await r.json()
    return await r.text()


def gateway_config(tmp_path: Path, broker: tuple[str, int], **overrides: Any) -> GatewayConfig:
    site = overrides.pop("gateway.site", unique_site())
    base: dict[str, Any] = {
        "gateway.site": site,
        "gateway.line": "line-a",
        "gateway.id": f"gw-{site}",
        "gateway.data_dir": str(tmp_path / f"data-{site}"),
        "mqtt.host": broker[0],
        "mqtt.port": broker[1],
        "mqtt.reconnect_min_s": 0.1,
        "mqtt.reconnect_max_s": 1.0,
        "http.host": "127.0.0.1",
        "http.port": 0,
        "auth.api_keys": [
            {"key": ADMIN_KEY, "role": "admin"},
            {"key": OPERATOR_KEY, "role": "operator"},
            {"key": VIEWER_KEY, "role": "viewer"},
        ],
        "ingest.auto_register": True,
        "twin.flush_interval_s": 0.2,
        # Detection writes each Thing's `status` feature (a version step); tests of other parts keep
        # exact versions by leaving it off, detection tests switch it on.
        "detect.enabled": False,
    }
    base.update(overrides)
    return load_config(GatewayConfig, None, environ={}, overrides=base)


GatewayFactory = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    """Start gateways (real service, real files); all are stopped at the end of the test."""
    running: list[RunningGateway] = []

    async def start(broker: tuple[str, int], *, config: GatewayConfig | None = None,
                    wait_connected: bool = True, **overrides: Any) -> RunningGateway:
        cfg = config or gateway_config(tmp_path, broker, **overrides)
        service = GatewayService(cfg)
        await service.start()
        gw = RunningGateway(service, cfg, aiohttp.ClientSession())
        running.append(gw)
        if wait_connected:
            await asyncio.wait_for(service.ingest.connected.wait(), 10)
        return gw

    yield start
    for gw in reversed(running):
        await gw.http.close()
        await gw.service.stop()


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> None:
    """Poll until `predicate()` holds, or fail with the time it took."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)
