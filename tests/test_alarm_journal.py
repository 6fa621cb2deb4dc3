"""The alarm journal on a running gateway: full history with filters and paging, CSV export,
who acknowledged and resolved with their comment, and shelving a known condition, which keeps its
notifications from a real webhook receiver until the shelf expires."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import aiomqtt
from aiohttp import web

from gateway.common.timefmt import parse_iso
from tests.helpers import OPERATOR_KEY, VIEWER_KEY, ZONE_TOO_HOT_RULES, GatewayFactory, serve, wait_for


async def test_the_journal_filters_pages_exports_and_shelves(mosquitto: tuple[str, int],
                                                             start_gateway: GatewayFactory, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(ZONE_TOO_HOT_RULES)
    gw = await start_gateway(mosquitto, **{"detect.enabled": True, "detect.rules_file": str(rules)})
    assert (await gw.send("POST", "/api/v1/things", {"id": gw.thing_id("oven-003"), "type": "oven",
                                                     "metadata": {"line": "line-b"}}))[0] == 201
    async with aiomqtt.Client(*mosquitto) as mqtt:
        for n in (1, 2, 3):
            await mqtt.publish(f"openegiz/{gw.site}/oven/oven-00{n}/thermal/telemetry", json.dumps(
                {"ts": time.time(), "seq": 1, "boot": "b", "properties": {"temperature_zones": [190.0, 290.0, 190.0]}}),
                qos=1)
    deadline = time.monotonic() + 10
    while (await gw.get("/api/v1/anomalies?state=active"))[1]["total"] < 3:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    page = (await gw.get("/api/v1/anomalies"))[1]
    by_thing = {a["thingId"].split(":")[1]: a for a in page["items"]}
    first, third = by_thing["oven-001"], by_thing["oven-003"]

    status, _ = await gw.send("POST", f"/api/v1/anomalies/{first['id']}/ack", {"note": "=cmd|' /C calc'!A0"},
                              key=OPERATOR_KEY)
    assert status == 200

    async def total(**params: str) -> int:
        status, body = await gw.get("/api/v1/anomalies", params=params)
        assert status == 200, body
        return body["total"]

    assert await total(acknowledgedBy="operator key") == 1
    assert await total(line="line-b") == 1 and await total(line="line-a") == 2 and await total(line="line-z") == 0
    assert await total(site=gw.site) == 3 and await total(site="elsewhere") == 0
    assert await total(type="threshold", severity="critical") == 3 and await total(type="model") == 0
    assert await total(state="acknowledged") == 1 and await total(thingId=third["thingId"]) == 1
    assert await total(**{"from": "2000-01-01T00:00:00Z", "to": "2000-01-02T00:00:00Z"}) == 0
    one, two = (await gw.get("/api/v1/anomalies", params={"limit": "2"}))[1], \
        (await gw.get("/api/v1/anomalies", params={"limit": "2", "offset": "2"}))[1]
    assert len(one["items"]) == 2 and len(two["items"]) == 1
    assert {a["id"] for a in one["items"] + two["items"]} == {a["id"] for a in page["items"]}
    assert (await gw.get("/api/v1/anomalies", params={"format": "xml"}))[0] == 400

    async with gw.http.get(gw.url + "/api/v1/anomalies", params={"format": "csv"},
                           headers={"Authorization": f"Bearer {VIEWER_KEY}"}) as r:
        assert r.status == 200 and r.content_type == "text/csv"
        rows = list(csv.DictReader(io.StringIO(await r.text())))
    assert len(rows) == 3 and {r["id"] for r in rows} == {a["id"] for a in page["items"]}
    acked = next(r for r in rows if r["id"] == first["id"])
    assert (acked["acknowledgedBy"], acked["state"]) == ("operator key", "acknowledged")
    assert acked["note"].startswith("'=")  # a spreadsheet never runs it

    path = f"/api/v1/anomalies/{third['id']}/shelve"
    assert (await gw.send("POST", path, {"hours": 2, "reason": "probe being replaced"}, key=VIEWER_KEY))[0] == 403
    for bad in ({"hours": 0, "reason": "x"}, {"hours": 2}, {"hours": "2", "reason": "x"},
                {"hours": 1e9, "reason": "x"}):
        assert (await gw.send("POST", path, bad, key=OPERATOR_KEY))[0] == 400, bad
    status, shelf = await gw.send("POST", path, {"hours": 2, "reason": "probe being replaced"}, key=OPERATOR_KEY)
    assert status == 200 and (shelf["by"], shelf["reason"]) == ("operator key", "probe being replaced")
    assert await total(shelved="true") == 1 and await total(shelved="false") == 2
    shelved = (await gw.get("/api/v1/anomalies", params={"shelved": "true"}))[1]["items"][0]
    assert shelved["id"] == third["id"] and shelved["shelved"]["id"] == shelf["id"]
    assert [s["id"] for s in (await gw.get("/api/v1/alarm-shelves"))[1]["items"]] == [shelf["id"]]
    assert (await gw.send("DELETE", f"/api/v1/alarm-shelves/{shelf['id']}", key=OPERATOR_KEY))[0] == 200
    assert await total(shelved="true") == 0 and (await gw.get("/api/v1/alarm-shelves"))[1]["items"] == []

    status, _ = await gw.send("POST", f"/api/v1/anomalies/{third['id']}/resolve", {"note": "probe replaced"},
                              key=OPERATOR_KEY)
    assert status == 200
    status, history = await gw.get(f"/api/v1/anomalies/{third['id']}/journal")
    assert status == 200
    assert [(x["action"], x["by"]) for x in history["items"]] == \
        [("shelved", "operator key"), ("resolved", "operator key")]
    assert history["items"][1]["comment"] == "probe replaced"


async def test_a_shelf_silences_the_webhook_for_its_condition_until_it_expires(
        mosquitto: tuple[str, int], start_gateway: GatewayFactory, tmp_path: Path) -> None:
    got: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        got.append(await request.json())
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner, port = await serve(app)
    try:
        rules = tmp_path / "rules.yaml"
        rules.write_text(ZONE_TOO_HOT_RULES)
        gw = await start_gateway(mosquitto, **{"detect.enabled": True, "detect.rules_file": str(rules),
                                               "detect.webhooks": [{"url": f"http://127.0.0.1:{port}/hook"}]})
        async with aiomqtt.Client(*mosquitto) as mqtt:
            for oven in ("oven-001", "oven-002"):
                await mqtt.publish(f"openegiz/{gw.site}/oven/{oven}/thermal/telemetry", json.dumps(
                    {"ts": time.time(), "seq": 1, "boot": "b",
                     "properties": {"temperature_zones": [190.0, 290.0, 190.0]}}), qos=1)
        await wait_for(lambda: len(got) == 2, timeout=20)
        assert {e["event"] for e in got} == {"AnomalyDetected"}
        shelved, other = sorted(got, key=lambda e: e["thingId"])  # oven-001, oven-002

        status, shelf = await gw.send("POST", f"/api/v1/anomalies/{shelved['id']}/shelve",
                                      {"hours": 0.003, "reason": "probe being replaced"}, key=OPERATOR_KEY)
        assert status == 200
        for anomaly in (shelved, other):  # while shelved: only the other condition notifies
            status, _ = await gw.send("POST", f"/api/v1/anomalies/{anomaly['id']}/ack", {}, key=OPERATOR_KEY)
            assert status == 200
        await wait_for(lambda: len(got) == 3, timeout=20)
        assert (got[2]["event"], got[2]["id"]) == ("AnomalyAcknowledged", other["id"])
        async with gw.http.get(f"{gw.url}/metrics") as r:
            assert "egiz_anomaly_notifications_silenced_total 1.0" in await r.text()
        assert time.time() < parse_iso(shelf["until"]), "the acknowledgements took longer than the shelf"

        await wait_for(lambda: time.time() > parse_iso(shelf["until"]) + 0.1, timeout=30)
        status, _ = await gw.send("POST", f"/api/v1/anomalies/{shelved['id']}/resolve", {"note": "probe replaced"},
                                  key=OPERATOR_KEY)
        assert status == 200
        await wait_for(lambda: len(got) == 4, timeout=20)  # the shelf expired: notifications resume
        assert [e["event"] for e in got if e["id"] == shelved["id"]] == ["AnomalyDetected", "AnomalyResolved"]
    finally:
        await runner.cleanup()
