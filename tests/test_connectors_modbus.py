"""Modbus devices end to end against pymodbus's own server: values with every data type, scaling and
byte/word order land in the twin and the history; coalesced reads counted at the server; a server
killed and restarted; a slow device beside a fast one; hot reload over REST; a write round trip; bad
configuration named at start."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.broker import find_free_port
from gateway.sim.modbus_plc import ModbusPlcServer, RegisterMemory
from tests.helpers import (
    OPERATOR_KEY,
    VIEWER_KEY,
    GatewayFactory,
    LinkedFactory,
    RunningGateway,
    auth,
    open_gateway_toml,
    wait_for,
)

PlcFactory = Callable[..., Awaitable[ModbusPlcServer]]


@pytest.fixture
async def plc() -> AsyncIterator[PlcFactory]:
    """Start pymodbus servers on free ports; all are stopped at the end."""
    servers: list[ModbusPlcServer] = []

    async def start(memory: RegisterMemory | None = None, *, port: int = 0, **kw: Any) -> ModbusPlcServer:
        server = ModbusPlcServer({1: memory or RegisterMemory()}, port=port or find_free_port(), **kw)
        await server.start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        await s.stop()


def device(name: str, port: int, thing: str, tags: list[dict[str, Any]], **more: Any) -> dict[str, Any]:
    return {"name": name, "url": f"tcp://127.0.0.1:{port}", "thing": thing, "type": "oven", "tags": tags, **more}


def props(gw: RunningGateway, thing: str, feature: str) -> dict[str, Any]:
    t = gw.service.registry.get(gw.thing_id(thing))
    f = t.features.get(feature) if t is not None else None
    return dict(f.properties) if f is not None else {}


def words(fmt: str, value: Any, *, byte_order: str = "big", word_order: str = "big") -> list[int]:
    """The registers a device holding `value` sends, derived with struct (big-endian), then reordered."""
    raw = struct.pack(">" + fmt, value)
    regs = [raw[i : i + 2] for i in range(0, len(raw), 2)]
    if byte_order == "little":
        regs = [r[::-1] for r in regs]
    if word_order == "little":
        regs.reverse()
    return [int.from_bytes(r, "big") for r in regs]


# Every data type, each in all four byte/word orders where it has more than one byte, with a scale
# or offset on some: (datatype, struct format, raw value, scale, offset, stored value)
CASES = [
    ("int16", "h", -1234, 0.1, 0.0, -123.4),
    ("uint16", "H", 54321, 1.0, 0.0, 54321),
    ("int32", "i", -2_000_000_000, 1.0, 0.0, -2_000_000_000),
    ("uint32", "I", 4_000_000_000, 0.001, 0.0, 4_000_000.0),
    ("int64", "q", -9_000_000_000_000, 1.0, 0.0, -9_000_000_000_000),
    ("uint64", "Q", 18_000_000_000_000_000_000, 1.0, 0.0, 18_000_000_000_000_000_000),
    ("float32", "f", 123.5, 2.0, -7.0, 240.0),
    ("float64", "d", -0.000123456789, 1.0, 0.0, -0.000123456789),
]
ORDERS = [("big", "big"), ("big", "little"), ("little", "big"), ("little", "little")]


async def test_every_datatype_with_scaling_and_byte_order_lands_in_twin_and_history(
        mosquitto, start_gateway: GatewayFactory, plc: PlcFactory) -> None:
    mem = RegisterMemory()
    tags: list[dict[str, Any]] = []
    expected: dict[str, Any] = {}
    address = 0
    for dtype, fmt, raw, scale, offset, stored in CASES:
        for bo, wo in ORDERS:
            regs = words(fmt, raw, byte_order=bo, word_order=wo)
            mem.tables["holding"][address : address + len(regs)] = regs
            name = f"{dtype}_{bo[0]}{wo[0]}"
            tags.append({"feature": "values", "property": name, "address": address, "datatype": dtype,
                         "byte_order": bo, "word_order": wo, "scale": scale, "offset": offset})
            expected[name] = stored
            address += len(regs) + 3
    # a literal vector as well: 123.456 as float32 is 0x42F6E979, word-swapped on many PLCs
    mem.tables["input"][10:12] = [0xE979, 0x42F6]
    tags.append({"feature": "values", "property": "literal", "table": "input", "address": 10,
                 "datatype": "float32", "word_order": "little"})
    # a bit of a register, coils, discrete inputs, a string, unit conversion and a calculated tag
    mem.tables["holding"][500] = 0b1000_0000_0000_0100
    mem.set_bit("coil", 3, True)
    mem.set_bit("discrete", 17, True)
    mem.tables["holding"][510:513] = [int.from_bytes(b"OV", "big"), int.from_bytes(b"EN", "big"),
                                      int.from_bytes(b"7\0", "big")]
    mem.tables["holding"][520] = 4000  # 400.0 °F
    tags += [
        {"feature": "flags", "property": "door_open", "address": 500, "datatype": "bool", "bit": 2},
        {"feature": "flags", "property": "alarm", "address": 500, "datatype": "bool", "bit": 15},
        {"feature": "flags", "property": "heater", "address": 500, "datatype": "bool", "bit": 0},
        {"feature": "flags", "property": "fan", "table": "coil", "address": 3, "datatype": "bool"},
        {"feature": "flags", "property": "e_stop", "table": "discrete", "address": 17, "datatype": "bool"},
        {"feature": "info", "property": "recipe", "address": 510, "datatype": "string", "length": 3},
        {"feature": "thermal", "property": "temperature", "address": 520, "datatype": "uint16", "scale": 0.1,
         "unit": "degF", "to_unit": "degC"},
        {"feature": "thermal", "property": "temperature_k", "expression": "temperature + 273.15"},
    ]
    server = await plc(mem)
    gw = await start_gateway(mosquitto, **{"connectors.modbus": [
        device("oven-plc", server.port, "oven-101", tags, poll_s=0.2)]})
    tid = gw.thing_id("oven-101")
    await wait_for(lambda: props(gw, "oven-101", "thermal").get("temperature_k") is not None, 15)
    values = props(gw, "oven-101", "values")
    for name, want in expected.items():
        assert values[name] == pytest.approx(want, rel=1e-6), name
    assert values["literal"] == pytest.approx(123.456, rel=1e-6)
    assert props(gw, "oven-101", "flags") == {"door_open": True, "alarm": True, "heater": False, "fan": True,
                                                "e_stop": True}
    assert props(gw, "oven-101", "info") == {"recipe": "OVEN7"}
    thermal = props(gw, "oven-101", "thermal")
    assert thermal["temperature"] == pytest.approx(204.444444, abs=1e-5)  # (400 °F - 32) * 5/9
    assert thermal["temperature_k"] == pytest.approx(477.594444, abs=1e-5)
    thing = gw.service.registry.get(tid)
    assert thing is not None and thing.type == "oven" and thing.metadata["connector"]["device"] == "oven-plc"
    conn = props(gw, "oven-101", "connectivity")
    # holding 0-124 and 125-175 (the 125-register limit), 500, 510-520 (9 registers apart is more than
    # the default gap of 8, 7 is not); one each for input registers, coils, discrete inputs
    assert conn["state"] == "online" and conn["protocol"] == "modbus" and conn["requestsPerCycle"] == 7

    # the history holds the same values (through the buffer, like MQTT telemetry)
    await gw.service.buffer.flush()
    status, doc = await gw.get(f"/api/v1/things/{tid}/history?feature=values&property=float32_ll&resolution=raw")
    assert status == 200, doc
    (series,) = doc["series"]
    assert series["points"]["value"] and all(v == pytest.approx(240.0) for v in series["points"]["value"])
    status, doc = await gw.get(f"/api/v1/things/{tid}/history?feature=thermal&property=temperature&resolution=raw")
    assert doc["series"][0]["points"]["value"][-1] == pytest.approx(204.444444, abs=1e-5)

    # a changed register reaches the twin at the next poll, with a version step and StateChanged
    sub = gw.service.bus.subscribe("test")
    sub.watch(thing_ids=[tid])
    version = thing.version
    mem.tables["holding"][520] = 2120  # 212 °F
    await wait_for(lambda: props(gw, "oven-101", "thermal").get("temperature") == pytest.approx(100.0), 10)
    assert thing.version > version
    events = sub.drain()
    assert any(getattr(e, "feature", None) == "thermal" and e.payload().get("properties", {}).get("temperature")
               == pytest.approx(100.0) for e in events)
    sub.close()

    # /metrics carries the device's series
    async with gw.http.get(gw.url + "/metrics") as r:
        text = await r.text()
    assert 'egiz_connector_online{device="oven-plc"} 1.0' in text
    assert 'egiz_connector_polls_total{device="oven-plc",result="ok"}' in text


async def test_fifty_tags_are_read_in_at_most_three_requests(mosquitto, start_gateway: GatewayFactory,
                                                              plc: PlcFactory) -> None:
    mem = RegisterMemory()
    tags = []
    for i in range(50):  # near-contiguous: 2-register values with a 1-register gap, over ~150 registers
        address = i * 3
        mem.tables["holding"][address : address + 2] = words("f", float(i))
        tags.append({"feature": "zones", "property": f"t{i}", "address": address, "datatype": "float32"})
    server = await plc(mem)
    gw = await start_gateway(mosquitto, **{"connectors.modbus": [device("big", server.port, "oven-9", tags,
                                                                        poll_s=0.1)]})
    runner = gw.service.connectors.runner("big")
    assert runner is not None
    await wait_for(lambda: runner.cycles >= 3, 15)
    before_cycles, before_requests = runner.cycles, server.requests[1]
    await wait_for(lambda: runner.cycles >= before_cycles + 10, 15)
    # the count is taken at the server; a cycle in flight may add at most its own requests
    cycles = runner.cycles - before_cycles
    per_cycle = (server.requests[1] - before_requests) / cycles
    assert per_cycle <= 3.0 + 3.0 / cycles, per_cycle
    assert props(gw, "oven-9", "zones") == {f"t{i}": float(i) for i in range(50)}
    assert props(gw, "oven-9", "connectivity")["requestsPerCycle"] == 2  # 150 registers: 125 + 25


async def test_server_killed_and_restarted_goes_offline_with_the_reason_and_back_within_two_polls(
        mosquitto, start_gateway: GatewayFactory, plc: PlcFactory) -> None:
    mem = RegisterMemory()
    mem.tables["holding"][0] = 42
    server = await plc(mem)
    poll = 0.5
    gw = await start_gateway(mosquitto, **{"connectors.modbus": [device(
        "flaky", server.port, "oven-3", [{"feature": "thermal", "property": "x", "address": 0}], poll_s=poll,
        timeout_s=0.5)]})
    await wait_for(lambda: props(gw, "oven-3", "connectivity").get("state") == "online", 10)
    await server.stop()
    await wait_for(lambda: props(gw, "oven-3", "connectivity").get("state") == "offline", 10)
    conn = props(gw, "oven-3", "connectivity")
    assert conn["lastError"], conn  # the reason is shown
    await asyncio.sleep(poll * 8)  # long enough for the breaker to open (5 failures)
    assert props(gw, "oven-3", "connectivity")["breaker"] == "open"
    mem.tables["holding"][0] = 43
    restarted = ModbusPlcServer({1: mem}, port=server.port)
    await restarted.start()
    t0 = time.monotonic()
    try:
        await wait_for(lambda: props(gw, "oven-3", "connectivity").get("state") == "online", 10)
        back_in = time.monotonic() - t0
        assert back_in <= 2 * poll + 0.5, back_in  # twice the poll interval, with a margin for a busy machine
        await wait_for(lambda: props(gw, "oven-3", "thermal").get("x") == 43, 5)
        assert props(gw, "oven-3", "connectivity")["breaker"] == "closed"
    finally:
        await restarted.stop()
    async with gw.http.get(gw.url + "/metrics") as r:
        text = await r.text()
    assert 'egiz_connector_errors_total{device="flaky",reason="connect_failed"}' in text


async def test_a_slow_device_does_not_delay_the_others(mosquitto, start_gateway: GatewayFactory,
                                                       plc: PlcFactory) -> None:
    slow = await plc(delay_s=1.5)
    fast = await plc()
    tag = [{"feature": "thermal", "property": "x", "address": 0}]
    gw = await start_gateway(mosquitto, **{"connectors.modbus": [
        device("slow", slow.port, "oven-slow", tag, poll_s=0.1, timeout_s=3.0),
        device("fast", fast.port, "oven-fast", tag, poll_s=0.1)]})
    fast_runner = gw.service.connectors.runner("fast")
    slow_runner = gw.service.connectors.runner("slow")
    assert fast_runner is not None and slow_runner is not None
    await wait_for(lambda: fast_runner.cycles >= 1 and slow_runner.cycles >= 1, 15)
    c0, t0 = fast_runner.cycles, time.monotonic()
    await asyncio.sleep(3.0)
    rate = (fast_runner.cycles - c0) / (time.monotonic() - t0)
    assert rate >= 5, rate  # 10/s nominal; a slow neighbour (1.5 s per request) must not pull it down
    assert slow_runner.cycles <= 4


async def test_hot_reload_over_rest_while_others_keep_polling(mosquitto, start_gateway: GatewayFactory,
                                                              plc: PlcFactory, tmp_path: Path) -> None:
    mem = RegisterMemory()
    mem.tables["holding"][0:2] = [7, 9]
    server = await plc(mem)
    tag0 = [{"feature": "thermal", "property": "a", "address": 0}]
    gw = await start_gateway(mosquitto, **{"connectors.modbus": [device("steady", server.port, "oven-1", tag0,
                                                                         poll_s=0.1)]})
    steady = gw.service.connectors.runner("steady")
    assert steady is not None
    await wait_for(lambda: steady.cycles >= 2, 10)

    # operators read, only admins change
    status, doc = await gw.get("/api/v1/connectors/devices", key=OPERATOR_KEY)
    assert status == 200 and [d["name"] for d in doc["items"]] == ["steady"]
    assert doc["items"][0]["source"] == "config" and doc["items"][0]["health"]["state"] == "online"
    status, _ = await gw.get("/api/v1/connectors/devices", key=VIEWER_KEY)
    assert status == 403
    new = {"protocol": "modbus", **device("added", server.port, "oven-2",
                                          [{"feature": "thermal", "property": "b", "address": 1}], poll_s=0.1)}
    status, _ = await gw.send("POST", "/api/v1/connectors/devices", new, key=OPERATOR_KEY)
    assert status == 403

    cycles_before = steady.cycles
    status, doc = await gw.send("POST", "/api/v1/connectors/devices", new)
    assert status == 201, doc
    await wait_for(lambda: props(gw, "oven-2", "thermal").get("b") == 9, 10)
    # change it: another register and a scale; only its own runner restarts
    changed = {**new, "tags": [{"feature": "thermal", "property": "b", "address": 0, "scale": 10}]}
    status, doc = await gw.send("PUT", "/api/v1/connectors/devices/added", changed)
    assert status == 200, doc
    await wait_for(lambda: props(gw, "oven-2", "thermal").get("b") == 70, 10)
    assert gw.service.connectors.runner("steady") is steady  # untouched
    assert steady.cycles > cycles_before

    # a bad device is refused naming the key; the configured one cannot be changed over REST
    bad = {**new, "name": "bad", "thing": "oven-x", "unit": 999, "tags": [{"feature": "t", "property": "p",
                                                                           "address": 0, "datatype": "int17"}]}
    status, doc = await gw.send("POST", "/api/v1/connectors/devices", bad)
    assert status == 400 and "unit: must be 0..255" in doc["detail"] and "tags[0].datatype" in doc["detail"]
    status, doc = await gw.send("PUT", "/api/v1/connectors/devices/steady", {**new, "name": "steady"})
    assert status == 409

    # register-map import adds tags
    csv_text = "address,name,type,scale,unit\n0,thermal.c,int16,0.5,degC\n"
    async with gw.http.post(gw.url + "/api/v1/connectors/devices/added/register-map", data=csv_text,
                            headers={"Authorization": "Bearer test-admin-key-000000000001",
                                     "Content-Type": "text/csv"}) as r:
        assert r.status == 200, await r.text()
    await wait_for(lambda: props(gw, "oven-2", "thermal").get("c") == 3.5, 10)

    # persisted: a restarted gateway runs the added device again
    config = gw.config
    await gw.http.close()
    await gw.service.stop()
    gw2 = await start_gateway(mosquitto, config=config)
    status, doc = await gw2.get("/api/v1/connectors/devices")
    assert sorted(d["name"] for d in doc["items"]) == ["added", "steady"]
    status, _ = await gw2.send("DELETE", "/api/v1/connectors/devices/added")
    assert status == 204
    assert gw2.service.connectors.runner("added") is None
    status, _ = await gw2.get("/api/v1/connectors/devices/added")
    assert status == 404


async def test_write_round_trip_and_refusals(mosquitto, start_gateway: GatewayFactory, plc: PlcFactory) -> None:
    mem = RegisterMemory()
    struct_words = words("f", 180.0)
    mem.tables["holding"][100:102] = struct_words
    mem.tables["holding"][102] = 1800
    server = await plc(mem)
    tags = [  # the minimal form of the documentation
        {"feature": "thermal", "property": "temperature", "table": "holding", "address": 100, "datatype": "float32",
         "unit": "degC"},
        {"feature": "thermal", "property": "setpoint", "table": "holding", "address": 102, "datatype": "int16",
         "scale": 0.1, "unit": "degC", "writable": True, "min": 0, "max": 250},
        {"feature": "thermal", "property": "fan", "table": "coil", "address": 0, "datatype": "bool",
         "writable": True},
    ]
    gw = await start_gateway(mosquitto, **{"connectors.modbus": [device("oven-plc", server.port, "oven-101", tags,
                                                                        poll_s=0.2)]})
    tid = gw.thing_id("oven-101")
    await wait_for(lambda: props(gw, "oven-101", "thermal").get("setpoint") == 180.0, 10)
    path = f"/api/v1/things/{tid}/features/thermal"
    status, doc = await gw.send("PUT", path, {"desiredProperties": {"setpoint": 185.5, "fan": True}},
                                key=OPERATOR_KEY)
    assert status == 200, doc
    assert doc["command"]["status"] == "ok" and doc["command"]["readBack"] == {"setpoint": 185.5, "fan": True}
    assert mem.tables["holding"][102] == 1855 and mem.bit("coil", 0) is True  # inverse scaling at the device
    thing = gw.service.registry.get(tid)
    assert thing is not None
    assert thing.features["thermal"].properties["setpoint"] == 185.5
    assert "setpoint" not in thing.features["thermal"].desired  # acknowledged
    assert thing.features["commands"].properties["last"]["status"] == "ok"

    version = thing.version
    for desired, reason in (({"temperature": 10.0}, "read-only"), ({"setpoint": 400}, "within"),
                            ({"nothing": 1}, "no writable tag"), ({"setpoint": "hot"}, "number")):
        status, doc = await gw.send("PUT", path, {"desiredProperties": desired}, key=OPERATOR_KEY)
        assert status == 422 and reason in doc["detail"], (desired, doc)
    assert mem.tables["holding"][102] == 1855
    assert "temperature" not in thing.features["thermal"].desired and thing.version >= version

    # the device gone: a clear 503, the command recorded as failed
    await server.stop()
    await wait_for(lambda: props(gw, "oven-101", "connectivity").get("state") == "offline", 10)
    status, doc = await gw.send("PUT", path, {"desiredProperties": {"setpoint": 190}}, key=OPERATOR_KEY)
    assert status == 503 and doc["error"] == "device_unavailable"
    assert thing.features["commands"].properties["last"]["status"] == "error"


def test_bad_connector_config_is_named_at_start(tmp_path: Path) -> None:
    import os
    import subprocess

    from tests.helpers import EGIZ

    (tmp_path / "map.csv").write_text("address,name,type,scale\n1,thermal.t,real,x\n")
    path = tmp_path / "bad.toml"
    path.write_text(open_gateway_toml(tmp_path) + f"""
