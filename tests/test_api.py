"""REST API end to end: a real gateway with real SQLite, over real HTTP."""

from __future__ import annotations

import asyncio
import json
import re
import time

import aiohttp
import pytest

from tests.helpers import ADMIN_KEY, OPERATOR_KEY, VIEWER_KEY, GatewayFactory, wait_for

OVEN = {
    "type": "oven",
    "metadata": {"name": "Main Oven #1", "location": "line-a", "zone": {"hall": "B"}},
    "features": {"thermal": {"properties": {"temperature_zones": [185.0, 190.0, 188.5], "setpoint": 190.0}}},
    "relationships": [],
}


async def test_thing_crud_versions_and_persistence(mosquitto, start_gateway: GatewayFactory, tmp_path) -> None:
    gw = await start_gateway(mosquitto)
    tid = gw.thing_id("oven-001")
    status, body = await gw.send("POST", "/api/v1/things", {"id": tid, **OVEN})
    assert status == 201, body
    assert body["version"] == 1 and body["features"]["thermal"]["properties"]["setpoint"] == 190.0
    assert (await gw.send("POST", "/api/v1/things", {"id": tid, **OVEN}))[0] == 409

    # Partial merge: one zone-less property changes, the rest of the Thing stays.
    status, body = await gw.send("PUT", f"/api/v1/things/{tid}/features/thermal",
                                 {"properties": {"setpoint": 200.0}}, key=OPERATOR_KEY)
    assert status == 200, body
    assert body["version"] == 2
    status, thing = await gw.get(f"/api/v1/things/{tid}")
    assert thing["features"]["thermal"]["properties"] == {"temperature_zones": [185.0, 190.0, 188.5],
                                                          "setpoint": 200.0}
    assert thing["metadata"]["zone"] == {"hall": "B"} and thing["version"] == 2
    # Merge patch: objects merge, null removes.
    await gw.send("PUT", f"/api/v1/things/{tid}/features/electrical",
                  {"properties": {"voltage": {"a": 230.0, "b": 229.0}}})
    await gw.send("PUT", f"/api/v1/things/{tid}/features/electrical",
                  {"properties": {"voltage": {"b": None, "c": 231.0}}})
    status, feature = await gw.get(f"/api/v1/things/{tid}/features/electrical")
    assert feature == {"properties": {"voltage": {"a": 230.0, "c": 231.0}}}
    assert (await gw.get(f"/api/v1/things/{tid}/features/nope"))[0] == 404

    # Replace with If-Match; a stale one is refused.
    status, body = await gw.send("PUT", f"/api/v1/things/{tid}", {**OVEN, "metadata": {"name": "Oven A"}},
                                 headers={"If-Match": '"4"'})
    assert status == 200 and body["metadata"] == {"name": "Oven A"} and body["version"] == 5
    status, body = await gw.send("PUT", f"/api/v1/things/{tid}", OVEN, headers={"If-Match": '"4"'})
    assert status == 409 and body["error"] == "conflict" and body["version"] == 5

    # Survives a restart: Things, metadata, features, version.
    await gw.service.stop()
    gw2 = await start_gateway(mosquitto, config=gw.config)
    status, again = await gw2.get(f"/api/v1/things/{tid}")
    assert status == 200
    assert again["metadata"] == {"name": "Oven A"} and again["version"] == 5
    assert again["features"]["thermal"]["properties"]["temperature_zones"] == [185.0, 190.0, 188.5]

    assert (await gw2.send("DELETE", f"/api/v1/things/{tid}", headers={"If-Match": '"1"'}))[0] == 409
    assert (await gw2.send("DELETE", f"/api/v1/things/{tid}"))[0] == 204
    assert (await gw2.get(f"/api/v1/things/{tid}"))[0] == 404


