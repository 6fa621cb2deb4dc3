"""MQTT ingest end to end through a real Mosquitto: validation, dead letters, seq/boot, mapping."""

from __future__ import annotations

import asyncio
import json
import time

import aiomqtt

from tests.helpers import GatewayFactory, telemetry, wait_for


async def test_bad_input_is_dead_lettered_and_never_disturbs_good_traffic(mosquitto, start_gateway: GatewayFactory):
    gw = await start_gateway(mosquitto)
    site = gw.site
    good_topic = f"openegiz/{site}/oven/oven-001/thermal/telemetry"
    bad = [
        (good_topic, b"{not json", "malformed_json"),
        (good_topic, b"\xff\xfe\x00garbage", "malformed_json"),
        (good_topic, json.dumps([1, 2, 3]).encode(), "wrong_shape"),
        (good_topic, json.dumps({"ts": "yesterday", "properties": {"a": 1}}).encode(), "wrong_type"),
        (good_topic, json.dumps({"ts": time.time(), "properties": {"a": "x" * 1000}}).encode(), "too_large"),
        (good_topic, json.dumps({"ts": time.time() * 1000, "properties": {"a": 1}}).encode(), "bad_timestamp"),
        (good_topic, json.dumps({"ts": time.time(), "properties": {"a": [1, "two"]}}).encode(), "wrong_type"),
        (good_topic, json.dumps({"ts": time.time(), "properties": {"bad name": 1}}).encode(), "bad_name"),
        (good_topic, json.dumps({"ts": time.time()}).encode(), "missing_field"),
        (good_topic, b"[" * 100_000, "too_large"),
        (good_topic, b'{"ts": 1e400, "properties": {"a": 1}}', "malformed_json"),
        (good_topic, b'{"ts": NaN, "properties": {"a": 1}}', "malformed_json"),
        ("openegiz/other-site/oven/oven-001/thermal/telemetry", b"{}", "foreign_site"),
        (f"openegiz/{site}/mixer/oven-001/thermal/telemetry",
         telemetry(1, {"a": 1}, boot="x").encode(), "type_mismatch"),
        (f"openegiz/{site}/oven/oven 001/thermal/telemetry", b"{}", "unknown_topic"),
        (f"openegiz/{site}/oven/oven-001/status", b'{"state": "sleeping"}', "wrong_shape"),
    ]
    sent = 0
    async with aiomqtt.Client(*mosquitto) as client:
        # Register the oven first so the type-mismatch case has something to mismatch.
        await client.publish(good_topic, telemetry(0, {"setpoint": 180.0}), qos=1)
        for i in range(1, 101):
            await client.publish(good_topic, telemetry(i, {"temperature_zones": [180.0 + i, 181.0, 182.0],
                                                           "setpoint": 180.0}), qos=1)
            sent += 1
            if i <= len(bad):
                topic, payload, _ = bad[i - 1]
                await client.publish(topic, payload, qos=1)
    ingest, dead = gw.service.ingest, gw.service.dead_letters
    # the foreign-site message is not even delivered: it is outside this gateway's subscription
    expected_dead = len(bad) - 1
    await wait_for(lambda: ingest.accepted_messages == sent + 1 and dead.total >= expected_dead)
    _, thing = await gw.get(f"/api/v1/things/{gw.thing_id('oven-001')}")
    assert thing["features"]["thermal"]["properties"]["temperature_zones"] == [280.0, 181.0, 182.0]
    assert thing["version"] >= 101
    _, letters = await gw.get("/api/v1/deadletters?limit=100")
    reasons = sorted(item["reason"] for item in letters["items"])
    assert reasons == sorted(r for _, _, r in bad if r != "foreign_site")
    for item in letters["items"]:
        assert item["topic"] and len(item["payload"].encode("utf-8", "surrogateescape")) <= 4 * 256
        assert item["detail"]
    _, metrics = await gw.get("/metrics")
    assert 'egiz_ingest_rejected_total{reason="malformed_json"} 4.0' in metrics
    assert gw.service.ingest.connected.is_set()