[[connectors.modbus]]
name = "oven-plc"
url = "tcp//127.0.0.1:5020"
unit = 1
poll_s = 1.0
thing = "oven-101"
type = "oven"
register_map = "{tmp_path / 'map.csv'}"
tags = [
  {{ feature = "thermal", property = "temperature", table = "holding", address = 100, datatype = "float33" }},
  {{ feature = "thermal", property = "setpoint", table = "input", address = 102, writable = true, colour = 1 }},
  {{ feature = "thermal", property = "f", unit = "degF", to_unit = "bar", address = 1 }},
  {{ feature = "thermal", property = "k", expression = "__import__('os').system('x')" }},
]
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EGIZ_")}
    result = subprocess.run([str(EGIZ), "gateway", "run", "--config", str(path)], capture_output=True, text=True,
                            timeout=60, env=env, check=False)
    assert result.returncode == 2, result.stderr
    err = result.stderr
    for needle in ("connectors.modbus[0].url: must start with tcp://",
                   "connectors.modbus[0].tags[0].datatype: must be one of",
                   "connectors.modbus[0].tags[1].colour: unknown key",
                   "connectors.modbus[0].tags[1].writable: input tables are read-only",
                   "connectors.modbus[0].tags[2].to_unit: cannot convert degF to bar",
                   "connectors.modbus[0].tags[3].expression: only these functions",
                   "connectors.modbus[0].register_map: map.csv line 2.scale: must be a number"):
        assert needle in err, (needle, err)
    assert "Traceback" not in err


