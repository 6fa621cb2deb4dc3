"""Detection in a running gateway, over real MQTT, HTTP and WebSocket: an anomaly from publish to the
WebSocket, the Thing's status, the API and a webhook that fails before it accepts; the operator flow;
model hot swap, refusal and rollback through the API; remaining useful life from stored history."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import numpy as np
import pytest
import sqlite_utils
from aiohttp import web

from gateway.detect.anomalies import exclusions
from gateway.detect.models import ModelRegistry
from gateway.detect.train import FeatureRows, train_model
from tests.helpers import OPERATOR_KEY, VIEWER_KEY, ZONE_TOO_HOT_RULES, GatewayFactory, auth, serve, wait_for


async def _webhook(fail_first: int) -> tuple[web.AppRunner, str, list[dict[str, Any]], list[str]]:
    """A receiver that answers 503 (Retry-After: 0) to the first requests, then 200."""
    got: list[dict[str, Any]] = []
    keys: list[str] = []
    calls = {"n": 0}

    async def hook(request: web.Request) -> web.Response:
        calls["n"] += 1
        if calls["n"] <= fail_first:
            return web.Response(status=503, headers={"Retry-After": "0"})
        keys.append(request.headers["Idempotency-Key"])
        got.append(await request.json())
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner, port = await serve(app)
    return runner, f"http://127.0.0.1:{port}/hook", got, keys


async def test_anomaly_reaches_websocket_status_api_and_webhook_then_operator_flow(
        mosquitto: tuple[str, int], start_gateway: GatewayFactory, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(ZONE_TOO_HOT_RULES)
    runner, url, got, keys = await _webhook(fail_first=2)
    try:
        gw = await start_gateway(mosquitto, **{"detect.enabled": True, "detect.rules_file": str(rules),
                                               "detect.webhooks": [{"url": url, "headers": {"X-Token": "s3cret"},
                                                                    "min_severity": "warning"}],
                                               "detect.clear_s": 2.0})
        oven = gw.thing_id("oven-001")
        topic = f"openegiz/{gw.site}/oven/oven-001/thermal/telemetry"
        async with aiohttp.ClientSession() as http, \
                http.ws_connect(f"{gw.url}/api/v1/ws", headers=auth(VIEWER_KEY)) as ws, \
                aiomqtt.Client(*mosquitto) as mqtt:
            await ws.send_json({"action": "subscribe", "filter": {"type": "oven"}})
            assert (await ws.receive_json())["event"] == "Subscribed"
            for seq, zone in enumerate((200.0, 201.0, 265.0), 1):
                await mqtt.publish(topic, json.dumps({"ts": time.time(), "seq": seq, "boot": "b1",
                                                      "properties": {"temperature_zones": [199.0, zone, 198.0]}}),
                                   qos=1)
            detected = await _next(ws, "AnomalyDetected")
            assert detected["thingId"] == oven and detected["severity"] == "critical"
            assert detected["anomalyType"] == "threshold" and detected["confidence"] == 1.0
            assert "zone 2 temperature 265.0 °C is 15.0 °C above its limit 250" in detected["explanation"]
            assert detected["topFeatures"][0]["property"] == "temperature_zones[1]"
            anomaly_id = detected["anomalyId"]

            status, thing = await gw.get(f"/api/v1/things/{oven}")
            assert status == 200
            st = thing["features"]["status"]["properties"]
            assert st["anomaly"] is True and st["anomaly_id"] == anomaly_id and st["anomaly_score"] >= 0.9
            assert st["top_features"] == ["thermal/temperature_zones[1]"]

            status, page = await gw.get("/api/v1/anomalies?state=active")
            assert status == 200 and page["total"] == 1 and page["items"][0]["id"] == anomaly_id
            assert (await gw.get("/api/v1/anomalies?state=closed"))[0] == 400

            # viewers look, operators act
            status, _ = await gw.send("POST", f"/api/v1/anomalies/{anomaly_id}/ack", {}, key=VIEWER_KEY)
            assert status == 403
            status, acked = await gw.send("POST", f"/api/v1/anomalies/{anomaly_id}/ack", {"note": "checking"},
                                          key=OPERATOR_KEY)
            assert status == 200 and acked["state"] == "acknowledged" and acked["acknowledgedBy"] == "operator key"
            assert (await _next(ws, "AnomalyAcknowledged"))["anomalyId"] == anomaly_id
            status, closed = await gw.send("POST", f"/api/v1/anomalies/{anomaly_id}/resolve",
                                           {"note": "probe cleaned", "falsePositive": True}, key=OPERATOR_KEY)
            assert status == 200 and closed["state"] == "resolved" and closed["falsePositive"] is True
            resolved = await _next(ws, "AnomalyResolved")
            assert resolved["anomalyId"] == anomaly_id and resolved["falsePositive"] is True
            assert (await gw.send("POST", f"/api/v1/anomalies/{anomaly_id}/ack", {}, key=OPERATOR_KEY))[0] == 409
            assert (await gw.send("POST", "/api/v1/anomalies/nope/ack", {}, key=OPERATOR_KEY))[0] == 404
            status, thing = await gw.get(f"/api/v1/things/{oven}")
            assert thing["features"]["status"]["properties"]["anomaly"] is False

        # the webhook got the anomaly despite two 503s, once per distinct key
        await wait_for(lambda: any(e["event"] == "AnomalyResolved" for e in got), timeout=30)
        assert [e["event"] for e in got][:1] == ["AnomalyDetected"] and len(keys) == len(set(keys))
        sink = gw.service.detector.sinks[0][0]  # type: ignore[union-attr]
        assert sink.retries >= 2 and sink.failed == 0
        # the label is kept for retraining: a false positive is normal data, not left out
        db = sqlite_utils.Database(sqlite3.connect(Path(gw.config.gateway.data_dir) / "anomalies.sqlite"))
        row = db.execute("SELECT state, false_positive, note FROM anomalies WHERE id = ?", [anomaly_id]).fetchone()
        assert row == ("resolved", 1, "probe cleaned")
        assert exclusions(db, 0, time.time() + 10) == []
        metrics = await (await gw.http.get(f"{gw.url}/metrics")).text()
        assert 'egiz_anomalies_opened_total{anomaly_type="threshold",severity="critical"} 1.0' in metrics
    finally:
        await runner.cleanup()


async def test_every_sample_of_a_batched_message_is_scored(mosquitto: tuple[str, int],
                                                           start_gateway: GatewayFactory, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(ZONE_TOO_HOT_RULES)
    gw = await start_gateway(mosquitto, **{"detect.enabled": True, "detect.rules_file": str(rules),
                                           "detect.tick_ms": 1000})
    now = time.time()
    zones = [200.0, 201.0, 300.0, 202.0, 201.5]  # only the third sample is too hot; the twin keeps the last
    samples = [{"ts": now - 5 + i, "seq": i + 1, "properties": {"temperature_zones": [190.0, z, 190.0]}}
               for i, z in enumerate(zones)]
    async with aiomqtt.Client(*mosquitto) as mqtt:
        await mqtt.publish(f"openegiz/{gw.site}/oven/oven-002/thermal/telemetry",
                           json.dumps({"boot": "b", "samples": samples}), qos=1)
    await wait_for(lambda: gw.service.registry.get(gw.thing_id("oven-002")) is not None, timeout=30)
    # stopping finishes the last tick and persists what it found (tick_ms is long on purpose)
    await gw.service.stop()
    db = sqlite_utils.Database(sqlite3.connect(Path(gw.config.gateway.data_dir) / "anomalies.sqlite"))
    rows = list(db.query("SELECT thing_id, opened_at, explanation FROM anomalies"))
    assert len(rows) == 1 and rows[0]["thing_id"] == gw.thing_id("oven-002")
    assert rows[0]["opened_at"] == pytest.approx(now - 3, abs=0.01)  # at the device time of that sample
    assert "300.0 °C" in rows[0]["explanation"]


async def test_deleting_a_thing_resolves_its_anomaly(mosquitto: tuple[str, int], start_gateway: GatewayFactory,
                                                     tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(ZONE_TOO_HOT_RULES)
    gw = await start_gateway(mosquitto, **{"detect.enabled": True, "detect.rules_file": str(rules)})
    async with aiomqtt.Client(*mosquitto) as mqtt:
        await mqtt.publish(f"openegiz/{gw.site}/oven/oven-003/thermal/telemetry", json.dumps(
            {"ts": time.time(), "seq": 1, "boot": "b", "properties": {"temperature_zones": [190.0, 290.0, 190.0]}}),
            qos=1)
    await wait_for(lambda: gw.service.detector is not None
                   and gw.service.detector.core.active(gw.thing_id("oven-003")) is not None, timeout=30)
    assert (await gw.send("DELETE", f"/api/v1/things/{gw.thing_id('oven-003')}"))[0] == 204
    for _ in range(100):
        _, page = await gw.get("/api/v1/anomalies?state=resolved")
        if page["total"] == 1:
            break
        await asyncio.sleep(0.05)
    assert page["items"][0]["resolvedBy"] == "thing deleted"
    assert (await gw.get("/api/v1/anomalies?state=active"))[1]["total"] == 0


async def _next(ws: aiohttp.ClientWebSocketResponse, event: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no {event} within {timeout} s"
        msg = await asyncio.wait_for(ws.receive_json(), left)
        if msg.get("event") == event:
            return msg


def _rows(seed: int) -> FeatureRows:
    rng = np.random.default_rng(seed)
    n = 3000
    level = rng.uniform(80, 200, n)
    x = np.column_stack([level + rng.normal(0, 0.4, n), level + 2 + rng.normal(0, 0.4, n)])
    return FeatureRows(["thermal/a", "thermal/b"], x, np.arange(n, dtype=float),
                       np.array(["x:m-1"] * n, dtype=object))


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    root = tmp_path_factory.mktemp("live-models")
    return root, train_model(_rows(1), "press", root, seed=1).name, train_model(_rows(2), "press", root, seed=2).name


async def test_models_hot_swap_refuse_and_roll_back_in_a_running_gateway(
        mosquitto: tuple[str, int], start_gateway: GatewayFactory, tmp_path: Path,
        two_models: tuple[Path, str, str]) -> None:
    src, v1, v2 = two_models
    models = tmp_path / "models"
    shutil.copytree(src, models)
    ModelRegistry(models).activate("press", v1)
    gw = await start_gateway(mosquitto, **{"detect.enabled": True, "detect.models_dir": str(models),
                                           "detect.model_poll_s": 0.2})

    async def active() -> str | None:
        status, doc = await gw.get("/api/v1/models")
        assert status == 200
        return next((t["active"] for t in doc["types"] if t["type"] == "press"), None)

    assert await active() == v1  # loaded at start
    # readings whose two temperatures disagree: the model opens an anomaly and names its version
    async with aiomqtt.Client(*mosquitto) as mqtt:
        await mqtt.publish(f"openegiz/{gw.site}/press/press-001/thermal/telemetry", json.dumps(
            {"ts": time.time(), "seq": 1, "boot": "b", "properties": {"a": 150.0, "b": 190.0}}), qos=1)
    await wait_for(lambda: gw.service.detector is not None and bool(gw.service.detector.core.active(
        gw.thing_id("press-001"))), timeout=30)
    a = gw.service.detector.core.active(gw.thing_id("press-001"))  # type: ignore[union-attr]
    assert a is not None and a.anomaly_type == "multivariate_pattern" and a.model_version == v1
    assert "what its other readings predict" in a.explanation

    status, body = await gw.send("POST", "/api/v1/models/press/activate", {"version": v2})
    assert status == 200 and await active() == v2
    assert (await gw.send("POST", "/api/v1/models/press/activate", {"version": v2}, key=OPERATOR_KEY))[0] == 403
    # a corrupt version is refused with its reason; the active one stays
    bad = models / "press" / "broken"
    shutil.copytree(models / "press" / v1, bad)
    (bad / "autoencoder.onnx").write_bytes(b"not a model")
    status, body = await gw.send("POST", "/api/v1/models/press/activate", {"version": "broken"})
    assert status == 422 and "corrupt" in body["detail"] and await active() == v2
    # activation on disk (as `egiz model activate` does) is picked up by polling, no restart
    ModelRegistry(models).activate("press", v1)
    for _ in range(50):
        if await active() == v1:
            break
        await asyncio.sleep(0.1)
    assert await active() == v1
    status, body = await gw.send("POST", "/api/v1/models/press/rollback")
    assert status == 200 and body["active"] == v2 and await active() == v2


async def test_remaining_useful_life_from_a_rising_indicator(mosquitto: tuple[str, int],
                                                              start_gateway: GatewayFactory,
                                                              tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(ZONE_TOO_HOT_RULES)
    gw = await start_gateway(mosquitto, **{"detect.enabled": True, "detect.rules_file": str(rules)})
    now = time.time()
    # the last 3 hours, one reading a minute: zone 2 climbs 5 °C an hour from 200 °C (limit 250)
    samples = [{"ts": now - 10800 + 60 * i, "seq": i + 1,
                "properties": {"temperature_zones": [190.0, 200.0 + 5.0 * i / 60 + 0.2 * np.sin(i), 190.0]}}
               for i in range(180)]
    async with aiomqtt.Client(*mosquitto) as mqtt:
        await mqtt.publish(f"openegiz/{gw.site}/oven/oven-007/thermal/telemetry",
                           json.dumps({"boot": "b", "samples": samples}), qos=1)
    oven = gw.thing_id("oven-007")
    await wait_for(lambda: gw.service.registry.get(oven) is not None, timeout=30)
    await gw.service.buffer.flush()
    status, doc = await gw.get(f"/api/v1/things/{oven}/rul")
    assert status == 200, doc
    zone2 = next(i for i in doc["indicators"] if i["property"] == "thermal/temperature_zones[1]")
    assert zone2["status"] == "ok", zone2
    # 215 °C now, 35 °C to go at 5 °C/h: about 7 h
    assert 6.0 < zone2["hours"] < 8.0 and zone2["lowerHours"] <= zone2["hours"] <= zone2["upperHours"]
    flat = next(i for i in doc["indicators"] if i["property"] == "thermal/temperature_zones[0]")
    assert flat["status"] in ("no_trend", "beyond_horizon")
    assert "250" in zone2["text"]
    assert (await gw.get(f"/api/v1/things/{gw.thing_id('nope')}/rul"))[0] == 404
