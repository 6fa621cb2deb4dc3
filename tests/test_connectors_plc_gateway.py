"""OPC UA and S7 devices in a running gateway, against asyncua's and python-snap7's own servers:
values land in the twin and the history with their types; Bad and Uncertain values are never stored
as good; a PLC stopped mid-run shows offline with the reason and is read again within two poll
intervals of its return, without a restart of the gateway; a desired property is written to the
PLC and read back."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua

from gateway.common.errors import ConfigError
from gateway.config import GatewayConfig, load_config
from gateway.demo import proofer_tags
from gateway.sim.plc_image import POINTS
from gateway.sim.plc_opcua import OpcUaPlc, OpcUaServe
from gateway.sim.plc_s7 import HEATER, LAYOUT, S7Plc
from tests.helpers import GatewayFactory, RunningGateway, open_gateway_toml, wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def props(gw: RunningGateway, thing: str, feature: str) -> dict[str, Any]:
    t = gw.service.registry.get(gw.thing_id(thing))
    f = t.features.get(feature) if t is not None else None
    return dict(f.properties) if f is not None else {}


async def history(gw: RunningGateway, thing: str, feature: str, prop: str) -> list[Any]:
    await gw.service.buffer.flush()
    status, doc = await gw.get(f"/api/v1/things/{gw.thing_id(thing)}/history?feature={feature}&property={prop}"
                               "&resolution=raw")
    assert status == 200, doc
    return list(doc["series"][0]["points"]["value"]) if doc["series"] else []


async def setpoint_written(gw: RunningGateway, plc: OpcUaPlc | S7Plc, thing: str, feature: str, value: float) -> None:
    """A desired `setpoint` is written to the PLC, read back and acknowledged into the twin."""
    status, body = await gw.send("PUT", f"/api/v1/things/{gw.thing_id(thing)}/features/{feature}",
                                 {"desiredProperties": {"setpoint": value}})
    assert status in (200, 202), body
    await wait_for(lambda: props(gw, thing, feature).get("setpoint") == value, 10)
    assert (await plc.written())["Setpoint"] == value


async def goes_offline(gw: RunningGateway, plc: OpcUaPlc | S7Plc, thing: str) -> None:
    """The PLC stops: its Thing goes offline, saying why."""
    await plc.stop()
    await wait_for(lambda: props(gw, thing, "connectivity").get("state") == "offline", 15)
    assert props(gw, thing, "connectivity")["lastError"]


async def test_opcua_proofer_into_twin_and_history_with_quality_offline_and_back(
        mosquitto: tuple[str, int], start_gateway: GatewayFactory) -> None:
    plc = OpcUaPlc(OpcUaServe(port=free_port()), "proofer", POINTS["proofer"])
    await plc.start()
    try:
        stamp = time.time() - 5.0
        await plc.publish({"Temperature": 35.5, "Humidity": 78.25, "Setpoint": 36.0, "Running": True,
                           "BatchCount": 12}, stamp)
        poll = 0.5
        gw = await start_gateway(mosquitto, **{"connectors.opcua": [{
            "name": "proofer-plc", "url": plc.serve.url, "thing": "proofer-201", "type": "proofer",
            "poll_s": poll, "timeout_s": 2.0, "publishing_ms": 100, "tags": proofer_tags(f"ns={plc.ns};s=Proofer.")}]})
        await wait_for(lambda: props(gw, "proofer-201", "state").get("batch_count") == 12, 30)
        climate = props(gw, "proofer-201", "climate")
        assert climate == {"temperature": 35.5, "humidity": 78.25, "setpoint": 36.0}
        state = props(gw, "proofer-201", "state")
        assert state["running"] is True and isinstance(state["batch_count"], int)
        # subscribed values may land before the first liveness read reports the device online
        await wait_for(lambda: props(gw, "proofer-201", "connectivity").get("state") == "online", 10)
        assert props(gw, "proofer-201", "connectivity")["protocol"] == "opcua"
        assert await history(gw, "proofer-201", "climate", "temperature") == [35.5]
        status, doc = await gw.get(f"/api/v1/things/{gw.thing_id('proofer-201')}/history?feature=climate"
                                   "&property=temperature&resolution=raw")
        assert status == 200, doc
        assert doc["series"][0]["points"]["t"][0] / 1000 == pytest.approx(stamp, abs=0.01)  # SourceTimestamp

        # a failed sensor: no value stored, the quality says why; an uncertain one is flagged
        await plc.set_status("Temperature", ua.StatusCodes.BadSensorFailure, 999.0)
        await plc.set_status("Humidity", ua.StatusCodes.UncertainSensorNotAccurate, 79.5)
        await wait_for(lambda: props(gw, "proofer-201", "climate").get("humidity_quality") == "uncertain", 10)
        await wait_for(lambda: props(gw, "proofer-201", "climate").get("temperature_quality") == "bad", 10)
        climate = props(gw, "proofer-201", "climate")
        assert climate["temperature"] == 35.5 and climate["humidity"] == 79.5  # 999.0 never became a value
        assert 999.0 not in await history(gw, "proofer-201", "climate", "temperature")
        await plc.publish({"Temperature": 34.0, "Humidity": 77.0}, time.time())
        await wait_for(lambda: props(gw, "proofer-201", "climate").get("temperature_quality") == "good", 10)
        assert props(gw, "proofer-201", "climate")["temperature"] == 34.0

        # a desired property is written to the node, read back and acknowledged into the twin
        await setpoint_written(gw, plc, "proofer-201", "climate", 38.5)

        # the PLC goes away: offline with the reason; back within two poll intervals of its return
        await goes_offline(gw, plc, "proofer-201")
        await asyncio.sleep(poll * 3)
        await plc.start()
        t0 = time.monotonic()
        await wait_for(lambda: props(gw, "proofer-201", "connectivity").get("state") == "online", 15)
        back_in = time.monotonic() - t0
        await plc.publish({"Temperature": 33.0}, time.time())
        await wait_for(lambda: props(gw, "proofer-201", "climate").get("temperature") == 33.0, 10)
        assert back_in <= 2 * poll + 1.5, back_in  # the margin: an OPC UA session takes a moment on a busy machine
    finally:
        await plc.stop()


async def test_s7_oven_into_twin_and_history_offline_and_back(
        mosquitto: tuple[str, int], start_gateway: GatewayFactory) -> None:
    port = free_port()
    plc = S7Plc("oven", POINTS["oven"], port=port)
    await plc.start()
    layout = LAYOUT["oven"]
    await plc.publish({"Zone1.Temperature": 187.5, "Zone2.Temperature": 190.25, "Zone3.Temperature": 192.0,
                       "Setpoint": 190.0, "Voltage.L1": 230.5, "Power": 12.5, "BatchCount": 4, "Running": True},
                      time.time())

    def s7(feature: str, prop: str, point: str, **kw: Any) -> dict[str, Any]:
        a = layout[point]
        tag = {"feature": feature, "property": prop, "area": a.area, "byte": a.byte, "datatype": a.datatype, **kw}
        return tag | ({"db": 1} if a.area == "DB" else {"bit": a.bit} if a.datatype == "BOOL" else {})

    poll = 0.5
    try:
        gw = await start_gateway(mosquitto, **{"connectors.s7": [{
            "name": "oven-s7", "url": f"s7://127.0.0.1:{port}", "thing": "oven-102", "type": "oven",
            "poll_s": poll, "timeout_s": 1.0,
            "tags": [
                s7("thermal", "zone1", "Zone1.Temperature", unit="degC"),
                s7("thermal", "zone2", "Zone2.Temperature", unit="degC", to_unit="degF"),
                s7("thermal", "setpoint", "Setpoint", unit="degC", writable=True, min=50, max=300),
                s7("electrical", "voltage_l1", "Voltage.L1", unit="V"),
                s7("electrical", "power", "Power", unit="kW"),
                s7("state", "batch_count", "BatchCount"),
                s7("state", "running", "Running"),
                {"feature": "state", "property": "heater", "area": "Q", "byte": HEATER.byte, "bit": HEATER.bit,
                 "datatype": "BOOL"},
                {"feature": "state", "property": "status", "area": "M", "byte": 10, "datatype": "INT"},
            ]}]})
        await wait_for(lambda: props(gw, "oven-102", "state").get("batch_count") == 4, 20)
        thermal = props(gw, "oven-102", "thermal")
        assert thermal["zone1"] == 187.5 and thermal["setpoint"] == 190.0
        assert thermal["zone2"] == pytest.approx(374.45, abs=1e-3)  # 190.25 °C in °F
        assert props(gw, "oven-102", "state") == {"batch_count": 4, "running": True, "heater": False, "status": 1}
        conn = props(gw, "oven-102", "connectivity")
        assert conn["state"] == "online" and conn["protocol"] == "s7"
        assert conn["requestsPerCycle"] == 1  # DB, I, Q and M in one packed read
        assert (await history(gw, "oven-102", "electrical", "voltage_l1"))[0] == 230.5

        await setpoint_written(gw, plc, "oven-102", "thermal", 210.0)

        await goes_offline(gw, plc, "oven-102")
        await asyncio.sleep(poll * 3)
        plc.put(layout["Zone1.Temperature"], 188.0)
        await plc.start()
        t0 = time.monotonic()
        await wait_for(lambda: props(gw, "oven-102", "connectivity").get("state") == "online", 15)
        back_in = time.monotonic() - t0
        await wait_for(lambda: props(gw, "oven-102", "thermal").get("zone1") == 188.0, 10)
        assert back_in <= 2 * poll + 0.5, back_in

        # hot reload over REST: another S7 device joins while the first keeps polling
        first = gw.service.connectors.runner("oven-s7")
        assert first is not None
        cycles = first.cycles
        status, doc = await gw.send("POST", "/api/v1/connectors/devices", {
            "protocol": "s7", "name": "oven-s7-b", "url": f"s7://127.0.0.1:{port}", "thing": "oven-103",
            "type": "oven", "poll_s": poll, "tags": [s7("thermal", "zone3", "Zone3.Temperature")]})
        assert status == 201, doc
        await wait_for(lambda: props(gw, "oven-103", "thermal").get("zone3") == 192.0, 10)
        await wait_for(lambda: first.cycles > cycles + 1, 10)  # the first device was never restarted
        assert gw.service.connectors.runner("oven-s7") is first
        # an OPC UA device's password is taken, never given back
        status, doc = await gw.send("POST", "/api/v1/connectors/devices", {
            "protocol": "opcua", "name": "proofer-ua", "url": f"opc.tcp://127.0.0.1:{free_port()}",
            "thing": "proofer-209", "username": "egiz", "password": "s3cret-pw", "enabled": False,
            "tags": [{"feature": "climate", "property": "t", "node": "ns=2;s=Proofer.Temperature"}]})
        assert status == 201 and doc["password"] == "***", doc
        status, listing = await gw.get("/api/v1/connectors/devices")
        assert status == 200 and "s3cret-pw" not in json.dumps(listing)
        status, _ = await gw.send("DELETE", "/api/v1/connectors/devices/oven-s7-b")
        assert status == 204 and gw.service.connectors.runner("oven-s7-b") is None
    finally:
        await plc.stop()


def test_bad_opcua_and_s7_config_is_named_key_by_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(open_gateway_toml(tmp_path) + f"""
[[connectors.opcua]]
name = "proofer-plc"
url = "http://127.0.0.1:4840"
thing = "proofer-201"
security_policy = "Basic256Sha256"
security_mode = "None"
username = "egiz"
auth = "certificate"
server_certificate = "{tmp_path / 'missing.der'}"
tags = [
  {{ feature = "climate", property = "temperature" }},
  {{ feature = "climate", property = "humidity", node = "ns=2;s=H", queue_size = 0, colour = "red" }},
]
[[connectors.s7]]
name = "oven-s7"
url = "s7:/10.0.0.1"
rack = 9
thing = "oven-102"
tags = [
  {{ feature = "thermal", property = "zone1", area = "DB", db = 0, byte = -1, datatype = "REAL" }},
  {{ feature = "thermal", property = "ok", area = "X", byte = 0, bit = 9, datatype = "FLOAT" }},
  {{ feature = "info", property = "recipe", area = "DB", db = 1, byte = 40, datatype = "STRING" }},
]
""")
    with pytest.raises(ConfigError) as bad:
        load_config(GatewayConfig, path, environ={})
    keys = {key: msg for key, msg in bad.value.problems}
    for key, words in {
        "connectors.opcua[0].url": "opc.tcp://",
        "connectors.opcua[0].security_mode": "Sign or SignAndEncrypt",
        "connectors.opcua[0].password": "together",
        "connectors.opcua[0].username": "certificate login takes no username",
        "connectors.opcua[0].server_certificate": "no such file",
        "connectors.opcua[0].tags[0].node": "node id",
        "connectors.opcua[0].tags[1].colour": "unknown key",
        "connectors.s7[0].url": "s7://host",
        "connectors.s7[0].rack": "0..7",
        "connectors.s7[0].tags[2].length": "STRING needs length",
        "connectors.s7[0].tags[1].area": "",
        "connectors.s7[0].tags[1].datatype": "",
    }.items():
        assert key in keys and words in keys[key], (key, keys)