async def test_minimal_documented_form_loads_exactly_as_written(tmp_path: Path) -> None:
    from gateway.config import GatewayConfig, load_config

    text = (Path(__file__).parent.parent / "docs" / "connectors.md").read_text()
    start = text.index("```toml\n[[connectors.modbus]]")
    block = text[start + len("```toml\n") : text.index("```", start + 8)]
    path = tmp_path / "g.toml"
    path.write_text('[gateway]\nsite = "s1"\nline = "l1"\nid = "g1"\n[auth]\nopen = true\n' + block)
    cfg = load_config(GatewayConfig, path, environ={})
    (modbus,) = cfg.connectors.modbus
    assert (modbus.name, modbus.url, modbus.unit, modbus.thing, modbus.type) == (
        "oven-plc", "tcp://127.0.0.1:5020", 1, "oven-101", "oven")
    assert [t.property for t in modbus.tags] == ["temperature", "setpoint"]
    assert modbus.tags[1].scale == 0.1 and modbus.tags[1].writable
    (opcua,) = cfg.connectors.opcua
    assert opcua.tags[0].node == "ns=2;s=Proofer.Temperature"


async def test_plc_values_reach_the_aggregator_like_mqtt_telemetry(
        start_linked: LinkedFactory, plc: PlcFactory) -> None:
    mem = RegisterMemory()
    mem.tables["holding"][0:2] = words("f", 181.25, word_order="little")
    mem.tables["holding"][2] = 1905  # int16, scale 0.1
    server = await plc(mem)
    tags = [{"feature": "thermal", "property": "temperature", "address": 0, "datatype": "float32",
             "word_order": "little"},
            {"feature": "thermal", "property": "setpoint", "address": 2, "datatype": "int16", "scale": 0.1}]
    _site, agg, gw = await start_linked(**{"connectors.modbus": [
        device("oven-plc", server.port, "oven-101", tags, poll_s=0.2)]})
    tid = gw.thing_id("oven-101")
    await wait_for(lambda: agg.store.thing(tid) is not None, 20)
    async with aiohttp.ClientSession(headers=auth()) as http:
        q = f"/api/v1/things/{tid}/history?resolution=raw&feature=thermal&from={time.time() - 600}" \
            f"&to={time.time() + 60}"

        async def central() -> dict[str, Any]:
            async with http.get(f"http://127.0.0.1:{agg.http_port}{q}") as r:
                doc: dict[str, Any] = await r.json()
                return doc

        deadline = time.monotonic() + 20
        series: dict[str, list[Any]] = {}
        while time.monotonic() < deadline and len(series) < 2:
            doc = await central()  # 404 until the first batch is in
            series = {s["property"]: s["points"]["value"] for s in doc.get("series", [])}
            await asyncio.sleep(0.2)
    assert series["temperature"] and all(v == pytest.approx(181.25) for v in series["temperature"])
    assert series["setpoint"] and all(v == pytest.approx(190.5) for v in series["setpoint"])
