"""Shared fixtures: a real Mosquitto, and real gateways and aggregators on free ports with files in
tmp_path. Their helpers live in tests/helpers."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cloud_sync.aggregator import Aggregator
from cloud_sync.config import AggregatorConfig
from gateway.config import GatewayConfig
from gateway.service import GatewayService
from tests.helpers import (
    BROKER_HOST,
    BROKER_PORT,
    AggregatorFactory,
    GatewayFactory,
    LinkedFactory,
    LinkedSite,
    RunningGateway,
    SitePki,
    aggregator_config,
    all_stopped,
    gateway_config,
    make_site_pki,
    need_service,
    train_press_versions,
    unique_site,
    uplink,
    uplink_token,
)

PG_HOST, PG_PORT = "127.0.0.1", 5432


@pytest.fixture
def mosquitto() -> tuple[str, int]:
    """The machine's Mosquitto (each test uses its own site, so topics never collide)."""
    need_service(BROKER_HOST, BROKER_PORT, "Mosquitto", "apt-get install mosquitto")
    return BROKER_HOST, BROKER_PORT


@pytest.fixture
def pg_dsn() -> Iterator[str]:
    """A fresh PostgreSQL database of the test's own on the machine's server (trust auth), dropped after."""
    need_service(PG_HOST, PG_PORT, "PostgreSQL", "apt-get install postgresql")
    import psycopg

    name = f"egiz_t_{uuid.uuid4().hex[:12]}"
    admin = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{name}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


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


@pytest.fixture
async def start_aggregator() -> AsyncIterator[AggregatorFactory]:
    """Start aggregators (real service, real files); all are stopped at the end of the test."""
    async with all_stopped() as start:

        async def aggregator(cfg: AggregatorConfig) -> Aggregator:
            return await start(Aggregator(cfg))

        yield aggregator


@pytest.fixture
def start_linked(tmp_path: Path, mosquitto: tuple[str, int], start_gateway: GatewayFactory,
                 start_aggregator: AggregatorFactory) -> LinkedFactory:
    """Start an aggregator that holds a new site's line-a token, and that site's gateway forwarding to it.
    `aggregator` takes the aggregator's dotted overrides; the other keywords are the gateway's."""

    async def start(*, aggregator: dict[str, Any] | None = None, **gateway: Any) -> LinkedSite:
        site = unique_site()
        agg = await start_aggregator(aggregator_config(tmp_path, uplink_token(site), **(aggregator or {})))
        gw = await start_gateway(mosquitto, **uplink(site, agg.http_port), **gateway)
        return LinkedSite(site, agg, gw)

    return start


@pytest.fixture(scope="session")
def site_pki(tmp_path_factory: pytest.TempPathFactory) -> SitePki:
    """A site CA with server and client certificates, and a foreign CA (made once per run)."""
    return make_site_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def press_versions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """Two model versions of the `press` type, trained once per run: (registry root, first, second).
    Copy `root / "press"` into a registry of the test's own before changing anything."""
    root = tmp_path_factory.mktemp("press-models")
    first, second = train_press_versions(root, (1, 2))
    return root, first, second
