"""Anomalies across sites: a gateway's anomaly reaches the aggregator (API, WebSocket, site health,
critical assets); an operator acknowledges it centrally and the gateway, which owns it, applies it."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import aiomqtt

from tests.helpers import (
    ADMIN_KEY,
    OPERATOR_KEY,
    VIEWER_KEY,
    LinkedFactory,
    auth,
    wait_for,
)

RULES = """
rules:
  - {name: zone too hot, kind: threshold, type: oven, feature: thermal, property: "temperature_zones[*]",
     above: 250, severity: critical}
"""


async def test_anomaly_reaches_the_aggregator_and_a_central_ack_reaches_the_gateway(
        mosquitto: tuple[str, int], start_linked: LinkedFactory, tmp_path: Path) -> None:
    keys = [{"key": ADMIN_KEY, "role": "admin"}, {"key": OPERATOR_KEY, "role": "operator", "name": "shift lead"},
            {"key": VIEWER_KEY, "role": "viewer"}]
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    site, agg, gw = await start_linked(aggregator={"auth.api_keys": keys, "aggregator.summary_interval_s": 0.2},
                                       **{"detect.enabled": True, "detect.rules_file": str(rules)})
    base = f"http://127.0.0.1:{agg.http_port}"
    async with aiohttp.ClientSession() as http, \
            http.ws_connect(f"{base}/api/v1/ws", headers=auth(VIEWER_KEY)) as ws, aiomqtt.Client(*mosquitto) as mq:
        assert (await ws.receive_json())["event"] == "SiteSummaries"
        await mq.publish(f"openegiz/{site}/oven/oven-001/thermal/telemetry", json.dumps(
            {"ts": time.time(), "seq": 1, "boot": "b", "properties": {"temperature_zones": [200.0, 270.0, 199.0]}}),
            qos=1)
        while True:  # the WebSocket announces it as it arrives
            ev = await ws.receive_json(timeout=10)
            if ev["event"] == "Anomaly":
                break
        anomaly = ev["anomaly"]
        assert anomaly["thingId"] == f"{site}:oven-001" and anomaly["state"] == "open"
        assert anomaly["site"] == site and anomaly["severity"] == "critical"

        async def get(path: str, key: str = VIEWER_KEY) -> dict:
            async with http.get(base + path, headers=auth(key)) as r:
                assert r.status == 200, await r.text()
                return await r.json()

        page = await get(f"/api/v1/anomalies?state=active&site={site}")
        assert page["total"] == 1 and page["items"][0]["id"] == anomaly["id"] and page["items"][0]["pending"] == []

        async def summary() -> dict:
            return next(s for s in (await get("/api/v1/sites"))["items"] if s["site"] == site)

        deadline = time.monotonic() + 10
        while (await summary())["anomalies"]["open"] != 1:  # the Thing's status travels with its document
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert (await summary())["anomalies"]["bySeverity"] == {"critical": 1}
        critical = await get("/api/v1/critical")
        assert critical["items"][0]["thingId"] == f"{site}:oven-001" and critical["items"][0]["score"] >= 0.9

        # acknowledged centrally: viewers may not, operators may; the gateway applies it
        async with http.post(f"{base}/api/v1/anomalies/{anomaly['id']}/ack", json={}, headers=auth(VIEWER_KEY)) as r:
            assert r.status == 403
        async with http.post(f"{base}/api/v1/anomalies/{anomaly['id']}/ack", json={"note": "on my way"},
                             headers=auth(OPERATOR_KEY)) as r:
            assert r.status == 202 and (await r.json())["pending"] == ["ack"]
        detector = gw.service.detector
        assert detector is not None
        await wait_for(lambda: (a := detector.core.active(f"{site}:oven-001")) is not None
                       and a.state == "acknowledged", timeout=10)
        local = detector.core.active(f"{site}:oven-001")
        assert local is not None and local.acknowledged_by == "shift lead (central)" and local.note == "on my way"
        deadline = time.monotonic() + 10
        while True:  # the new state comes back up and the action is done
            doc = await get(f"/api/v1/anomalies/{anomaly['id']}")
            if doc["state"] == "acknowledged" and doc["pending"] == []:
                break
            assert time.monotonic() < deadline, doc
            await asyncio.sleep(0.1)
        async with http.post(f"{base}/api/v1/anomalies/nope/resolve", json={}, headers=auth(OPERATOR_KEY)) as r:
            assert r.status == 404
        async with http.post(f"{base}/api/v1/anomalies/{anomaly['id']}/resolve", json={"falsePositive": "yes"},
                             headers=auth(OPERATOR_KEY)) as r:
            assert r.status == 400
