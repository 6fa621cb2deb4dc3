"""Chaos with real processes: the aggregator killed mid-batch and down for a while, the gateway killed
mid-send; afterwards the aggregator holds exactly what the broker acknowledged, once."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import aiohttp
import pytest

from gateway.broker import find_free_port
from tests.helpers import (
    THINGS,
    TOKEN,
    aggregator_toml,
    auth,
    egiz_process,
    gateway_process,
    private_mosquitto,
    publish_lines,
    stored_lines,
)

pytestmark = pytest.mark.slow


def aggregator_process(config: Path, port: int, log: Path) -> AbstractAsyncContextManager[asyncio.subprocess.Process]:
    return egiz_process("aggregator", "run", "--config", str(config), url=f"http://127.0.0.1:{port}", log=log,
                        what="aggregator")


async def central_count(port: int, site: str) -> int:
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{port}/api/v1/gateways", headers=auth()) as r:
        items = (await r.json())["items"] if r.status == 200 else []
    return sum(g["points"] for g in items if g["site"] == site)


async def test_kills_and_outages_on_both_ends_lose_and_double_nothing(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("EGIZ_CHAOS_SEED", "3")))
    async with private_mosquitto(tmp_path) as broker:
        agg_port = find_free_port()
        gateway = gateway_process(tmp_path, broker.port, uplink={
            "url": f"http://127.0.0.1:{agg_port}", "token": TOKEN, "batch_points": 2000,
            "live_backlog_points": 20000, "interval_s": 0.1, "retry_min_s": 0.1, "retry_max_s": 1.0})
        site = gateway.site
        agg_config = aggregator_toml(tmp_path, agg_port, site)
        agg_log = tmp_path / "aggregator.log"
        per_thing = 2000
        async with gateway.run():
            pass  # the broker session exists from now on
        publisher = asyncio.create_task(publish_lines(broker.port, site, tmp_path, per_thing=per_thing))
        # round 1: the aggregator is down while the line ingests (the backlog grows)
        async with gateway.run() as gw:
            await asyncio.sleep(2)
            # round 2: the aggregator comes up and is killed mid-batch, twice
            for _ in range(2):
                async with aggregator_process(agg_config, agg_port, agg_log) as agg:
                    await asyncio.sleep(rng.uniform(0.3, 1.2))
                    agg.send_signal(signal.SIGKILL)
                    await agg.wait()
            # round 3: the gateway is killed mid-send
            async with aggregator_process(agg_config, agg_port, agg_log):
                await asyncio.sleep(rng.uniform(0.3, 1.0))
                gw.send_signal(signal.SIGKILL)
                await gw.wait()
        acked, _rate = await publisher
        async with aggregator_process(agg_config, agg_port, agg_log) as agg, gateway.run() as gw:
            deadline = time.monotonic() + 90
            while (n := await central_count(agg_port, site)) < len(acked):
                assert time.monotonic() < deadline, f"only {n} of {len(acked)} points reached the aggregator"
                await asyncio.sleep(0.5)
            gw.send_signal(signal.SIGTERM)
            agg.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(gw.wait(), 20) == 0
            assert await asyncio.wait_for(agg.wait(), 20) == 0
        doubled, stored = stored_lines(tmp_path / "aggregator" / "aggregator.duckdb")
        assert not doubled, f"stored twice centrally: {doubled[:10]}"
        assert stored == set(acked), f"lost {len(set(acked) - stored)}, unexpected {len(stored - set(acked))}"
        assert len(acked) == THINGS * per_thing
        print(json.dumps({"chaos_points": len(acked)}))
