"""Simulator → broker → gateway → REST, end to end; and a broker restart mid-stream loses nothing."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest

from gateway.broker import BrokerSettings, find_free_port
from gateway.sim import FleetOptions, fleet_things, parse_faults, run_fleet
from tests.helpers import EGIZ, GatewayFactory, need_mosquitto, private_mosquitto, wait_for


async def test_simulated_line_reaches_the_twin_exactly(mosquitto, start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(mosquitto)
    opts = FleetOptions(site=gw.site, nodes=10, rate_hz=10, duration_s=3, seed=7, host=mosquitto[0],
                        port=mosquitto[1], context_every_s=1.0)
    last: dict[tuple[str, str], dict] = {}
    async with aiomqtt.Client(*mosquitto) as spy:
        await spy.subscribe(f"openegiz/{gw.site}/+/+/+/telemetry", qos=1)

        async def watch() -> None:
            async for msg in spy.messages:
                parts = msg.topic.value.split("/")
                last[(parts[3], parts[4])] = json.loads(msg.payload)["properties"]  # type: ignore[arg-type]

        watcher = asyncio.create_task(watch())
        stats = await run_fleet(opts)
        ingest = gw.service.ingest
        expected = sum(stats.last_seq.values())
        await wait_for(lambda: ingest.accepted_messages == expected)
        await asyncio.sleep(0.3)
        watcher.cancel()
    assert stats.dropped == 0
    assert stats.confirmed == expected + 2 * opts.nodes  # telemetry, plus an online and an offline status each
    _, page = await gw.get("/api/v1/things?limit=100")
    assert page["total"] == 10
    types = {t["id"]: t["type"] for t in page["items"]}
    for eid, etype in fleet_things(opts):
        tid = gw.thing_id(eid)
        assert types[tid] == etype
        _, thing = await gw.get(f"/api/v1/things/{tid}")
        for (teid, feature), props in last.items():
            if teid == eid:
                assert thing["features"][feature]["properties"] == props, (tid, feature)
        assert thing["features"]["connectivity"]["properties"]["state"] == "offline"  # clean stop
    assert gw.service.metrics.gaps._value.get() == 0
    assert gw.service.metrics.duplicates._value.get() == 0


async def test_broker_restart_mid_stream_loses_no_qos1_message(tmp_path: Path, start_gateway: GatewayFactory) -> None:
    broker = private_mosquitto(tmp_path)
    await broker.start()
    try:
        gw = await start_gateway(("127.0.0.1", broker.port))
        opts = FleetOptions(site=gw.site, nodes=20, rate_hz=20, duration_s=6, seed=3, port=broker.port)
        fleet = asyncio.create_task(run_fleet(opts))
        await asyncio.sleep(2)
        await broker.restart()  # the gateway and all 20 nodes lose their connections mid-stream
        await asyncio.sleep(1.5)
        await broker.restart()  # and once more
        stats = await fleet
        ingest = gw.service.ingest
        published = sum(stats.last_seq.values())
        await wait_for(lambda: ingest.accepted_messages == published, timeout=30)
        assert stats.dropped == 0
        assert stats.reconnects >= 20
        m = gw.service.metrics
        assert m.gaps._value.get() == 0, "a seq gap means a message was lost"
        for eid, _ in fleet_things(opts):
            newest = gw.service.sequences.newest(gw.thing_id(eid))
            assert newest is not None and newest[1] == stats.last_seq[eid]
        assert m.mqtt_reconnects._value.get() >= 1
    finally:
        await broker.stop()


async def test_fault_ground_truth_and_last_will(mosquitto, start_gateway: GatewayFactory, tmp_path: Path) -> None:
    gw = await start_gateway(mosquitto)
    truth = tmp_path / "truth.jsonl"
    opts = FleetOptions(site=gw.site, nodes=5, rate_hz=10, duration_s=3, seed=1, host=mosquitto[0],
                        port=mosquitto[1], truth_path=truth,
                        faults=parse_faults("overtemperature:oven-001@0.5+1,dropout:conveyor-003@0.5+1.5"))
    states: list[str] = []

    async def watch_connectivity() -> None:
        while True:
            thing = gw.service.registry.get(gw.thing_id("conveyor-003"))
            if thing and "connectivity" in thing.features:
                state = thing.features["connectivity"].properties["state"]
                if not states or states[-1] != state:
                    states.append(state)
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch_connectivity())
    stats = await run_fleet(opts)
    await asyncio.sleep(0.3)
    watcher.cancel()
    assert states[:3] == ["online", "offline", "online"], states  # the Last Will fired, then it came back
    lines = [json.loads(x) for x in truth.read_text().splitlines()]
    assert {(x["thing"], x["fault"]) for x in lines} == {(gw.thing_id("oven-001"), "overtemperature"),
                                                        (gw.thing_id("conveyor-003"), "dropout")}
    for x in lines:
        assert x["start"] < x["end"] <= time.time()
    assert stats.reconnects == 0  # a dropout is not a broker problem
    oven = gw.service.registry.get(gw.thing_id("oven-001"))
    assert oven is not None and oven.features["thermal"].properties["setpoint"] == 190.0


def test_fault_spec_errors_name_the_item() -> None:
    assert parse_faults("") == ()
    specs = parse_faults("drift:oven-001@10+30, random:2")
    assert specs[0].kind == "drift" and specs[0].start_s == 10 and specs[0].end_s == 40
    for bad in ("drift:oven-001", "melt:oven-001@1", "drift:@1", "random:x", "drift:oven-001@1+0"):
        with pytest.raises(ValueError, match="fault"):
            parse_faults(bad)


async def test_demo_command_runs_a_line_and_stops_cleanly(tmp_path: Path) -> None:
    need_mosquitto()
    port = find_free_port()
    proc = await asyncio.create_subprocess_exec(
        EGIZ, "demo", "--http-port", str(port), "--rate", "5",
        "--aggregator-port", "0", "--data-dir", str(tmp_path / "demo"), "--duration", "60",
        stderr=asyncio.subprocess.PIPE)
    plc: dict[str, Any] = {}
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 30
            total = 0
            while total < 10:
                if proc.returncode is not None or time.monotonic() > deadline:
                    break
                try:
                    async with http.get(f"http://127.0.0.1:{port}/api/v1/things") as r:
                        total = (await r.json())["total"] if r.status == 200 else 0
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
            if total >= 10:
                async with http.get(f"http://127.0.0.1:{port}/ready") as r:
                    ready = r.status, await r.json()
            while proc.returncode is None and time.monotonic() < deadline + 15:  # the line's Modbus oven PLC
                async with http.get(f"http://127.0.0.1:{port}/api/v1/connectors/devices") as r:
                    items = (await r.json())["items"] if r.status == 200 else []
                plc = next((d for d in items if d.get("protocol") == "modbus"), {})
                if (plc.get("health") or {}).get("state") == "online":
                    break
                await asyncio.sleep(0.2)
            # the line's proofer behind a simulated OPC UA PLC, subscribed to by the gateway
            proofer: dict[str, Any] = {}
            while proc.returncode is None and time.monotonic() < deadline + 30 and "temperature" not in proofer:
                async with http.get(f"http://127.0.0.1:{port}/api/v1/things/izmir-bakery:proofer-opcua/features/"
                                    "climate") as r:
                    proofer = (await r.json()).get("properties", {}) if r.status == 200 else {}
                await asyncio.sleep(0.3)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert total >= 10, f"the demo did not show 10 Things: {err.decode()[-3000:]}"
    assert ready[0] == 200 and any("open" in w for w in ready[1]["warnings"]), ready
    assert 10.0 < proofer.get("temperature", 0) < 50.0, proofer
    assert proc.returncode == 0, err.decode()[-2000:]
    assert f"http://127.0.0.1:{port}/api/v1/things" in err.decode()
    assert (tmp_path / "demo" / "gateway" / "registry.sqlite").exists()
    assert plc["health"]["state"] == "online" and plc["thingId"].endswith(":oven-900"), plc



def _listening(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


async def test_demo_stops_by_itself_after_duration(tmp_path: Path) -> None:
    need_mosquitto()
    mqtt_port = find_free_port()
    proc = await asyncio.create_subprocess_exec(
        EGIZ, "demo", "--http-port", "0", "--mqtt-port", str(mqtt_port), "--nodes", "2", "--rate", "5",
        "--faults", "", "--duration", "2", "--data-dir", str(tmp_path / "demo"), stderr=asyncio.subprocess.PIPE)
    started = time.monotonic()
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 40)
    finally:
        if proc.returncode is None:  # it did not stop by itself
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert time.monotonic() - started < 40
    assert (tmp_path / "demo" / "gateway" / "registry.sqlite").exists()
    assert not _listening(mqtt_port), "the demo's broker is still running"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--http-port", "70000"], "http.port: must be a TCP port"),
        (["--faults", "stuck:oven-999@10"], "--faults: fault 'stuck:oven-999@10+60': no node 'oven-999'"),
    ],
    ids=["http-port", "faults"],
)
def test_demo_with_invalid_options_exits_2_and_leaves_no_broker(tmp_path: Path, args: list[str],
                                                                message: str) -> None:
    import subprocess

    need_mosquitto()
    mqtt_port = find_free_port()
    result = subprocess.run([EGIZ, "demo", "--mqtt-port", str(mqtt_port), "--data-dir", str(tmp_path / "demo"),
                             *args], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not _listening(mqtt_port), "a broker was started for a demo that cannot run"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--site", "bad/site"], "egiz: invalid options: --site: "),
        (["--site", "x", "--port", "0"], "egiz: invalid options: --port: must be 1-65535"),
        (["--site", "bad/site", "--port", "70000"], "--site: 1-64 characters"),
        (["--site", "x", "--nodes", "3", "--faults", "drift:oven-007@5"],
         "egiz: --faults: fault 'drift:oven-007@5+60': no node 'oven-007' in this fleet"),
        (["--site", "x", "--faults", "drift:oven-001"], "egiz: --faults: fault 'drift:oven-001': expected KIND"),
    ],
    ids=["site", "port", "several", "fault-node", "fault-grammar"],
)
def test_sim_with_invalid_options_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    import subprocess

    result = subprocess.run([EGIZ, "sim", "--duration", "1", *args], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


async def test_embedded_broker_carries_a_line_when_mosquitto_is_missing(tmp_path: Path,
                                                                         start_gateway: GatewayFactory) -> None:
    from gateway.broker import EmbeddedBroker

    broker = EmbeddedBroker(BrokerSettings(port=find_free_port(), data_dir=tmp_path / "eb", allow_anonymous=True))
    await broker.start()
    try:
        gw = await start_gateway(("127.0.0.1", broker.port))
        stats = await run_fleet(FleetOptions(site=gw.site, nodes=3, rate_hz=10, duration_s=1.5, seed=2,
                                             port=broker.port))
        ingest = gw.service.ingest
        await wait_for(lambda: ingest.accepted_messages == sum(stats.last_seq.values()))
        thing = gw.service.registry.get(gw.thing_id("oven-001"))
        assert thing is not None and thing.features["connectivity"].properties["state"] == "offline"
        assert gw.service.metrics.gaps._value.get() == 0
    finally:
        await broker.stop()
