"""Gateways under test: in process (`RunningGateway`, started by conftest's `start_gateway`) and as
`egiz gateway run` processes on a broker of the test's own (`GatewayProcess`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp

from cloud_sync.aggregator import Aggregator
from gateway.broker import find_free_port
from gateway.config import GatewayConfig
from gateway.service import GatewayService
from tests.helpers.configs import ADMIN_KEY, Sections, auth, gateway_sections, merged, unique_site, write_toml
from tests.helpers.processes import egiz_process


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


GatewayFactory = Callable[..., Awaitable[RunningGateway]]
AggregatorFactory = Callable[..., Awaitable[Aggregator]]


class LinkedSite(NamedTuple):
    """A new site's gateway forwarding to an aggregator that holds its token (conftest's `start_linked`)."""

    site: str
    aggregator: Aggregator
    gateway: RunningGateway


LinkedFactory = Callable[..., Awaitable[LinkedSite]]


@dataclass(frozen=True)
class GatewayProcess:
    """A gateway's configuration and log for `egiz gateway run`; `run()` starts it and waits until ready."""

    site: str
    http_port: int
    config: Path
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def run(self, **spawn: Any) -> AbstractAsyncContextManager[asyncio.subprocess.Process]:
        return egiz_process("gateway", "run", "--config", str(self.config), url=self.url, log=self.log, **spawn)


def gateway_process(tmp: Path, broker_port: int, **sections: dict[str, Any]) -> GatewayProcess:
    """A gateway of a new site on `broker_port` and a free HTTP port, its files in `tmp`: it reconnects
    within half a second, writes the registry behind every second and logs warnings as JSON."""
    site = unique_site()
    http_port = find_free_port()
    base: Sections = {
        "mqtt": {"port": broker_port, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5},
        "http": {"port": http_port},
        "ingest": {"auto_register": True},
        "twin": {"flush_interval_s": 1.0},
        "log": {"format": "json", "level": "warning"},
    }
    path = tmp / "gateway.toml"
    config = write_toml(path, merged(gateway_sections(path, site), base, sections))
    return GatewayProcess(site, http_port, config, tmp / "gateway.log")
