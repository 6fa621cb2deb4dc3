"""WebSocket API end to end: real gateway, real broker, real sockets."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time
from collections import defaultdict

import aiohttp
import aiomqtt

from tests.helpers import VIEWER_KEY, auth, telemetry, wait_for


async def collect(ws: aiohttp.ClientWebSocketResponse, into: list[dict]) -> None:
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.TEXT:
            into.append(json.loads(msg.data))


async def test_subscribers_by_id_filter_and_all_receive_every_state_change(mosquitto, start_gateway):
    gw = await start_gateway(mosquitto)
    site = gw.site
    ws_url = gw.url + "/api/v1/ws"
    things = [("oven", "oven-001"), ("oven", "oven-002"), ("mixer", "mixer-001")]
    async with aiohttp.ClientSession() as http:
        by_id = await http.ws_connect(ws_url, headers=auth(VIEWER_KEY))
        by_filter = await http.ws_connect(ws_url, headers=auth(VIEWER_KEY))
        everything = await http.ws_connect(f"{ws_url}?access_token={VIEWER_KEY}")  # browser style
        await by_id.send_json({"action": "subscribe", "thingId": f"{site}:oven-001"})
        await by_filter.send_json({"action": "subscribe", "filter": {"type": "oven"}})
        await everything.send_json({"action": "subscribe"})
        for ws in (by_id, by_filter, everything):
            ack = await ws.receive_json(timeout=5)
            assert ack["event"] == "Subscribed", ack
        got: dict[str, list[dict]] = {"id": [], "filter": [], "all": []}
        readers = [asyncio.create_task(collect(ws, got[k]))
                   for k, ws in (("id", by_id), ("filter", by_filter), ("all", everything))]
        per_thing = 150
        async with aiomqtt.Client(*mosquitto) as client:
            for seq in range(1, per_thing + 1):
                for ttype, eid in things:
                    await client.publish(f"openegiz/{site}/{ttype}/{eid}/main/telemetry",
                                         telemetry(seq, {"value": float(seq)}), qos=1)
        expected_all = per_thing * 3 + 3  # + a ThingCreated for each auto-registered Thing

        await wait_for(lambda: len([e for e in got["all"] if e["event"] != "Heartbeat"]) >= expected_all)
        await asyncio.sleep(0.2)  # anything extra would arrive now
        for ws in (by_id, by_filter, everything):
            await ws.close()
        await asyncio.gather(*readers)

    def changes(events: list[dict]) -> list[dict]:
        return [e for e in events if e["event"] == "StateChanged"]

    assert len(changes(got["id"])) == per_thing
    assert {e["thingId"] for e in changes(got["id"])} == {f"{site}:oven-001"}
    versions = [e["version"] for e in changes(got["id"])]
    assert versions == sorted(versions) and len(set(versions)) == per_thing
    assert [e["properties"]["value"] for e in changes(got["id"])] == [float(s) for s in range(1, per_thing + 1)]
    assert len(changes(got["filter"])) == 2 * per_thing
    assert {e["thingId"] for e in changes(got["filter"])} == {f"{site}:oven-001", f"{site}:oven-002"}
    assert len(changes(got["all"])) == 3 * per_thing
    first = changes(got["all"])[0]
    assert set(first) == {"event", "thingId", "feature", "properties", "version", "timestamp"}
    assert first["timestamp"].endswith("Z")


async def test_snapshot_unsubscribe_heartbeat_and_errors(mosquitto, start_gateway):
    gw = await start_gateway(mosquitto, **{"ws.heartbeat_s": 0.3})
    tid = gw.thing_id("cooler-001")
    await gw.send("POST", "/api/v1/things", {"id": tid, "type": "cooler",
                                             "features": {"climate": {"properties": {"temperature": 3.5}}}})
    async with aiohttp.ClientSession() as http, http.ws_connect(gw.url + "/api/v1/ws", headers=auth()) as ws:
        await ws.send_json({"action": "subscribe", "thingId": tid, "snapshot": True})
        assert (await ws.receive_json(timeout=5))["event"] == "Subscribed"
        snap = await ws.receive_json(timeout=5)
        assert snap["event"] == "Snapshot"
        assert snap["thing"]["features"]["climate"]["properties"] == {"temperature": 3.5}
        beat = await ws.receive_json(timeout=5)
        assert beat["event"] == "Heartbeat" and beat["timestamp"].endswith("Z")
        for bad in ("not json", json.dumps({"action": "dance"}), json.dumps({"action": "subscribe", "thingId": "x"}),
                    json.dumps({"action": "subscribe", "filter": {"colour": 1}})):
            await ws.send_str(bad)
            while (reply := await ws.receive_json(timeout=5))["event"] == "Heartbeat":
                pass
            assert reply["event"] == "Error" and reply["detail"], bad
        await ws.send_json({"action": "unsubscribe", "thingId": tid})
        while (reply := await ws.receive_json(timeout=5))["event"] == "Heartbeat":
            pass
        assert reply["event"] == "Unsubscribed"
        await gw.send("PUT", f"/api/v1/things/{tid}/features/climate", {"properties": {"temperature": 4.0}})
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            msg = await ws.receive_json(timeout=2)
            assert msg["event"] == "Heartbeat", msg  # nothing else after unsubscribing


async def test_slow_client_is_disconnected_and_never_slows_ingest(mosquitto, start_gateway):
    gw = await start_gateway(mosquitto, **{"ws.queue_size": 100})
    site = gw.site
    own = gw.service.bus.subscriber_count  # the gateway's own consumers (the detector)
    # A client that completes the handshake and then never reads, with a tiny receive buffer.
    loop = asyncio.get_running_loop()
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.setblocking(False)
    await loop.sock_connect(slow, ("127.0.0.1", gw.service.http_port))
    key = base64.b64encode(os.urandom(16)).decode()
    await loop.sock_sendall(slow, (
        f"GET /api/v1/ws?access_token={VIEWER_KEY} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    assert b"101" in (await loop.sock_recv(slow, 4096)).split(b"\r\n")[0]
    frame = json.dumps({"action": "subscribe"}).encode()
    mask = os.urandom(4)
    await loop.sock_sendall(slow, bytes([0x81, 0x80 | len(frame)]) + mask
                            + bytes(b ^ mask[i % 4] for i, b in enumerate(frame)))

    fast_events: list[dict] = []
    async with aiohttp.ClientSession() as http, http.ws_connect(gw.url + "/api/v1/ws", headers=auth()) as fast:
        await fast.send_json({"action": "subscribe"})
        assert (await fast.receive_json(timeout=5))["event"] == "Subscribed"
        reader = asyncio.create_task(collect(fast, fast_events))
        big = {"temperature_zones": [float(i) for i in range(64)], "label": "x" * 200}
        sent = 0
        m = gw.service.metrics
        async with aiomqtt.Client(*mosquitto) as client:
            while m.ws_disconnected_slow._value.get() == 0 and sent < 60_000:
                for _ in range(500):
                    sent += 1
                    await client.publish(f"openegiz/{site}/oven/oven-001/thermal/telemetry",
                                         telemetry(sent, big), qos=1)
        assert m.ws_disconnected_slow._value.get() == 1, "the slow client was never disconnected"
        await wait_for(lambda: gw.service.ingest.accepted_messages == sent)
        await wait_for(lambda: len([e for e in fast_events if e["event"] == "StateChanged"]) == sent, timeout=20)
        await fast.close()
        await reader
    slow.close()
    await wait_for(lambda: gw.service.bus.subscriber_count == own)


async def test_thousand_concurrent_clients(mosquitto, start_gateway):
    gw = await start_gateway(mosquitto)
    site = gw.site
    n_clients, n_messages = 1000, 10
    connector = aiohttp.TCPConnector(limit=0)
    counts: dict[int, int] = defaultdict(int)
    async with aiohttp.ClientSession(connector=connector) as http:
        sockets = await asyncio.gather(*(http.ws_connect(gw.url + "/api/v1/ws", headers=auth(VIEWER_KEY))
                                         for _ in range(n_clients)))
        for ws in sockets:
            await ws.send_json({"action": "subscribe", "thingId": f"{site}:mixer-001"})
        for ws in sockets:
            assert (await ws.receive_json(timeout=10))["event"] == "Subscribed"
        assert gw.service.metrics.ws_clients._value.get() == n_clients

        async def count(i: int, ws: aiohttp.ClientWebSocketResponse) -> None:
            async for msg in ws:
                if json.loads(msg.data)["event"] == "StateChanged":
                    counts[i] += 1
                    if counts[i] == n_messages:
                        return

        readers = [asyncio.create_task(count(i, ws)) for i, ws in enumerate(sockets)]
        async with aiomqtt.Client(*mosquitto) as client:
            for seq in range(1, n_messages + 1):
                await client.publish(f"openegiz/{site}/mixer/mixer-001/vibration/telemetry",
                                     telemetry(seq, {"rms": seq / 10}), qos=1)
        await asyncio.wait_for(asyncio.gather(*readers), 30)
        assert all(counts[i] == n_messages for i in range(n_clients))
        await asyncio.gather(*(ws.close() for ws in sockets))
    await wait_for(lambda: gw.service.metrics.ws_clients._value.get() == 0)


async def test_shutdown_closes_clients_with_going_away(mosquitto, start_gateway):
    gw = await start_gateway(mosquitto)
    async with aiohttp.ClientSession() as http, http.ws_connect(gw.url + "/api/v1/ws", headers=auth()) as ws:
        await ws.send_json({"action": "subscribe"})
        await ws.receive_json(timeout=5)
        stopping = asyncio.create_task(gw.service.stop())
        msg = await ws.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1001
        await stopping


async def test_subscriptions_per_connection_are_capped_and_an_over_cap_subscribe_is_an_error(mosquitto,
                                                                                              start_gateway):
    gw = await start_gateway(mosquitto)
    site = gw.site
    ids = [f"{site}:oven-{i:04d}" for i in range(1000)]
    async with aiohttp.ClientSession() as http, http.ws_connect(gw.url + "/api/v1/ws", headers=auth()) as ws:

        async def reply(message: dict | str) -> dict:
            await ws.send_str(message if isinstance(message, str) else json.dumps(message))
            while (got := await ws.receive_json(timeout=5))["event"] == "Heartbeat":
                pass
            return got

        assert (await reply({"action": "subscribe", "thingIds": ids[:600]}))["event"] == "Subscribed"
        over = await reply({"action": "subscribe", "thingIds": [*ids[600:], f"{site}:extra-1"]})
        assert over["event"] == "Error" and "1000" in over["detail"], over
        assert (await reply({"action": "subscribe", "thingIds": ids[500:]}))["event"] == "Subscribed"
        assert (await reply({"action": "subscribe", "thingId": ids[0]}))["event"] == "Subscribed"  # already watched
        assert (await reply({"action": "subscribe", "thingId": f"{site}:extra-1"}))["event"] == "Error"

        # The same filter many times counts once; 32 different ones are the limit.
        for _ in range(40):
            assert (await reply({"action": "subscribe", "filter": {"type": "press"}}))["event"] == "Subscribed"
        for n in range(31):
            ack = await reply({"action": "subscribe", "filter": {"metadata.n": n}})
            assert ack["event"] == "Subscribed", (n, ack)
        over = await reply({"action": "subscribe", "filter": {"metadata.n": 31}})
        assert over["event"] == "Error" and "32" in over["detail"], over

        # The socket stays open and only what was accepted is watched.
        async with aiomqtt.Client(*mosquitto) as client:
            for eid in ("extra-1", "oven-0999"):
                await client.publish(f"openegiz/{site}/oven/{eid}/thermal/telemetry",
                                     telemetry(1, {"t": 1.0}), qos=1)
        seen = []
        while not seen or seen[-1] != (f"{site}:oven-0999", "StateChanged"):
            msg = await ws.receive_json(timeout=5)
            if msg["event"] != "Heartbeat":
                seen.append((msg["thingId"], msg["event"]))
        assert seen == [(f"{site}:oven-0999", "ThingCreated"), (f"{site}:oven-0999", "StateChanged")]


async def test_non_finite_numbers_and_deep_nesting_in_a_message_are_errors(mosquitto, start_gateway):
    gw = await start_gateway(mosquitto)
    async with aiohttp.ClientSession() as http, http.ws_connect(gw.url + "/api/v1/ws", headers=auth()) as ws:
        for bad in ('{"action": "subscribe", "filter": {"features.thermal.properties.t": {"$gt": NaN}}}',
                    '{"action": "subscribe", "filter": {"features.thermal.properties.t": {"$lt": 1e400}}}',
                    "[" * 20_000 + "]" * 20_000):
            await ws.send_str(bad)
            reply = json.loads((await ws.receive(timeout=5)).data, parse_constant=lambda c: None)
            assert reply["event"] == "Error" and reply["detail"], reply
        await ws.send_json({"action": "subscribe"})
        assert (await ws.receive_json(timeout=5))["event"] == "Subscribed"


def _publish_burst(broker: tuple[str, int], topic: str, n: int) -> int:
    """Publish n QoS 1 readings as fast as the broker takes them (a node's backlog after an outage)."""
    import paho.mqtt.client as paho

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(*broker)
    client.loop_start()
    try:
        infos = [client.publish(topic, telemetry(seq, {"temperature": float(seq)}), qos=1)
                 for seq in range(1, n + 1)]
        for info in infos:
            info.wait_for_publish(30)
        return sum(1 for info in infos if info.is_published())
    finally:
        client.loop_stop()
        client.disconnect()


async def test_a_burst_read_in_chunks_reaches_a_client_with_a_small_queue(mosquitto, start_gateway):
    # The broker hands the gateway many messages per read; however many a chunk holds, the events
    # reach a client whose queue holds only 64 of them, in order, without closing it.
    gw = await start_gateway(mosquitto, **{"ws.queue_size": 64})
    n = 800  # within what a broker with default settings queues for a subscriber (1000)
    events: list[dict] = []
    async with aiohttp.ClientSession() as http, http.ws_connect(gw.url + "/api/v1/ws", headers=auth()) as ws:
        await ws.send_json({"action": "subscribe"})
        assert (await ws.receive_json(timeout=5))["event"] == "Subscribed"
        reader = asyncio.create_task(collect(ws, events))
        sent = await asyncio.to_thread(_publish_burst, mosquitto, f"openegiz/{gw.site}/oven/oven-001/thermal/telemetry",
                                       n)
        assert sent == n
        await wait_for(lambda: gw.service.ingest.accepted_messages == n, timeout=60)
        await wait_for(lambda: len([e for e in events if e["event"] == "StateChanged"]) == n, timeout=30)
        await ws.close()
        await reader
    assert gw.service.metrics.ws_disconnected_slow._value.get() == 0
    temps = [e["properties"]["temperature"] for e in events if e["event"] == "StateChanged"]
    assert temps == [float(seq) for seq in range(1, n + 1)]
    # Every message was committed and acknowledged: nothing is pending, nothing was seen twice.
    await wait_for(lambda: gw.service.buffer.pending_points == 0)
    assert gw.service.metrics.duplicates._value.get() == 0
