"""Chaos with real processes: the aggregator killed mid-batch and down for a while, the gateway killed
mid-send; afterwards the aggregator holds exactly what the broker acknowledged, once."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import duckdb
import pytest

from gateway.broker import BrokerProcess, BrokerSettings, find_free_port
from tests.conftest import ADMIN_KEY, auth, unique_site
from tests.test_crash import THINGS, egiz, gateway_process, need_mosquitto, publish, write_config

pytestmark = pytest.mark.slow
TOKEN = "chaos-gateway-token-000001"


def aggregator_toml(tmp: Path, port: int, site: str) -> Path:
    path = tmp / "aggregator.toml"
    path.write_text(f"""
[aggregator]
data_dir = "{tmp / 'aggregator'}"
[http]
host = "127.0.0.1"
port = {port}
[auth]
api_keys = [{{ key = "{ADMIN_KEY}", role = "admin" }}]
gateway_tokens = [{{ gateway = "gw-{site}", token = "{TOKEN}", site = "{site}", line = "line-a" }}]
[log]
format = "json"
level = "warning"
""")
    return path


@asynccontextmanager
async def aggregator_process(config: Path, port: int, log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    with log.open("ab") as err:
        proc = await asyncio.create_subprocess_exec(egiz(), "aggregator", "run", "--config", str(config),
                                                    stdout=err, stderr=err)
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 60
            while True:
                if proc.returncode is not None:
                    raise AssertionError(f"the aggregator exited with {proc.returncode}; see {log}")
                try:
                    async with http.get(f"http://127.0.0.1:{port}/ready") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "the aggregator did not become ready"
                await asyncio.sleep(0.05)
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def central_count(port: int, site: str) -> int:
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{port}/api/v1/gateways", headers=auth()) as r:
        items = (await r.json())["items"] if r.status == 200 else []
    return sum(g["points"] for g in items if g["site"] == site)


async def test_kills_and_outages_on_both_ends_lose_and_double_nothing(tmp_path: Path) -> None:
    need_mosquitto()
    rng = random.Random(int(os.environ.get("EGIZ_CHAOS_SEED", "3")))
    site = unique_site()
    broker = BrokerProcess(BrokerSettings(port=find_free_port(), data_dir=tmp_path / "broker", allow_anonymous=True))
    await broker.start()
    http_port, agg_port = find_free_port(), find_free_port()
    gw_config = write_config(tmp_path, site, broker.port, http_port)
    gw_config.write_text(gw_config.read_text() + f"""[uplink]
url = "http://127.0.0.1:{agg_port}"
token = "{TOKEN}"
batch_points = 2000
live_backlog_points = 20000
interval_s = 0.1
retry_min_s = 0.1
retry_max_s = 1.0
""")
    agg_config = aggregator_toml(tmp_path, agg_port, site)
    gw_log, agg_log = tmp_path / "gateway.log", tmp_path / "aggregator.log"
    per_thing = 2000
    try:
        async with gateway_process(gw_config, http_port, gw_log):
            pass  # the broker session exists from now on
        publisher = asyncio.create_task(publish(broker.port, site, tmp_path, per_thing=per_thing))
        # round 1: the aggregator is down while the line ingests (the backlog grows)
        async with gateway_process(gw_config, http_port, gw_log) as gw:
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
        async with aggregator_process(agg_config, agg_port, agg_log) as agg, \
                gateway_process(gw_config, http_port, gw_log) as gw:
            deadline = time.monotonic() + 90
            while (n := await central_count(agg_port, site)) < len(acked):
                assert time.monotonic() < deadline, f"only {n} of {len(acked)} points reached the aggregator"
                await asyncio.sleep(0.5)
            gw.send_signal(signal.SIGTERM)
            agg.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(gw.wait(), 20) == 0
            assert await asyncio.wait_for(agg.wait(), 20) == 0
        con = duckdb.connect(str(tmp_path / "aggregator" / "aggregator.duckdb"), read_only=True)
        rows = con.execute("SELECT s.thing_id, p.seq, count(*) FROM points p JOIN series s ON p.series = s.id "
                           "WHERE s.path = 'v' GROUP BY ALL").fetchall()
        con.close()
        doubled = [(t, s, c) for t, s, c in rows if c > 1]
        stored = {(t.split(":", 1)[1], s) for t, s, _ in rows}
        assert not doubled, f"stored twice centrally: {doubled[:10]}"
        assert stored == set(acked), f"lost {len(set(acked) - stored)}, unexpected {len(stored - set(acked))}"
        assert len(acked) == THINGS * per_thing
        print(json.dumps({"chaos_points": len(acked)}))
    finally:
        await broker.stop()
