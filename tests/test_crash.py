"""kill -9 of the gateway process while it ingests: nothing acknowledged is lost, nothing is stored twice,
and a restart answers with the live state at once."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import duckdb
import pytest

from tests.helpers import T_BASE, THINGS, auth, gateway_process, private_mosquitto, publish_lines, stored_lines

pytestmark = pytest.mark.slow


async def stored_count(http: aiohttp.ClientSession, http_port: int, site: str) -> int:
    total = 0
    for i in range(THINGS):
        url = (f"http://127.0.0.1:{http_port}/api/v1/things/{site}:oven-{i:03d}/history"
               f"?from=0&to={time.time() + 60}&resolution=1d&property=v")
        async with http.get(url, headers=auth()) as r:
            if r.status == 404:
                continue
            doc = await r.json()
            total += sum(sum(s["points"]["count"]) for s in doc["series"])
    return total


async def test_kill_9_at_random_moments_loses_and_doubles_nothing(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("EGIZ_CRASH_SEED", "11")))
    async with private_mosquitto(tmp_path) as broker:
        gw = gateway_process(tmp_path, broker.port)
        async with gw.run():
            pass  # first start: creates the session on the broker, so messages queue while it is down
        publisher = asyncio.create_task(publish_lines(broker.port, gw.site, tmp_path, per_thing=5000))
        kills = 0
        for _ in range(4):
            async with gw.run() as proc:
                await asyncio.sleep(rng.uniform(0.3, 1.5))
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
                kills += 1
        acked, rate = await publisher
        async with gw.run() as proc, aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 60
            while (n := await stored_count(http, gw.http_port, gw.site)) < len(acked):
                assert time.monotonic() < deadline, f"only {n} of {len(acked)} acknowledged messages stored"
                await asyncio.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 20) == 0
        doubled, stored = stored_lines(tmp_path / "data" / "buffer.duckdb")
        assert kills == 4
        assert not doubled, f"stored twice: {doubled[:10]}"
        assert stored == set(acked), (f"lost {len(set(acked) - stored)}, "
                                      f"stored but never acknowledged {len(stored - set(acked))}")
        assert len(acked) == THINGS * 5000
        print(json.dumps({"crash_test_publish_rate_msg_s": round(rate), "messages": len(acked), "kills": kills}))
        assert rate >= 1000, f"the publishers reached only {rate:.0f} msg/s"


async def test_restart_answers_with_the_last_stored_state_before_any_new_message(tmp_path: Path) -> None:
    async with private_mosquitto(tmp_path) as broker:
        gw = gateway_process(tmp_path, broker.port)
        site = gw.site
        url = f"{gw.url}/api/v1/things/{site}:oven-001"
        async with gw.run() as proc, aiohttp.ClientSession() as http:
            async with aiomqtt.Client("127.0.0.1", broker.port) as client:
                topic = f"openegiz/{site}/oven/oven-001/thermal/telemetry"
                for seq in range(1, 51):
                    props = {"temperature": 100.0 + seq, "zones": [seq, seq + 1], "voltage": {"a": 230 + seq}}
                    await client.publish(topic, json.dumps({"ts": time.time(), "seq": seq, "boot": "b",
                                                            "properties": props}), qos=1)
            deadline = time.monotonic() + 10
            while True:
                async with http.get(url, headers=auth()) as r:
                    if r.status == 200 and (await r.json())["features"]["thermal"]["properties"].get(
                            "temperature") == 150.0:
                        break
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            # killed right away: the registry file (written behind, every second) may lag; the buffer has it
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        async with gw.run(), aiohttp.ClientSession() as http:
            async with http.get(url, headers=auth()) as r:
                props = (await r.json())["features"]["thermal"]["properties"]
            assert props == {"temperature": 150.0, "zones": [50.0, 51.0], "voltage": {"a": 280.0}}


@pytest.mark.parametrize("policy", ["drop_oldest", "reject_new"])
async def test_a_full_disk_never_crashes_the_gateway_corrupts_nothing_and_loses_nothing(tmp_path: Path,
                                                                                         policy: str) -> None:
    """A file size limit on the gateway process stands in for a full SD card (writes fail with EFBIG);
    raising it again stands in for the operator making room."""
    import resource

    limit = 2 * 2**20

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    total = 400 * 500
    async with private_mosquitto(tmp_path) as broker:
        gw = gateway_process(tmp_path, broker.port,
                             buffer={"disk_budget_mb": 0, "disk_policy": policy, "maintenance_interval_s": 1})
        site, base = gw.site, gw.url
        async with gw.run(preexec_fn=small_disk, timeout=20) as proc, aiohttp.ClientSession() as http:

            async def ready() -> tuple[int, dict[str, Any]]:
                async with http.get(base + "/ready") as r:
                    return r.status, await r.json()

            topic = f"openegiz/{site}/oven/oven-001/thermal/telemetry"
            async with aiomqtt.Client("127.0.0.1", broker.port, max_inflight_messages=200) as client:
                for m in range(400):  # 200,000 samples: far more than 2 MiB hold
                    samples = [{"ts": T_BASE + m * 500 + i, "seq": m * 500 + i + 1,
                                "properties": {"a": (m * 500 + i) % 97 * 1.37}} for i in range(500)]
                    await client.publish(topic, json.dumps({"boot": "b", "samples": samples}), qos=1)
            deadline = time.monotonic() + 30
            while not any("buffer commits are failing" in w for w in (await ready())[1]["warnings"]):
                assert proc.returncode is None, "the gateway died on a full disk"
                assert time.monotonic() < deadline, "the file limit was never reached: the test proves nothing"
                await asyncio.sleep(0.2)
            async with http.get(base + "/health") as r:
                assert r.status == 200  # degraded, not dead
            await asyncio.sleep(2)  # a few retries against the full disk
            assert proc.returncode is None
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            deadline = time.monotonic() + 60
            while True:
                status, doc = await ready()
                async with http.get(base + "/metrics") as r:
                    metrics = await r.text()
                if status == 200 and not doc["warnings"] and "egiz_buffer_pending_points 0.0" in metrics:
                    async with http.get(f"{base}/api/v1/things/{site}:oven-001", headers=auth()) as r:
                        if (await r.json())["features"]["thermal"]["properties"]["a"] == (total - 1) % 97 * 1.37:
                            break
                assert time.monotonic() < deadline, f"no recovery after the disk had room again: {doc}"
                await asyncio.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 20) == 0
    con = duckdb.connect(str(tmp_path / "data" / "buffer.duckdb"), read_only=True)
    gone = 0
    for line in metrics.splitlines():
        if line.startswith(("egiz_buffer_refused_points_total ", "egiz_buffer_dropped_points_total{")):
            gone += int(float(line.split()[-1]))
    n, distinct, oldest, newest = con.execute("SELECT count(*), count(DISTINCT seq), min(seq), max(seq) "
                                              "FROM points").fetchone()
    con.close()
    # the file opens; nothing is stored twice; every point is stored or counted as removed by the policy
    assert n == distinct
    assert n + gone == total, (n, gone)
    if policy == "drop_oldest":  # the oldest made room (when the delete itself could be written); the rest is there
        assert newest == total and oldest == gone + 1
