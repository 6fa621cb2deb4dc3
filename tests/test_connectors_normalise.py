"""The normaliser (scale, offset, pint units, clamping, deadband, calculated tags, the inverse for
writes), coalescing, Modbus value encoding, and the register-map CSV parser (including property
tests: any text is either tags or a RegisterMapError naming a line, never another exception)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.connectors.base import RawValue, WriteRefused
from gateway.connectors.config import ModbusDevice, ModbusTag
from gateway.connectors.modbus import decode, encode, plan_blocks
from gateway.connectors.normalise import DeviceNormaliser, expression_problem
from gateway.connectors.register_map import RegisterMapError, parse_register_map


def dev(*tags: ModbusTag) -> ModbusDevice:
    return ModbusDevice(name="d", url="tcp://127.0.0.1:502", thing="t", tags=tags)


def test_scale_offset_units_clamp_and_inverse() -> None:
    temp = ModbusTag(feature="f", property="temp", address=0, datatype="int16", scale=0.1, offset=-5, unit="degF",
                     to_unit="degC")
    press = ModbusTag(feature="f", property="p", address=1, unit="bar", to_unit="psi", writable=True, min=0, max=100)
    n = DeviceNormaliser(dev(temp, press))
    (t, p) = n.normalise([RawValue(temp, 2170), RawValue(press, 2)], now=1.0)
    assert t.value == pytest.approx(100.0) and t.quality == "good" and t.ts == 1.0  # (217 - 5) °F
    assert p.value == pytest.approx(29.0075, abs=1e-3)
    assert n.to_raw(press, 29.0075) == pytest.approx(2.0, abs=1e-4)  # the inverse, for writes
    (over,) = n.normalise([RawValue(press, 10)])  # 145 psi > max 100: clamped, not good
    assert over.value == 100 and over.quality == "uncertain"
    with pytest.raises(WriteRefused, match="within"):
        n.to_raw(press, 101)
    with pytest.raises(WriteRefused, match="read-only"):
        n.to_raw(temp, 50)


def test_deadband_and_bad_values() -> None:
    tag = ModbusTag(feature="f", property="x", address=0, deadband=0.5)
    n = DeviceNormaliser(dev(tag))
    kept = [r.value for v in (10, 10.4, 10.6, 10.2, 9.9, 12) for r in n.normalise([RawValue(tag, v)])]
    assert kept == [10, 10.6, 9.9, 12]  # each kept value moved > 0.5 from the last kept one
    (bad,) = n.normalise([RawValue(tag, None, quality="bad")])
    assert bad.value is None and bad.quality == "bad"
    (after,) = n.normalise([RawValue(tag, 12)])  # a bad reading resets the deadband
    assert after.value == 12


def test_calculated_tags_are_safe() -> None:
    a = ModbusTag(feature="f", property="a", address=0)
    b = ModbusTag(feature="f", property="b", address=1)
    ratio = ModbusTag(feature="g", property="ratio", expression="round(a / b, 2) if b else 0")
    n = DeviceNormaliser(dev(a, b, ratio))
    out = {r.property: r for r in n.normalise([RawValue(a, 10), RawValue(b, 4)])}
    assert out["ratio"].value == 2.5 and out["ratio"].feature == "g"
    out = {r.property: r for r in n.normalise([RawValue(b, 0)])}
    assert out["ratio"].value == 0
    for evil in ("__import__('os').system('true')", "a.__class__", "open('x')", "[x for x in ()]", "a[0]"):
        assert expression_problem(evil), evil


def test_coalescing_respects_limits_and_gaps() -> None:
    tags = [ModbusTag(feature="f", property=f"t{i}", address=a, datatype="float32")
            for i, a in enumerate((0, 2, 4, 20, 30, 200, 322))]
    blocks = plan_blocks(tags, max_gap=8, max_gap_bits=64, max_registers=125, max_bits=2000)
    assert [(b.address, b.count) for b in blocks] == [(0, 6), (20, 12), (200, 2), (322, 2)]
    blocks = plan_blocks(tags, max_gap=200, max_gap_bits=64, max_registers=125, max_bits=2000)
    assert [(b.address, b.count) for b in blocks] == [(0, 32), (200, 124)]  # a wide gap, never past 125
    bits = [ModbusTag(feature="f", property=f"c{i}", table="coil", address=i * 10, datatype="bool") for i in range(300)]
    blocks = plan_blocks(bits, max_gap=8, max_gap_bits=64, max_registers=125, max_bits=2000)
    assert all(b.count <= 2000 for b in blocks) and len(blocks) == 2


@given(st.floats(allow_nan=False, allow_infinity=False, width=32), st.sampled_from(["big", "little"]),
       st.sampled_from(["big", "little"]))
def test_float32_words_match_struct(value: float, bo: str, wo: str) -> None:
    tag = ModbusTag(feature="f", property="x", address=0, datatype="float32", byte_order=bo,  # type: ignore[arg-type]
                    word_order=wo)  # type: ignore[arg-type]
    raw = struct.pack(">f", value)
    words = [raw[0:2], raw[2:4]]
    if bo == "little":
        words = [w[::-1] for w in words]
    if wo == "little":
        words.reverse()
    regs = [int.from_bytes(w, "big") for w in words]
    assert encode(value, tag) == regs
    assert decode(regs, tag) == struct.unpack(">f", raw)[0]


def test_register_map_csv() -> None:
    text = ("Address,Name,Type,Scale,Unit,Table,Writable\n"
            "0,thermal.temperature,INT,0.1,degC,input,\n"
            "10,thermal.setpoint,INT,0.1,degC,holding,rw\n"
            "0x14,power,REAL,,W,,\n"
            "0,motor.running,,,,coil,yes\n")
    tags = parse_register_map(text)
    assert [(t.feature, t.property, t.table, t.address, t.datatype, t.scale, t.writable) for t in tags] == [
        ("thermal", "temperature", "input", 0, "int16", 0.1, False),
        ("thermal", "setpoint", "holding", 10, "int16", 0.1, True),
        ("data", "power", "holding", 20, "float32", 1.0, False),
        ("motor", "running", "coil", 0, "bool", 1.0, True),
    ]
    with pytest.raises(RegisterMapError) as exc:
        parse_register_map("address,name,type,colour\n1,a,int,red\n")
    assert "column 'colour'" in str(exc.value)
    with pytest.raises(RegisterMapError) as exc:
        parse_register_map("address,name,type,scale\nx,a,int,1\n2,b,float99,y\n")
    found = dict(exc.value.problems)
    assert "line 2.address" in str(found) and "line 3.scale" in str(found) and "line 3.datatype" in str(found)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_register_map_never_fails_otherwise(text: str) -> None:
    try:
        parse_register_map("address,name,type,scale,unit\n" + text)
    except RegisterMapError as exc:
        assert exc.problems
