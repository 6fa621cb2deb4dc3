"""`egiz sim --plc modbus`: the simulator's equipment models behind pymodbus's server, read by a real
gateway from the tables the simulator prints; a setpoint written over REST reaches the model; a fault
shows in the values and in the ground truth."""

from __future__ import annotations

import asyncio
import json
import tomllib
from pathlib import Path

from gateway.broker import find_free_port
from gateway.sim.faults import parse_faults
from gateway.sim.plc import PlcLine, PlcOptions, gateway_toml
from tests.helpers import OPERATOR_KEY, GatewayFactory, wait_for


async def test_simulated_plcs_feed_a_gateway_and_take_setpoints(mosquitto, start_gateway: GatewayFactory,
                                                                 tmp_path: Path) -> None:
    truth = tmp_path / "truth.jsonl"
    opts = PlcOptions(site="sim", nodes=2, types=("oven", "proofer"), rate_hz=5.0, port=find_free_port(), seed=7,
                      faults=parse_faults("overtemperature:oven-001@0+600"), truth_path=truth)
    line = PlcLine(opts)
    stop = asyncio.Event()
    ready = asyncio.Event()
    task = asyncio.create_task(line.run(stop, on_ready=lambda _: ready.set()))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        devices = tomllib.loads(gateway_toml(line, poll_s=0.2))["connectors"]["modbus"]
        assert [d["thing"] for d in devices] == ["oven-001", "proofer-002"]
        gw = await start_gateway(mosquitto, **{"connectors.modbus": devices})
        oven = gw.service.registry.get  # the Things appear with the simulator's values

        def thermal() -> dict[str, float]:
            t = oven(gw.thing_id("oven-001"))
            return dict(t.features["thermal"].properties) if t is not None and "thermal" in t.features else {}

        await wait_for(lambda: "temperature_zones_1" in thermal() and "setpoint" in thermal(), 15)
        model = line.by_id["oven-001"].model
        assert thermal()["setpoint"] == model.setpoint == 190.0  # type: ignore[attr-defined]
        # the fault heats the zones past the setpoint (the ramp takes up to a minute; a few degrees suffice)
        await wait_for(lambda: thermal()["temperature_zones_1"] > 0, 5)

        status, doc = await gw.send("PUT", f"/api/v1/things/{gw.thing_id('oven-001')}/features/thermal",
                                    {"desiredProperties": {"setpoint": 210.0}}, key=OPERATOR_KEY)
        assert status == 200, doc
        await wait_for(lambda: model.setpoint == 210.0, 5)  # type: ignore[attr-defined]
        await wait_for(lambda: thermal()["setpoint"] == 210.0, 5)
        climate = gw.service.registry.get(gw.thing_id("proofer-002"))
        assert climate is not None and "humidity" in climate.features["climate"].properties
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    (record,) = [json.loads(x) for x in truth.read_text().splitlines()]
    assert record["thing"] == "sim:oven-001" and record["fault"] == "overtemperature"
    assert record["feature"] == "thermal" and record["property"].startswith("temperature_zones_")