async def test_concurrent_conflicting_writes_exactly_one_wins(mosquitto, start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(mosquitto)
    tid = gw.thing_id("mixer-001")
    await gw.send("POST", "/api/v1/things", {"id": tid, "type": "mixer"})
    for round_ in range(5):
        _, thing = await gw.get(f"/api/v1/things/{tid}")
        version = thing["version"]
        writes = [
            gw.send("PUT", f"/api/v1/things/{tid}/features/motor", {"properties": {"rpm": round_ * 100 + i}},
                    key=OPERATOR_KEY, headers={"If-Match": f'"{version}"'})
            for i in range(8)
        ]
        results = await asyncio.gather(*writes)
        codes = sorted(status for status, _ in results)
        assert codes == [200] + [409] * 7, results
        winner = next(body for status, body in results if status == 200)
        _, thing = await gw.get(f"/api/v1/things/{tid}")
        assert thing["version"] == version + 1
        assert thing["features"]["motor"]["properties"]["rpm"] == winner["properties"]["rpm"]


async def test_auth_roles_and_errors(mosquitto, start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(mosquitto)
    tid = gw.thing_id("conveyor-001")
    url = gw.url
    async with aiohttp.ClientSession() as anon:
        for method, path in (("GET", "/api/v1/things"), ("GET", f"/api/v1/things/{tid}"),
                             ("POST", "/api/v1/query"), ("GET", "/api/v1/ws")):
            async with anon.request(method, url + path) as r:
                assert r.status == 401, (method, path)
                assert (await r.json())["error"] == "unauthorized"
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
        async with anon.get(url + "/api/v1/things", headers={"Authorization": "Bearer wrong-key-xxxxxxxxxx"}) as r:
            assert r.status == 401
        for path in ("/health", "/ready", "/metrics", "/api/v1/openapi.json"):
            async with anon.get(url + path) as r:
                assert r.status == 200, path

    # viewer reads, cannot write; operator writes features, cannot create/delete; admin can.
    assert (await gw.send("POST", "/api/v1/things", {"id": tid, "type": "conveyor"}, key=VIEWER_KEY))[0] == 403
    assert (await gw.send("POST", "/api/v1/things", {"id": tid, "type": "conveyor"}, key=OPERATOR_KEY))[0] == 403
    assert (await gw.send("POST", "/api/v1/things", {"id": tid, "type": "conveyor"}, key=ADMIN_KEY))[0] == 201
    status, body = await gw.send("PUT", f"/api/v1/things/{tid}/features/drive", {"properties": {"speed": 1}},
                                 key=VIEWER_KEY)
    assert status == 403 and "operator" in body["detail"]
    assert (await gw.send("PUT", f"/api/v1/things/{tid}/features/drive", {"properties": {"speed": 1}},
                          key=OPERATOR_KEY))[0] == 200
    assert (await gw.send("DELETE", f"/api/v1/things/{tid}", key=OPERATOR_KEY))[0] == 403
    assert (await gw.get(f"/api/v1/things/{tid}", key=VIEWER_KEY))[0] == 200

    # Errors are JSON {"error","detail"} with the right codes.
    for method, path, body, code in (
        ("POST", "/api/v1/things", {"id": "no-colon", "type": "oven"}, 400),
        ("POST", "/api/v1/things", {"id": tid + "x", "type": "Oven!"}, 400),
        ("POST", "/api/v1/things", {"id": tid + "y", "type": "oven", "colour": "red"}, 400),
        ("PUT", f"/api/v1/things/{tid}/features/drive", {"properties": 5}, 400),
        ("PUT", f"/api/v1/things/{tid}/features/bad name", {"properties": {"a": 1}}, 400),
        ("GET", "/api/v1/things/nope:nothing", None, 404),
        ("POST", "/api/v1/query", {"filter": {"colour": "red"}}, 400),
        ("GET", "/api/v1/no-such-route", None, 404),
    ):
        status, resp = await gw.send(method, path, body)
        assert status == code, (method, path, resp)
        assert set(resp) >= {"error", "detail"}, resp
    async with gw.http.post(url + "/api/v1/things", data=b"{not json", headers={
            "Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}) as r:
        assert r.status == 400 and "JSON" in (await r.json())["detail"]
    async with gw.http.post(url + "/api/v1/things", data=b"x" * 300_000, headers={
            "Authorization": f"Bearer {ADMIN_KEY}"}) as r:
        assert r.status == 413


async def test_pagination_and_filters(mosquitto, start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(mosquitto)
    for i in range(25):
        kind = ("oven", "mixer", "conveyor")[i % 3]
        await gw.send("POST", "/api/v1/things", {
            "id": gw.thing_id(f"{kind}-{i:03d}"), "type": kind,
            "metadata": {"line": "line-a" if i < 20 else "line-b"},
            "features": {"thermal": {"properties": {"temperature_zones": [150 + i, 160, 170], "setpoint": 180}}},
        })
    seen = []
    offset: int | None = 0
    while offset is not None:
        status, page = await gw.get(f"/api/v1/things?limit=10&offset={offset}")
        assert status == 200 and page["total"] == 25 and len(page["items"]) <= 10
        seen += [t["id"] for t in page["items"]]
        offset = page["nextOffset"]
    assert len(seen) == 25 == len(set(seen)) and seen == sorted(seen)

    _, ovens = await gw.get("/api/v1/things?type=oven&limit=100")
    assert ovens["total"] == 9 and all(t["type"] == "oven" for t in ovens["items"])
    _, body = await gw.send("POST", "/api/v1/query", {"filter": {"type": "oven", "metadata.line": "line-a"}})
    assert body["total"] == 7
    _, body = await gw.send("POST", "/api/v1/query", {
        "filter": {"features.thermal.temperature_zones[0]": {"$gte": 170}}, "limit": 50})
    kinds = ("oven", "mixer", "conveyor")
    expected = sorted(gw.thing_id(f"{kinds[i % 3]}-{i:03d}") for i in range(20, 25))
    assert sorted(t["id"] for t in body["items"]) == expected
    flt = json.dumps({"$or": [{"type": "mixer"}, {"metadata.line": "line-b"}]})
    _, body = await gw.get(f"/api/v1/things?filter={flt}&limit=100")
    assert body["total"] == 8 + 4  # 8 mixers, plus the ovens and conveyors 20, 21, 23, 24 on line-b
    assert (await gw.get("/api/v1/things?limit=0"))[0] == 400
    assert (await gw.get("/api/v1/things?colour=red"))[0] == 400


async def test_openapi_health_ready_metrics(mosquitto, start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(mosquitto)
    status, spec = await gw.get("/api/v1/openapi.json")
    assert status == 200 and spec["openapi"].startswith("3.")
    registered = {r.resource.canonical for r in gw.service.app.router.routes() if r.resource is not None}
    assert registered <= set(spec["paths"]), registered - set(spec["paths"])
    status, ready = await gw.get("/ready")
    assert status == 200 and ready["checks"]["mqtt"] == "ok"
    status, text = await gw.get("/metrics")
    assert "egiz_mqtt_connected 1.0" in text and "egiz_http_requests_total" in text
    rss = re.search(r"^process_resident_memory_bytes (\S+)$", text, re.M)
    assert rss is not None and float(rss.group(1)) > 20 * 2**20  # this process's own memory: Python and more

    # Not ready while the broker session is down.
    await gw.service.ingest.stop()
    status, ready = await gw.get("/ready")
    assert status == 503 and ready["checks"]["mqtt"] == "disconnected"


async def test_commands_round_trip(mosquitto, start_gateway: GatewayFactory) -> None:
    import aiomqtt

    gw = await start_gateway(mosquitto)
    tid = gw.thing_id("oven-007")
    await gw.send("POST", "/api/v1/things", {"id": tid, "type": "oven"})
    cmd_topic = f"openegiz/{gw.site}/oven/oven-007/cmd"
    async with aiomqtt.Client(*mosquitto, identifier=f"node-{gw.site}") as node:
        await node.subscribe(cmd_topic, qos=1)
        status, body = await gw.send("PUT", f"/api/v1/things/{tid}/features/thermal",
                                     {"desiredProperties": {"setpoint": 210.0}}, key=OPERATOR_KEY)
        assert status == 200, body
        cmd_id = body["command"]["cmdId"]
        assert body["desiredProperties"] == {"setpoint": 210.0}
        async with asyncio.timeout(5):
            async for msg in node.messages:
                cmd = json.loads(msg.payload)  # type: ignore[arg-type]
                break
        assert cmd["cmdId"] == cmd_id and cmd["desiredProperties"] == {"setpoint": 210.0}
        assert cmd["feature"] == "thermal"
        await node.publish(cmd_topic + "/ack", json.dumps({"cmdId": cmd_id, "status": "ok"}), qos=1)

        async def acked() -> dict:
            return (await gw.get(f"/api/v1/things/{tid}"))[1]

        deadline = time.monotonic() + 5
        while True:
            thing = await acked()
            if thing["features"].get("commands"):
                break
            assert time.monotonic() < deadline, thing
            await asyncio.sleep(0.05)
        assert thing["features"]["thermal"] == {"properties": {"setpoint": 210.0}}
        assert thing["features"]["commands"]["properties"]["last"]["status"] == "ok"
        # An ack for a command nobody sent is dead-lettered, not applied.
        await node.publish(cmd_topic + "/ack", json.dumps({"cmdId": "forged", "status": "ok"}), qos=1)
        dead = gw.service.dead_letters
        await wait_for(lambda: dead.total >= 1)
        _, letters = await gw.get("/api/v1/deadletters?reason=unknown_command")
        assert letters["items"][0]["reason"] == "unknown_command"

    # With the broker session down the command is refused and nothing changes.
    await gw.service.ingest.stop()
    status, body = await gw.send("PUT", f"/api/v1/things/{tid}/features/thermal",
                                 {"desiredProperties": {"setpoint": 999}}, key=OPERATOR_KEY)
    assert status == 503 and body["error"] == "broker_unavailable"
    assert (await gw.get(f"/api/v1/things/{tid}"))[1]["features"]["thermal"]["properties"]["setpoint"] == 210.0


async def test_bodies_and_filters_are_strict_json(mosquitto, start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(mosquitto)
    tid = gw.thing_id("oven-009")
    assert (await gw.send("POST", "/api/v1/things", {"id": tid, **OVEN}))[0] == 201
    feature = f"/api/v1/things/{tid}/features/thermal"
    deep = b"[" * 50_000 + b"]" * 50_000
    headers = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}
    for method, path, raw in (
        ("PUT", feature, b'{"properties": {"setpoint": NaN}}'),
        ("PUT", feature, b'{"properties": {"temperature_zones": [1.0, -Infinity]}}'),
        ("PUT", feature, b'{"properties": {"setpoint": 1e400}}'),
        ("PUT", feature, b'{"desiredProperties": {"setpoint": Infinity}}'),
        ("POST", "/api/v1/things", b'{"id": "%s-x", "type": "oven", "metadata": {"x": NaN}}' % tid.encode()),
        ("POST", "/api/v1/query", b'{"filter": {"features.thermal.properties.setpoint": {"$lt": Infinity}}}'),
        ("POST", "/api/v1/query", deep),
        ("PUT", f"/api/v1/things/{tid}", deep),
    ):
        async with gw.http.request(method, gw.url + path, data=raw, headers=headers) as r:
            body = await r.json()
            assert r.status == 400, (method, path, raw[:60], body)
            assert body["error"] == "invalid" and body["detail"], body
    for flt in ('{"features.thermal.properties.setpoint": {"$gt": NaN}}', "[" * 1200):
        status, body = await gw.get("/api/v1/things", params={"filter": flt})
        assert status == 400 and body["error"] == "invalid", body
    async with gw.http.get(f"{gw.url}/api/v1/things/{tid}", headers=headers) as r:
        doc = json.loads(await r.text(), parse_constant=lambda c: pytest.fail(f"{c} in a response"))
    assert doc["features"] == OVEN["features"] and doc["version"] == 1