async def test_sequence_duplicates_gaps_and_reboots(mosquitto, start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(mosquitto)
    topic = f"openegiz/{gw.site}/mixer/mixer-001/motor/telemetry"
    async with aiomqtt.Client(*mosquitto) as client:
        for seq in (1, 2, 2, 3, 1, 6, 7):  # one duplicate, one replay, a gap of two
            await client.publish(topic, telemetry(seq, {"current": float(seq)}), qos=1)
        for seq in (1, 2):  # node rebooted: a new boot id starts over
            await client.publish(topic, telemetry(seq, {"current": 100.0 + seq}, boot="boot-2"), qos=1)
    ingest = gw.service.ingest
    await wait_for(lambda: ingest.accepted_messages == 7)
    m = gw.service.metrics
    assert m.duplicates._value.get() == 2
    assert m.gaps._value.get() == 2
    assert m.reboots._value.get() == 1
    _, feature = await gw.get(f"/api/v1/things/{gw.thing_id('mixer-001')}/features/motor")
    assert feature["properties"]["current"] == 102.0


async def test_batched_samples_apply_in_order(mosquitto, start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(mosquitto)
    topic = f"openegiz/{gw.site}/oven/oven-002/electrical/telemetry"
    now = time.time()
    samples = [{"ts": now - 50 + i, "seq": i + 1, "properties": {"voltage": {"a": 220.0 + i, "b": 221.0, "c": 222.0},
                                                                "power_factor": 0.9}} for i in range(50)]
    async with aiomqtt.Client(*mosquitto) as client:
        await client.publish(topic, json.dumps({"boot": "b", "samples": samples}), qos=1)
        # the same batch again (a redelivery) is recognised by seq and changes nothing
        await client.publish(topic, json.dumps({"boot": "b", "samples": samples}), qos=1)
        await client.publish(topic, json.dumps({"boot": "b", "samples": [{**samples[-1], "seq": 51}]}), qos=1)
    ingest = gw.service.ingest
    await wait_for(lambda: ingest.accepted_messages == 2)
    assert ingest.accepted_points == 50 * 4 + 4
    _, thing = await gw.get(f"/api/v1/things/{gw.thing_id('oven-002')}")
    assert thing["features"]["electrical"]["properties"]["voltage"]["a"] == 269.0
    assert thing["version"] == 3  # created, then one step per applied message
    assert gw.service.metrics.duplicates._value.get() == 50


async def test_unknown_devices_rejected_unless_auto_register(mosquitto, start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(mosquitto, **{"ingest.auto_register": False})
    topic = f"openegiz/{gw.site}/proofer/proofer-001/climate/telemetry"
    async with aiomqtt.Client(*mosquitto) as client:
        await client.publish(topic, telemetry(1, {"temperature": 35.0}), qos=1)
        dead = gw.service.dead_letters
        await wait_for(lambda: dead.total == 1)
        assert gw.service.registry.get(gw.thing_id("proofer-001")) is None
        status, _ = await gw.send("POST", "/api/v1/things", {"id": gw.thing_id("proofer-001"), "type": "proofer"})
        assert status == 201
        await client.publish(topic, telemetry(2, {"temperature": 36.5}), qos=1)
    ingest = gw.service.ingest
    await wait_for(lambda: ingest.accepted_messages == 1)
    _, letters = await gw.get("/api/v1/deadletters")
    assert letters["items"][0]["reason"] == "unknown_device"
    _, feature = await gw.get(f"/api/v1/things/{gw.thing_id('proofer-001')}/features/climate")
    assert feature["properties"] == {"temperature": 36.5}


async def test_legacy_payload_shape_through_configuration(mosquitto, start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(mosquitto, **{
        "ingest.payload_format": "legacy",
        "ingest.telemetry_topic": "sensors/{site}/{device_id}/telemetry",
        "ingest.devices": {"esp32-a1": {"thing": "oven-001", "type": "oven"}},
    })
    async with aiomqtt.Client(*mosquitto) as client:
        await client.publish(f"sensors/{gw.site}/esp32-a1/telemetry", json.dumps({
            "device_id": "esp32-a1", "timestamp": int(time.time()),
            "thermal": {"temperature_zones": [195, 192, 193]},
            "electrical": {"power_factor": 0.91},
        }), qos=1)
    ingest = gw.service.ingest
    await wait_for(lambda: ingest.accepted_messages == 1)
    _, thing = await gw.get(f"/api/v1/things/{gw.thing_id('oven-001')}")
    assert thing["type"] == "oven"
    assert thing["features"]["thermal"]["properties"]["temperature_zones"] == [195, 192, 193]
    assert thing["features"]["electrical"]["properties"]["power_factor"] == 0.91


async def test_status_and_last_will_set_connectivity(mosquitto, start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(mosquitto)
    status_topic = f"openegiz/{gw.site}/conveyor/conveyor-001/status"
    async with aiomqtt.Client(*mosquitto) as client:
        await client.publish(status_topic, json.dumps({"state": "online", "fw": "1.2.0", "ts": time.time()}),
                             qos=1, retain=True)
    registry = gw.service.registry

    def state() -> str | None:
        thing = registry.get(gw.thing_id("conveyor-001"))
        return thing.features["connectivity"].properties.get("state") if thing else None

    await wait_for(lambda: state() == "online")
    # A node that dies without DISCONNECT: the broker publishes its Last Will.
    node = await asyncio.create_subprocess_exec(
        "mosquitto_sub", "-h", mosquitto[0], "-p", str(mosquitto[1]), "-t", f"openegiz/{gw.site}/none",
        "--will-topic", status_topic, "--will-payload", '{"state": "offline"}', "--will-qos", "1",
        "--will-retain", stdout=asyncio.subprocess.DEVNULL)
    await asyncio.sleep(0.5)
    node.kill()
    await node.wait()
    await wait_for(lambda: state() == "offline", timeout=10)
    _, thing = await gw.get(f"/api/v1/things/{gw.thing_id('conveyor-001')}")
    conn = thing["features"]["connectivity"]["properties"]
    assert conn["state"] == "offline" and conn["fw"] == "1.2.0" and conn["since"].endswith("Z")
    async with aiomqtt.Client(*mosquitto) as cleaner:  # clear the retained status
        await cleaner.publish(status_topic, b"", qos=1, retain=True)


async def test_live_state_survives_restart(mosquitto, start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(mosquitto)
    topic = f"openegiz/{gw.site}/cooler/cooler-001/climate/telemetry"
    async with aiomqtt.Client(*mosquitto) as client:
        for seq in range(1, 21):
            await client.publish(topic, telemetry(seq, {"temperature": 2.0 + seq / 10, "humidity": 80.0}), qos=1)
    ingest = gw.service.ingest
    await wait_for(lambda: ingest.accepted_messages == 20)
    await gw.service.stop()
    gw2 = await start_gateway(mosquitto, config=gw.config)
    _, thing = await gw2.get(f"/api/v1/things/{gw2.thing_id('cooler-001')}")
    assert thing["features"]["climate"]["properties"] == {"temperature": 4.0, "humidity": 80.0}
    # seq tracking survived too: a replay of seq 20 is a duplicate, seq 21 is applied
    async with aiomqtt.Client(*mosquitto) as client:
        await client.publish(topic, telemetry(20, {"temperature": -99.0, "humidity": 0.0}), qos=1)
        await client.publish(topic, telemetry(21, {"temperature": 4.1, "humidity": 80.0}), qos=1)
    await wait_for(lambda: gw2.service.ingest.accepted_messages == 1)
    assert gw2.service.metrics.duplicates._value.get() == 1
    assert gw2.service.registry.get(gw2.thing_id("cooler-001")).features["climate"].properties["temperature"] == 4.1
