"""The simulated PLCs: `egiz sim --plc s7` serving the proofer model (its setpoint written back into
the model, a dropout fault taking the PLC off the network, the ground truth written). The OPC UA
PLC's information model is exercised by the OPC UA connector's tests and the demo's."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

from gateway.connectors.base import DeviceError, SharedLinks
from gateway.connectors.config import S7Device, S7Tag
from gateway.connectors.s7 import S7Connector
from gateway.sim.plc_s7 import LAYOUT
from tests.helpers.processes import EGIZ


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def s7_tag(prop: str, point: str, **kw: object) -> S7Tag:
    a = LAYOUT["proofer"][point]
    return S7Tag(feature="climate", property=prop, area=a.area, db=1 if a.area == "DB" else 0,  # type: ignore[arg-type]
                 byte=a.byte, bit=a.bit, datatype=a.datatype, **kw)  # type: ignore[arg-type]


async def test_s7_plc_serves_the_model_takes_setpoints_and_drops_out_on_a_fault(tmp_path: Path) -> None:
    port = free_port()
    truth = tmp_path / "truth.jsonl"
    log = tmp_path / "sim.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            EGIZ, "sim", "--site", "izmir-bakery", "--plc", "s7", "--plc-port", str(port), "--rate", "5",
            "--seed", "7", "--faults", "dropout:proofer-201@4+2", "--truth", str(truth), "--duration", "10",
            stdout=out, stderr=out)
    temperature, setpoint = s7_tag("temperature", "Temperature"), s7_tag("setpoint", "Setpoint", writable=True)
    device = S7Device(name="proofer-s7", url=f"s7://127.0.0.1:{port}", thing="proofer-201", timeout_s=1.0,
                      tags=(temperature, setpoint))
    conn = S7Connector(device, SharedLinks())
    t0 = time.monotonic()
    timeline: list[tuple[float, bool]] = []
    wrote = refused_kept = False
    try:
        while proc.returncode is None and time.monotonic() - t0 < 30:
            try:
                if conn.client is None:
                    await conn.connect()
                got = {v.tag.property: v.value for v in (await conn.read()).values}
                timeline.append((time.monotonic() - t0, True))
                assert isinstance(got["temperature"], float) and 15.0 < got["temperature"] < 50.0
                if not wrote:
                    assert await conn.write(setpoint, 41.0) == 41.0
                    wrote = True
                elif not refused_kept and len(timeline) > 5:
                    assert got["setpoint"] == 41.0  # the model took it: it publishes its own setpoint back
                    await conn.write(setpoint, 90.0)  # outside the proofer's 20..45: the model refuses it
                    await asyncio.sleep(1.0)
                    back = {v.tag.property: v.value for v in (await conn.read()).values}
                    assert back["setpoint"] == 41.0
                    refused_kept = True
            except DeviceError:
                timeline.append((time.monotonic() - t0, False))
                await conn.close()
            await asyncio.sleep(0.2)
        await asyncio.wait_for(proc.wait(), timeout=30)
    finally:
        await conn.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, log.read_text()
    assert wrote and refused_kept
    ok = [t for t, up in timeline if up]
    down = [t for t, up in timeline if not up]
    # the dropout (4 s to 6 s into the run) took the PLC away, and it came back afterwards
    outage = min(t for t in down if t > ok[0])
    assert outage - ok[0] > 2.0 and any(t > outage + 1.0 for t in ok), [(round(t, 1), u) for t, u in timeline]
    record = json.loads(truth.read_text().splitlines()[0])
    assert record["thing"] == "izmir-bakery:proofer-201" and record["fault"] == "dropout"
    assert "1 setpoint writes" not in log.read_text() and "2 setpoint writes" in log.read_text()
