"""The S7 connector against python-snap7's own server: every S7 type in the DB, M, I and Q areas,
multi-variable reads packed per PDU (requests counted at the server), an item the PLC refuses
making only its tags Bad, writes with read-back, and a server that goes away and comes back."""

from __future__ import annotations

import socket
import struct
import time

import pytest
from snap7.type import SrvArea

from gateway.connectors.base import DeviceError, SharedLinks, WriteRefused
from gateway.connectors.config import S7Device, S7Tag
from gateway.connectors.s7 import S7Connector, plan
from gateway.sim.plc_image import POINTS
from gateway.sim.plc_s7 import HEATER, LAYOUT, STATUS, S7Plc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def t(prop: str, area: str, byte: int, datatype: str, **kw: object) -> S7Tag:
    return S7Tag(feature="plc", property=prop, area=area, byte=byte, datatype=datatype,  # type: ignore[arg-type]
                 **kw)  # type: ignore[arg-type]


def s7_device(port: int, tags: tuple[S7Tag, ...]) -> S7Device:
    return S7Device(name="proofer-s7", url=f"s7://127.0.0.1:{port}", thing="proofer-202", type="proofer",
                    poll_s=0.2, timeout_s=2.0, tags=tags)


async def test_every_type_across_db_m_i_q_in_one_packed_request() -> None:
    port = free_port()
    plc = S7Plc("proofer", POINTS["proofer"], port=port)
    await plc.start()
    try:
        await plc.publish({"Temperature": 35.5, "Humidity": 80.25, "Setpoint": 36.0, "BatchCount": -70000,
                           "Running": True}, time.time())
        db = plc.areas["DB"]
        db[20:22] = struct.pack(">h", -1234)          # INT  (the heater is on: running below the setpoint)
        db[22:24] = struct.pack(">H", 0xBEEF)         # WORD
        db[24:28] = struct.pack(">I", 0xDEADBEEF)     # DWORD
        db[28] = 0xA5                                  # BYTE
        db[29] = 0b0000_0100                           # BOOL DBX29.2
        db[32:40] = struct.pack(">d", -2.5e-3)        # LREAL
        db[40:48] = bytes([6, 3]) + b"rye\0"           # STRING[6]
        plc.areas["M"][4] = 0b1000_0000                # M4.7
        tags = (
            t("temperature", "DB", 0, "REAL", db=1), t("humidity", "DB", 4, "REAL", db=1),
            t("setpoint", "DB", 8, "REAL", db=1), t("batches", "DB", 12, "DINT", db=1),
            t("i16", "DB", 20, "INT", db=1), t("word", "DB", 22, "WORD", db=1), t("dword", "DB", 24, "DWORD", db=1),
            t("byte", "DB", 28, "BYTE", db=1), t("bit", "DB", 29, "BOOL", db=1, bit=2),
            t("lreal", "DB", 32, "LREAL", db=1), t("recipe", "DB", 40, "STRING", db=1, length=6),
            t("running", "I", 0, "BOOL", bit=0), t("heater", "Q", HEATER.byte, "BOOL", bit=HEATER.bit),
            t("status", "M", STATUS.byte, "INT"), t("marker", "M", 4, "BOOL", bit=7),
            t("missing", "DB", 0, "INT", db=99),
        )
        conn = S7Connector(s7_device(port, tags), SharedLinks())
        await conn.connect()
        try:
            before = plc.reads_served
            result = await conn.read()
            assert plc.reads_served - before == result.requests == 1  # 16 tags, 4 areas, one PDU
        finally:
            await conn.close()
    finally:
        await plc.stop()
    got = {v.tag.property: v for v in result.values}
    expect = {"temperature": 35.5, "humidity": 80.25, "setpoint": 36.0, "batches": -70000, "i16": -1234,
              "word": 0xBEEF, "dword": 0xDEADBEEF, "byte": 0xA5, "bit": True, "lreal": -2.5e-3, "recipe": "rye",
              "running": True, "heater": True, "status": 1, "marker": True}
    assert {k: got[k].value for k in expect} == expect
    assert all(got[k].quality == "good" for k in expect)
    assert isinstance(got["batches"].value, int) and isinstance(got["temperature"].value, float)
    # the PLC refused one item (no DB 99): only its tag is Bad
    assert got["missing"].quality == "bad" and got["missing"].value is None


