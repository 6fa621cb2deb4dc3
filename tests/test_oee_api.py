"""OEE end to end on a running gateway: readings over real MQTT, figures and timelines over REST,
an operator setting a reason and a changeover, refusals with a reason."""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

import aiomqtt

from gateway.common.timefmt import iso_utc
from tests.helpers import OPERATOR_KEY, VIEWER_KEY, GatewayFactory
from tests.helpers.gateways import RunningGateway

MIXER_RULES = {
    "running": [{"property": "motor.current", "op": ">", "value": 3.0}],
    "good_counter": "production.good", "reject_counter": "production.rejected", "ideal_cycle_s": 2.0,
}


async def start_oee_gateway(mosquitto: tuple[str, int], start_gateway: GatewayFactory) -> RunningGateway:
    return await start_gateway(mosquitto, **{"oee.enabled": True, "oee.types": {"mixer": MIXER_RULES},
                                             "oee.flush_interval_s": 0.2})


def two_hours(t0: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int, int]:
    """A mixer's two hours at one reading a minute: running, 15 minutes idle, running again."""
    motor, production, good = [], [], 0
    for i in range(120):
        running = not 60 <= i < 75
        if running and i:
            good += 25
        motor.append({"ts": t0 + 60 * i, "seq": 2 * i + 1, "properties": {"current": 5.0 if running else 1.0}})
        production.append({"ts": t0 + 60 * i, "seq": 2 * i + 2,
                           "properties": {"good": good, "rejected": i // 10}})
    return motor, production, good, 119 // 10


async def publish_two_hours(mosquitto: tuple[str, int], gw: RunningGateway, t0: float) -> tuple[int, int]:
    motor, production, good, rejected = two_hours(t0)
    samples = sorted(motor + production, key=lambda s: s["seq"])
    async with aiomqtt.Client(*mosquitto, identifier=f"node-{gw.site}-mixer") as node:
        for feature in ("motor", "production"):
            batch = [s for s in samples if s in (motor if feature == "motor" else production)]
            await node.publish(f"openegiz/{gw.site}/mixer/mixer-1/{feature}/telemetry",
                               json.dumps({"boot": f"b-{feature}", "samples": batch}), qos=1)
    return good, rejected


async def test_oee_and_downtime_from_mqtt_readings(mosquitto, start_gateway: GatewayFactory) -> None:
    gw = await start_oee_gateway(mosquitto, start_gateway)
    t0 = math.floor(time.time() / 3600) * 3600 - 3 * 3600
    good, rejected = await publish_two_hours(mosquitto, gw, t0)
    tid = gw.thing_id("mixer-1")
    span = {"from": iso_utc(t0), "to": iso_utc(t0 + 7200)}

    async def events() -> list[dict[str, Any]]:
        status, body = await gw.get("/api/v1/oee/events", params={"scope": "machine", "id": tid, **span})
        assert status in (200, 404), body  # 404 until the first reading has made the Thing
        return body["items"] if status == 200 else []

    async def state_now() -> str:
        items = (await gw.get("/api/v1/oee/states"))[1]["items"]
        return items[0]["state"] if items else ""

    deadline = time.monotonic() + 20  # the readings reach the twin; the mixer fell silent 3 h ago: offline
    while await state_now() != "offline":
        assert time.monotonic() < deadline, await events()
        await asyncio.sleep(0.1)
    assert [e["state"] for e in await events()] == ["running", "idle", "running"]
    status, body = await gw.get("/api/v1/oee", params={"scope": "line", "id": "line-a", "by": "hour", **span})
    assert status == 200, body
    total = body["total"]
    assert (total["runS"], total["stopS"]["idle"], total["plannedProductionS"]) == (6300, 900, 7200)
    assert (total["good"], total["rejected"]) == (good, rejected)
    assert total["availability"] == round(6300 / 7200, 4)
    assert total["performance"] == round(2 * (good + rejected) / 6300, 4)
    assert total["oee"] == round(2 * good / 7200, 4)
    assert [b["start"] for b in body["buckets"]] == [iso_utc(t0), iso_utc(t0 + 3600)]
    assert body["buckets"][0]["availability"] == 1.0 and body["buckets"][1]["runS"] == 2700
    site = (await gw.get("/api/v1/oee", params={"by": "day", **span}))[1]
    assert site["scope"] == "site" and site["total"] == total

    idle = next(e for e in await events() if e["state"] == "idle")
    assert idle["durationS"] == 900 and idle["reason"] == ""
    path = f"/api/v1/oee/events/{idle['id']}/reason"
    assert (await gw.send("PUT", path, {"reason": "no_material"}, key=VIEWER_KEY))[0] == 403
    status, err = await gw.send("PUT", path, {"reason": "tea-break"}, key=OPERATOR_KEY)
    assert status == 400 and "not in this site's list" in err["detail"]
    status, fixed = await gw.send("PUT", path, {"reason": "no_material", "note": "flour late"}, key=OPERATOR_KEY)
    assert status == 200, fixed
    assert (fixed["reason"], fixed["note"], fixed["reasonBy"], fixed["durationS"]) == \
        ("no_material", "flour late", "operator key", 900)
    status, down = await gw.get("/api/v1/downtime", params={"scope": "machine", "id": tid, **span})
    assert status == 200, down
    assert [(p["reason"], p["seconds"]) for p in down["pareto"]] == [("no_material", 900)]
    assert down["sixBigLosses"]["idlingAndMinorStops"] == 900
    assert (await gw.get("/api/v1/oee", params={"scope": "line", "id": "line-a", "by": "hour", **span}))[1]["total"] \
        == total  # a reason never changes a duration

    status, state = await gw.send("POST", f"/api/v1/oee/machines/{tid}/state",
                                  {"state": "changeover", "reason": "recipe_change"}, key=OPERATOR_KEY)
    assert status == 200, state
    assert (state["state"], state["source"], state["reason"]) == ("changeover", "operator", "recipe_change")
    states = (await gw.get("/api/v1/oee/states"))[1]["items"]
    assert [(s["thingId"], s["state"]) for s in states] == [(tid, "changeover")]
    reasons = (await gw.get("/api/v1/oee/reasons"))[1]["reasons"]
    assert "no_material" in reasons


async def test_bad_oee_requests_are_refused_with_a_reason(mosquitto, start_gateway: GatewayFactory) -> None:
    gw = await start_oee_gateway(mosquitto, start_gateway)
    cases: list[tuple[str, dict[str, str], int, str]] = [
        ("/api/v1/oee", {"scope": "galaxy"}, 400, "scope must be"),
        ("/api/v1/oee", {"scope": "line"}, 400, "needs an id"),
        ("/api/v1/oee", {"by": "fortnight"}, 400, "by must be"),
        ("/api/v1/oee", {"from": "yesterday"}, 400, "ISO 8601"),
        ("/api/v1/oee", {"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, 400, "before"),
        ("/api/v1/oee", {"scope": "site", "id": "elsewhere"}, 404, "serves site"),
        ("/api/v1/oee", {"scope": "machine", "id": gw.thing_id("nope")}, 404, "no Thing"),
        ("/api/v1/oee", {"colour": "red"}, 400, "unknown parameter"),
        ("/api/v1/downtime", {"state": "running"}, 400, "state:"),
    ]
    for path, params, status, detail in cases:
        got, body = await gw.get(path, params=params)
        assert (got, detail in body["detail"]) == (status, True), (params, body)
    got, body = await gw.send("PUT", "/api/v1/oee/events/none/reason", {"reason": "jam"}, key=OPERATOR_KEY)
    assert got == 404, body
    got, body = await gw.send("PUT", "/api/v1/oee/events/none/reason", {"reason": 3}, key=OPERATOR_KEY)
    assert got == 400, body
    await gw.send("POST", "/api/v1/things", {"id": gw.thing_id("oven-1"), "type": "oven"})
    got, body = await gw.send("POST", f"/api/v1/oee/machines/{gw.thing_id('oven-1')}/state",
                              {"state": "changeover"}, key=OPERATOR_KEY)
    assert got == 400 and "no OEE rules" in body["detail"]
    await gw.send("POST", "/api/v1/things", {"id": gw.thing_id("mixer-9"), "type": "mixer"})
    got, body = await gw.send("POST", f"/api/v1/oee/machines/{gw.thing_id('mixer-9')}/state",
                              {"state": "running"}, key=OPERATOR_KEY)
    assert got == 400 and "state must be" in body["detail"]


async def test_oee_switched_off_answers_404(mosquitto, start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(mosquitto)
    status, body = await gw.get("/api/v1/oee")
    assert status == 404 and "oee.enabled" in body["detail"]


async def test_every_oee_route_is_in_the_openapi_document(mosquitto, start_gateway: GatewayFactory) -> None:
    gw = await start_oee_gateway(mosquitto, start_gateway)
    spec = (await gw.get("/api/v1/openapi.json"))[1]
    routes = {(r.method.lower(), r.resource.canonical) for r in gw.service.app.router.routes()
              if r.resource is not None and r.method != "HEAD"
              and r.resource.canonical.startswith(("/api/v1/oee", "/api/v1/downtime"))}
    assert len(routes) == 7
    for method, path in routes:
        assert method in spec["paths"].get(path, {}), (method, path)