async def test_many_tags_are_packed_into_few_requests_counted_at_the_server() -> None:
    port = free_port()
    plc = S7Plc("oven", POINTS["oven"], port=port)
    await plc.start()
    assert plc.server is not None
    big = bytearray(2000)
    plc.server.register_area(SrvArea.DB, 2, big)
    for i in range(50):
        big[i * 16:i * 16 + 4] = struct.pack(">f", i + 0.5)
    tags = tuple(t(f"v{i}", "DB", i * 16, "REAL", db=2) for i in range(50))
    conn = S7Connector(s7_device(port, tags), SharedLinks())
    try:
        await conn.connect()
        before = plc.reads_served
        result = await conn.read()
        served = plc.reads_served - before
        await conn.close()
    finally:
        await plc.stop()
    assert [v.value for v in result.values] == [i + 0.5 for i in range(50)]
    # 50 tags over 800 bytes: a handful of requests, not 50; the server saw exactly what the connector counted
    assert served == result.requests <= 3
    # every request fits the PDU both ways and holds at most 20 items, whatever the PDU
    for pdu in (240, 480, 960):
        requests = plan(list(tags), pdu)
        assert sorted(tg.property for r in requests for b in r for tg in b.tags) == sorted(tg.property for tg in tags)
        for blocks in requests:
            assert len(blocks) <= 20
            assert 14 + 12 * len(blocks) <= pdu
            assert 14 + sum(4 + b.length + b.length % 2 for b in blocks) <= pdu
    # near neighbours are merged into one item: 50 REALs back to back are one block
    dense = [t(f"d{i}", "DB", i * 4, "REAL", db=2) for i in range(50)]
    assert [len(r) for r in plan(dense, 480)] == [1]


async def test_writes_read_back_and_refuse_what_does_not_fit() -> None:
    port = free_port()
    plc = S7Plc("proofer", POINTS["proofer"], port=port)
    await plc.start()
    plc.areas["Q"][1] = 0b0000_0001  # another output on the same byte must survive a bit write
    setpoint = t("setpoint", "DB", LAYOUT["proofer"]["Setpoint"].byte, "REAL", db=1, writable=True)
    valve = t("valve", "Q", 1, "BOOL", bit=3, writable=True)
    small = t("count", "M", 20, "INT", writable=True)
    conn = S7Connector(s7_device(port, (setpoint, valve, small)), SharedLinks())
    try:
        await conn.connect()
        assert await conn.write(setpoint, 37.5) == 37.5
        assert (await plc.written())["Setpoint"] == 37.5
        assert await conn.write(valve, True) is True
        assert plc.areas["Q"][1] == 0b0000_1001
        with pytest.raises(WriteRefused, match="out of the range of INT"):
            await conn.write(small, 40000)
        await conn.close()
    finally:
        await plc.stop()


async def test_a_stopped_plc_fails_the_read_and_a_restarted_one_is_read_again() -> None:
    port = free_port()
    plc = S7Plc("proofer", POINTS["proofer"], port=port)
    await plc.start()
    await plc.publish({"Temperature": 30.0}, time.time())
    conn = S7Connector(s7_device(port, (t("temperature", "DB", 0, "REAL", db=1),)), SharedLinks())
    try:
        await conn.connect()
        assert (await conn.read()).values[0].value == 30.0
        await plc.stop()
        with pytest.raises(DeviceError) as lost:
            await conn.read()
        assert lost.value.reason in ("connection_lost", "protocol", "timeout")
        await conn.close()
        with pytest.raises(DeviceError) as refused:
            await conn.connect()
        assert refused.value.reason in ("refused", "connection_lost")
        await plc.start()
        await plc.publish({"Temperature": 31.0}, time.time())
        await conn.connect()
        assert (await conn.read()).values[0].value == 31.0
        await conn.close()
    finally:
        await plc.stop()
