"""Telemetry and status payloads: the contract shapes, the legacy shape, every rejection reason,
and property tests that nothing but a valid Telemetry or a RejectedMessage ever comes out."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.common.errors import RejectedMessage
from gateway.common.names import NAME_RE
from gateway.common.readings import Properties, Sample, Status, Telemetry, count_points
from gateway.common.series import flatten as flatten_paths
from gateway.ingest.payload import (
    MAX_ARRAY,
    MAX_FUTURE_S,
    MAX_PROPERTIES,
    MAX_STRING,
    MIN_TS,
    decode_json,
    parse_status,
    parse_telemetry,
)


def flatten(properties: Properties) -> list[tuple[str, object]]:
    return list(flatten_paths(properties))

NOW = 1_750_000_000.0  # a fixed "now" so timestamp limits are deterministic
TS = NOW - 5.0
REASONS = {"too_large", "malformed_json", "wrong_shape", "wrong_type", "missing_field", "bad_name",
           "bad_timestamp", "bad_seq"}


def encode(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def parse(doc: Any, **kw: Any) -> Telemetry:
    raw = doc if isinstance(doc, bytes) else encode(doc)
    kw.setdefault("feature", "thermal")
    kw.setdefault("now", NOW)
    return parse_telemetry(raw, **kw)


def reason_of(doc: Any, **kw: Any) -> str:
    with pytest.raises(RejectedMessage) as exc:
        parse(doc, **kw)
    assert exc.value.detail  # every rejection says what was wrong
    return exc.value.reason


# ------------------------------------------------------------------ contract shapes


def test_single_sample() -> None:
    tel = parse({"ts": TS, "seq": 41, "boot": "b-7f3a", "properties": {
        "temperature": 182.5, "temperature_zones": [180.0, 185.5, 190.0], "voltage": {"a": 230, "b": 229.5},
        "door_open": False, "mode": "bake", "cycles": 3}})
    assert tel == Telemetry("b-7f3a", (Sample("thermal", TS, 41, {
        "temperature": 182.5, "temperature_zones": [180.0, 185.5, 190.0], "voltage": {"a": 230, "b": 229.5},
        "door_open": False, "mode": "bake", "cycles": 3}),))
    assert tel.point_count == 1 + 3 + 2 + 1 + 1 + 1


def test_single_sample_without_seq_and_boot() -> None:
    tel = parse({"ts": int(TS), "properties": {"t": 1}})
    assert tel.boot is None
    (sample,) = tel.samples
    assert sample.seq is None
    assert sample.ts == float(int(TS))
    assert isinstance(sample.ts, float)


def test_integer_boot_becomes_a_string() -> None:
    assert parse({"ts": TS, "boot": 12345, "properties": {"t": 1}}).boot == "12345"


def test_batch_keeps_device_order() -> None:
    tel = parse({"boot": "b1", "samples": [
        {"ts": TS - 2, "seq": 10, "properties": {"t": 1.0}},
        {"ts": TS - 1, "seq": 11, "properties": {"t": 2.0, "zones": [1, 2]}},
        {"ts": TS, "properties": {"t": 3.0}},  # seq is optional per sample
    ]})
    assert tel.boot == "b1"
    assert [(s.feature, s.ts, s.seq, s.properties) for s in tel.samples] == [
        ("thermal", TS - 2, 10, {"t": 1.0}),
        ("thermal", TS - 1, 11, {"t": 2.0, "zones": [1, 2]}),
        ("thermal", TS, None, {"t": 3.0}),
    ]
    assert tel.point_count == 1 + 3 + 1


def test_batch_respects_max_samples() -> None:
    samples = [{"ts": TS, "seq": i, "properties": {"t": i}} for i in range(3)]
    assert len(parse({"samples": samples}, max_samples=3).samples) == 3
    assert reason_of({"samples": samples}, max_samples=2) == "too_large"


def test_contract_format_needs_a_feature_from_the_topic() -> None:
    assert reason_of({"ts": TS, "properties": {"t": 1}}, feature=None) == "wrong_shape"


# ------------------------------------------------------------------ legacy shape


def test_legacy_shape_gives_one_sample_per_feature_object() -> None:
    tel = parse({"device_id": "esp32-a1", "timestamp": TS, "thermal": {"temp": 180.5, "zones": [1, 2]},
                 "power": {"voltage": {"a": 230.0}}},
                feature=None, payload_format="legacy", device_id="esp32-a1")
    assert tel.boot is None
    assert tel.samples == (
        Sample("thermal", TS, None, {"temp": 180.5, "zones": [1, 2]}),
        Sample("power", TS, None, {"voltage": {"a": 230.0}}),
    )


def test_legacy_shape_with_ts_seq_boot_and_no_device_id() -> None:
    tel = parse({"ts": TS, "seq": 5, "boot": "x", "thermal": {"temp": 1}}, feature=None, payload_format="legacy")
    assert tel == Telemetry("x", (Sample("thermal", TS, 5, {"temp": 1}),))


def test_legacy_with_a_topic_feature_takes_properties() -> None:
    tel = parse({"timestamp": TS, "properties": {"temp": 1}}, feature="thermal", payload_format="legacy")
    assert tel.samples == (Sample("thermal", TS, None, {"temp": 1}),)


@pytest.mark.parametrize(
    ("doc", "kw", "reason"),
    [
        ({"device_id": "esp-2", "timestamp": TS, "thermal": {"t": 1}}, {"device_id": "esp-1"}, "wrong_shape"),
        ({"device_id": "esp-1", "timestamp": TS}, {}, "wrong_shape"),  # no feature objects
        ({"timestamp": TS, "thermal": 5}, {}, "wrong_type"),
        ({"timestamp": TS, "fw": "1.2.0"}, {}, "wrong_type"),
        ({"timestamp": TS, "bad-feature": {"t": 1}}, {}, "bad_name"),
        ({"timestamp": TS, "thermal": {}}, {}, "missing_field"),
        ({"timestamp": TS, "thermal": {"bad name": 1}}, {}, "bad_name"),
        ({"timestamp": TS * 1000, "thermal": {"t": 1}}, {}, "bad_timestamp"),
        ({"timestamp": "2024-01-01T00:00:00Z", "thermal": {"t": 1}}, {}, "wrong_type"),
        ({"timestamp": TS, "seq": -1, "thermal": {"t": 1}}, {}, "wrong_type"),
        ({"timestamp": None, "thermal": {"t": 1}}, {}, "missing_field"),
        ({"device_id": "esp-1", "thermal": {"t": 1}}, {}, "missing_field"),
        ({"timestamp": TS, "thermal": {"t": 2**63}}, {}, "wrong_type"),
        ({"timestamp": TS, "thermal": {"zones": [1, -(2**63) - 1]}}, {}, "wrong_type"),
        ({"timestamp": TS, "seq": 2**63, "thermal": {"t": 1}}, {}, "wrong_type"),
        ([{"timestamp": TS, "thermal": {"t": 1}}], {}, "wrong_shape"),
    ],
)
def test_legacy_rejections(doc: Any, kw: dict[str, Any], reason: str) -> None:
    assert reason_of(doc, feature=None, payload_format="legacy", **kw) == reason


# ------------------------------------------------------------------ every rejection reason


def props(**kv: Any) -> dict[str, Any]:
    return {"ts": TS, "properties": kv}


REJECTIONS: list[tuple[str, Any, str]] = [
    # too_large
    ("payload over max_bytes", b" " * 65537, "too_large"),
    ("string over MAX_STRING", props(s="x" * (MAX_STRING + 1)), "too_large"),
    ("too many properties", {"ts": TS, "properties": {f"p{i}": i for i in range(MAX_PROPERTIES + 1)}}, "too_large"),
    # malformed_json
    ("not JSON", b"{not json", "malformed_json"),
    ("empty", b"", "malformed_json"),
    ("not UTF-8", b'{"ts": 1, "properties": {"a": "\xff\xfe"}}', "malformed_json"),
    ("truncated", b'{"ts": 1750000000, "properties": {"a": 1', "malformed_json"),
    ("nested too deep to decode", b"[" * 30_000 + b"]" * 30_000, "malformed_json"),
    # wrong_shape
    ("array", [1, 2, 3], "wrong_shape"),
    ("string", "online", "wrong_shape"),
    ("number", 42, "wrong_shape"),
    ("null", None, "wrong_shape"),
    ("unknown top-level key", {"ts": TS, "properties": {"a": 1}, "unit": "C"}, "wrong_shape"),
    ("samples not an array", {"samples": {"ts": TS}}, "wrong_shape"),
    ("samples empty", {"samples": []}, "wrong_shape"),
    ("key next to samples", {"samples": [props(a=1)], "ts": TS}, "wrong_shape"),
    ("sample not an object", {"samples": [props(a=1), 5]}, "wrong_shape"),
    ("unknown key in a sample", {"samples": [{**props(a=1), "unit": "C"}]}, "wrong_shape"),
    # wrong_type
    ("ts a string", {"ts": "1750000000", "properties": {"a": 1}}, "wrong_type"),
    ("ts a bool", {"ts": True, "properties": {"a": 1}}, "wrong_type"),
    ("ts null", {"ts": None, "properties": {"a": 1}}, "missing_field"),
    ("ts NaN", b'{"ts": NaN, "properties": {"a": 1}}', "malformed_json"),
    ("ts Infinity", b'{"ts": Infinity, "properties": {"a": 1}}', "malformed_json"),
    ("ts overflowing float", b'{"ts": 1e400, "properties": {"a": 1}}', "malformed_json"),
    ("seq negative", {"ts": TS, "seq": -1, "properties": {"a": 1}}, "wrong_type"),
    ("seq a float", {"ts": TS, "seq": 1.0, "properties": {"a": 1}}, "wrong_type"),
    ("seq a bool", {"ts": TS, "seq": True, "properties": {"a": 1}}, "wrong_type"),
    ("seq 2**63", {"ts": TS, "seq": 2**63, "properties": {"a": 1}}, "wrong_type"),
    ("property 2**63", props(a=2**63), "wrong_type"),
    ("property 2**64 (orjson would make it a float)", props(a=2**64), "wrong_type"),
    ("property 10**25", props(a=10**25), "wrong_type"),
    ("property below -2**63", props(a=-(2**63) - 1), "wrong_type"),
    ("array with 2**63", props(zones=[1, 2**63]), "wrong_type"),
    ("named number 2**63", props(voltage={"a": 2**63}), "wrong_type"),
    ("ts 2**63", {"ts": 2**63, "properties": {"a": 1}}, "wrong_type"),
    ("boot an object", {"ts": TS, "boot": {"id": 1}, "properties": {"a": 1}}, "wrong_type"),
    ("boot a bool", {"ts": TS, "boot": True, "properties": {"a": 1}}, "wrong_type"),
    ("boot empty", {"ts": TS, "boot": "", "properties": {"a": 1}}, "wrong_type"),
    ("boot too long", {"ts": TS, "boot": "b" * 65, "properties": {"a": 1}}, "wrong_type"),
    ("property null", props(a=None), "wrong_type"),
    ("property NaN", b'{"ts": 1750000000, "properties": {"a": NaN}}', "malformed_json"),
    ("array with a string", props(zones=[1, "two"]), "wrong_type"),
    ("array with a bool", props(zones=[1, True]), "wrong_type"),
    ("array with an array", props(zones=[[1]]), "wrong_type"),
    ("empty array", props(zones=[]), "wrong_type"),
    ("array over MAX_ARRAY", props(zones=[0.0] * (MAX_ARRAY + 1)), "wrong_type"),
    ("named numbers with a string", props(voltage={"a": "230"}), "wrong_type"),
    ("named numbers nested", props(voltage={"a": {"x": 1}}), "wrong_type"),
    ("named numbers with a bad name", props(voltage={"a b": 1}), "wrong_type"),
    ("named numbers empty", props(voltage={}), "wrong_type"),
    ("named numbers over 32", props(voltage={f"p{i}": i for i in range(33)}), "wrong_type"),
    # missing_field
    ("no ts", {"properties": {"a": 1}}, "missing_field"),
    ("no properties", {"ts": TS}, "missing_field"),
    ("properties not an object", {"ts": TS, "properties": [1]}, "missing_field"),
    ("properties empty", {"ts": TS, "properties": {}}, "missing_field"),
    ("a sample without ts", {"samples": [props(a=1), {"properties": {"a": 1}}]}, "missing_field"),
    ("a sample with ts null", {"samples": [props(a=1), {"ts": None, "properties": {"a": 1}}]}, "missing_field"),
    # bad_name
    ("space in a name", props(**{"bad name": 1}), "bad_name"),
    ("name starts with a digit", props(**{"1st": 1}), "bad_name"),
    ("dash in a name", props(**{"door-open": 1}), "bad_name"),
    ("dotted name", props(**{"voltage.a": 1}), "bad_name"),
    ("empty name", props(**{"": 1}), "bad_name"),
    ("name of 65 characters", props(**{"n" * 65: 1}), "bad_name"),
    ("non-ASCII name", props(**{"s\u0131cakl\u0131k": 1}), "bad_name"),
    # bad_timestamp
    ("milliseconds", {"ts": NOW * 1000, "properties": {"a": 1}}, "bad_timestamp"),
    ("before 2000", {"ts": MIN_TS - 1, "properties": {"a": 1}}, "bad_timestamp"),
    ("zero (clock never set)", {"ts": 0, "properties": {"a": 1}}, "bad_timestamp"),
    ("more than a day ahead", {"ts": NOW + MAX_FUTURE_S + 1, "properties": {"a": 1}}, "bad_timestamp"),
    # bad_seq
    ("seq going back in a batch", {"samples": [{**props(a=1), "seq": 5}, {**props(a=2), "seq": 4}]}, "bad_seq"),
    ("seq repeated in a batch", {"samples": [{**props(a=1), "seq": 5}, {**props(a=2), "seq": 5}]}, "bad_seq"),
    ("seq going back past a sample without one",
     {"samples": [{**props(a=1), "seq": 5}, props(a=2), {**props(a=3), "seq": 2}]}, "bad_seq"),
]


@pytest.mark.parametrize(("doc", "reason"), [pytest.param(d, r, id=i) for i, d, r in REJECTIONS])
def test_rejection_reasons(doc: Any, reason: str) -> None:
    assert reason_of(doc) == reason


def test_every_reason_code_has_an_example() -> None:
    assert {r for _, _, r in REJECTIONS} == REASONS


def test_a_rejection_names_where_the_problem_is() -> None:
    with pytest.raises(RejectedMessage) as exc:
        parse({"samples": [props(a=1), {"ts": TS, "properties": {"zones": [1, "x"]}}]})
    assert "samples[1].properties.zones" in exc.value.detail


@pytest.mark.parametrize(
    "doc",
    [
        props(s="x" * MAX_STRING),
        {"ts": TS, "properties": {f"p{i}": i for i in range(MAX_PROPERTIES)}},
        props(zones=[0.5] * MAX_ARRAY),
        props(voltage={f"p{i}": i for i in range(32)}),
        props(**{"n" * 64: 1}),
        {"ts": MIN_TS, "properties": {"a": 1}},
        {"ts": NOW + MAX_FUTURE_S, "properties": {"a": 1}},
        {"ts": TS, "seq": 2**63 - 1, "boot": "b" * 64, "properties": {"a": 1}},
        {"ts": TS, "seq": 0, "properties": {"_": -0.0, "A_1": -1e308, "empty": ""}},
        props(hi=2**63 - 1, lo=-(2**63), zones=[2**63 - 1, -(2**63)], named={"hi": 2**63 - 1, "lo": -(2**63)}),
    ],
    ids=["string", "properties", "array", "named", "name", "min-ts", "max-ts", "seq-boot", "edges", "int64"],
)
def test_values_exactly_at_the_limits_are_accepted(doc: Any) -> None:
    assert parse(doc, max_bytes=1 << 20).samples


def test_payload_of_exactly_max_bytes_is_accepted() -> None:
    raw = encode(props(a=1))
    padded = raw[:-1] + b" " * (300 - len(raw)) + b"}"
    assert len(padded) == 300
    assert parse(padded, max_bytes=300).samples
    assert reason_of(padded + b" ", max_bytes=300) == "too_large"


# Integers beyond 64 bits are valid JSON but fit no store downstream: rejected, never a crash.
HUGE = "1" + "0" * 400


@pytest.mark.parametrize(
    "raw",
    [
        f'{{"ts": {HUGE}, "properties": {{"a": 1}}}}',
        f'{{"ts": 1750000000, "properties": {{"a": {HUGE}}}}}',
        f'{{"ts": 1750000000, "properties": {{"zones": [1, {HUGE}]}}}}',
        f'{{"ts": 1750000000, "properties": {{"voltage": {{"a": {HUGE}}}}}}}',
    ],
    ids=["ts", "property", "array", "named"],
)
def test_integers_beyond_float_range_are_rejected(raw: str) -> None:
    assert reason_of(raw.encode()) in ("wrong_type", "bad_timestamp")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
def test_non_finite_numbers_are_malformed_at_any_depth(literal: str) -> None:
    # A cmd/ack payload goes through the same decoder and its properties are not checked one by one.
    raw = f'{{"cmdId": "c1", "status": "ok", "properties": {{"zones": {{"top": [1.5, {literal}]}}}}}}'.encode()
    with pytest.raises(RejectedMessage) as exc:
        decode_json(raw, 4096)
    assert exc.value.reason == "malformed_json"
    assert decode_json(raw.replace(literal.encode(), b"2.5"), 4096)["properties"]["zones"]["top"] == [1.5, 2.5]


@settings(max_examples=100, deadline=None)
@given(st.recursive(st.floats() | st.integers() | st.text(max_size=5),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c, max_size=4),
                    max_leaves=12))
def test_decoded_json_holds_only_finite_numbers(doc: Any) -> None:
    raw = json.dumps(doc).encode()
    try:
        out = decode_json(raw, 2**20)
    except RejectedMessage as exc:
        assert exc.reason == "malformed_json"
        assert b"NaN" in raw or b"Infinity" in raw
    else:
        assert out == doc
        json.dumps(out, allow_nan=False)  # what comes in can always be written out as JSON


def test_long_digit_runs_decode_exactly() -> None:
    # Integers beyond 64 bits and long digit runs in strings take the standard decoder's path.
    raw = b'{"a": 18446744073709551616, "b": "12345678901234567890", "c": [1.5, -9223372036854775809]}'
    doc = decode_json(raw, 4096)
    assert doc == {"a": 2**64, "b": "12345678901234567890", "c": [1.5, -(2**63) - 1]}
    assert type(doc["a"]) is int and type(doc["c"][1]) is int


def test_int64_values_keep_their_exact_value() -> None:
    (sample,) = parse(props(hi=2**63 - 1, lo=-(2**63))).samples
    assert sample.properties == {"hi": 2**63 - 1, "lo": -(2**63)}
    assert all(type(v) is int for v in sample.properties.values())


# The topic level allows '-' and '.', feature names do not; a Thing stored with such a feature
# cannot be loaded back from the registry file.
@pytest.mark.parametrize("feature", ["thermal-1", "thermal.1", "1st", "", "f" * 65, "s\u0131cakl\u0131k"])
@pytest.mark.parametrize("payload_format", ["contract", "legacy"])
def test_feature_name_from_the_topic_must_be_a_valid_name(feature: str, payload_format: str) -> None:
    doc = props(a=1) if payload_format == "contract" else {"timestamp": TS, "properties": {"a": 1}}
    assert reason_of(doc, feature=feature, payload_format=payload_format) == "bad_name"


@pytest.mark.parametrize("feature", ["thermal", "_x", "Power_2", "f" * 64])
def test_valid_feature_names_from_the_topic(feature: str) -> None:
    assert [s.feature for s in parse(props(a=1), feature=feature).samples] == [feature]


@pytest.mark.parametrize(
    ("doc", "kw"),
    [
        (props(**{"temp\n": 1}), {}),
        (props(voltage={"a\n": 1}), {}),
        (props(a=1), {"feature": "thermal\n"}),
        ({"timestamp": TS, "thermal\n": {"t": 1}}, {"feature": None, "payload_format": "legacy"}),
    ],
    ids=["property", "named-number", "topic-feature", "legacy-feature"],
)
def test_a_name_with_a_trailing_newline_is_rejected(doc: Any, kw: dict[str, Any]) -> None:
    assert reason_of(doc, **kw) in ("bad_name", "wrong_type")


# ------------------------------------------------------------------ flatten / count_points


def test_flatten_gives_stored_paths() -> None:
    p: Properties = {"temperature": 182.5, "temperature_zones": [180.0, 185.5],
                     "voltage": {"a": 230.1, "b": 229.8}, "door_open": True, "mode": "bake"}
    assert flatten(p) == [
        ("temperature", 182.5),
        ("temperature_zones[0]", 180.0),
        ("temperature_zones[1]", 185.5),
        ("voltage.a", 230.1),
        ("voltage.b", 229.8),
        ("door_open", True),
        ("mode", "bake"),
    ]
    assert count_points(p) == 7


# ------------------------------------------------------------------ status


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"state": "online", "fw": "1.4.2", "ts": 1750000000}', Status("online", "1.4.2", 1_750_000_000.0)),
        (b'{"state": "offline"}', Status("offline", None, None)),
        (b'{"state": "online", "ip": "10.0.0.7"}', Status("online", None, None)),  # extra keys are fine
        (b"online", Status("online", None, None)),
        (b" offline\n", Status("offline", None, None)),
    ],
)
def test_parse_status(raw: bytes, expected: Status) -> None:
    status = parse_status(raw)
    assert status == expected
    assert status.ts is None or isinstance(status.ts, float)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"state": "sleeping"}', "wrong_shape"),
        (b'{"fw": "1.0"}', "wrong_shape"),
        (b'"online"', "wrong_shape"),
        (b"[1]", "wrong_shape"),
        (b"ONLINE", "malformed_json"),
        (b"{", "malformed_json"),
        (b'{"state": "online", "fw": 1}', "wrong_type"),
        (b'{"state": "online", "fw": "' + b"v" * 65 + b'"}', "wrong_type"),
        (b'{"state": "online", "ts": "now"}', "wrong_type"),
        (b'{"state": "online", "ts": true}', "wrong_type"),
        (b'{"state": "online", "ts": NaN}', "malformed_json"),
        (b'{"state": "online", "ts": 9223372036854775808}', "wrong_type"),
        (b'{"state": "online", "pad": "' + b"x" * 5000 + b'"}', "too_large"),
    ],
)
def test_parse_status_rejections(raw: bytes, reason: str) -> None:
    with pytest.raises(RejectedMessage) as exc:
        parse_status(raw)
    assert exc.value.reason == reason


# ------------------------------------------------------------------ property tests


def assert_contract(tel: Telemetry, *, increasing_seq: bool = True) -> None:
    """What every accepted message guarantees to the twin and the buffer.

    In the legacy shape every feature object of one message shares the message's seq."""
    assert isinstance(tel, Telemetry)
    assert tel.boot is None or (isinstance(tel.boot, str) and 1 <= len(tel.boot) <= 64)
    assert isinstance(tel.samples, tuple) and tel.samples
    last = -1
    for s in tel.samples:
        assert isinstance(s, Sample)
        assert NAME_RE.match(s.feature)
        assert type(s.ts) is float and math.isfinite(s.ts) and MIN_TS <= s.ts <= NOW + MAX_FUTURE_S
        if s.seq is not None:
            assert type(s.seq) is int and 0 <= s.seq < 2**63
            assert s.seq > last if increasing_seq else s.seq >= last
            last = s.seq
        assert isinstance(s.properties, dict) and 1 <= len(s.properties) <= MAX_PROPERTIES
        for name, value in s.properties.items():
            assert NAME_RE.match(name)
            assert_value(value)
    assert tel.point_count == sum(len(flatten(s.properties)) for s in tel.samples)


def is_number(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def assert_value(value: Any) -> None:
    if type(value) is bool:
        return
    if type(value) is str:
        assert len(value) <= MAX_STRING
    elif type(value) is list:
        assert 1 <= len(value) <= MAX_ARRAY and all(is_number(v) for v in value)
    elif type(value) is dict:
        assert 1 <= len(value) <= 32
        assert all(NAME_RE.match(k) and is_number(v) for k, v in value.items())
    else:
        assert is_number(value), value


def parse_any(raw: bytes, payload_format: str) -> None:
    """The property: a valid Telemetry or a RejectedMessage with a known reason, nothing else."""
    try:
        tel = parse_telemetry(raw, feature="thermal", payload_format=payload_format,  # type: ignore[arg-type]
                              now=NOW)
    except RejectedMessage as exc:
        assert exc.reason in REASONS
    else:
        assert_contract(tel, increasing_seq=payload_format == "contract")


FORMATS = st.sampled_from(["contract", "legacy"])
# Integers are kept within the float range: beyond it see test_integers_beyond_float_range_are_rejected.
INTS = st.integers(min_value=-(2**1000), max_value=2**1000)
SCALARS = st.none() | st.booleans() | st.floats() | INTS | st.text(max_size=300)
JSON = st.recursive(SCALARS, lambda children: st.lists(children, max_size=6)
                    | st.dictionaries(st.text(max_size=8), children, max_size=6), max_leaves=30)

# Valid parts, generated from the contract itself.
NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,63}", fullmatch=True)
NUMBER = st.floats(allow_nan=False, allow_infinity=False) | st.integers(min_value=-(2**63), max_value=2**63 - 1)
VALUE = (st.booleans() | NUMBER | st.text(max_size=MAX_STRING)
         | st.lists(NUMBER, min_size=1, max_size=MAX_ARRAY)
         | st.dictionaries(NAMES, NUMBER, min_size=1, max_size=32))
PROPERTIES = st.dictionaries(NAMES, VALUE, min_size=1, max_size=8)
VALID_TS = st.floats(min_value=MIN_TS, max_value=NOW + MAX_FUTURE_S) | st.integers(int(MIN_TS), int(NOW))
BOOT = st.none() | st.text(min_size=1, max_size=64) | st.integers(min_value=0, max_value=10**30)
SEQ = st.integers(min_value=0, max_value=2**63 - 1)
FEATURE_NAMES = NAMES.filter(lambda n: n not in {"device_id", "timestamp", "ts", "seq", "boot"})

# Nearly valid parts: usually right, sometimes wrong in one place, so the deep checks are reached.
KEYS = NAMES | st.text(max_size=70) | st.sampled_from(["ts", "seq", "boot", "properties", "samples", "timestamp"])
TS_NEAR = VALID_TS | st.floats(min_value=MIN_TS - 10, max_value=NOW + MAX_FUTURE_S + 10) | st.just(NOW * 1000) | JSON
SEQ_NEAR = SEQ | st.integers(min_value=-2, max_value=2**64) | JSON
BOOT_NEAR = BOOT | st.text(max_size=70) | JSON
VALUE_NEAR = (VALUE | SCALARS | st.lists(NUMBER | SCALARS, max_size=MAX_ARRAY + 2)
              | st.dictionaries(KEYS, NUMBER | SCALARS, max_size=34) | JSON)
PROPS_NEAR = PROPERTIES | st.dictionaries(NAMES, VALUE_NEAR, min_size=1, max_size=4) | st.dictionaries(
    KEYS, VALUE_NEAR, max_size=4) | JSON
SAMPLE_NEAR = st.fixed_dictionaries({"ts": TS_NEAR, "properties": PROPS_NEAR}, optional={"seq": SEQ_NEAR})
EXTRA = st.dictionaries(KEYS, JSON, max_size=2)
CONTRACT_NEAR = (
    st.builds(lambda d, b: {**d, **b}, SAMPLE_NEAR, st.fixed_dictionaries({}, optional={"boot": BOOT_NEAR}))
    | st.fixed_dictionaries({"samples": st.lists(SAMPLE_NEAR, min_size=1, max_size=4) | JSON},
                            optional={"boot": BOOT_NEAR})
    | st.builds(lambda d, e: {**d, **e}, SAMPLE_NEAR, EXTRA)
)
LEGACY_NEAR = st.builds(
    lambda head, features, extra: {**head, **features, **extra},
    st.fixed_dictionaries({"timestamp": TS_NEAR},
                          optional={"device_id": st.just("esp32-a1") | JSON, "seq": SEQ_NEAR, "boot": BOOT_NEAR}),
    st.dictionaries(FEATURE_NAMES, PROPS_NEAR, max_size=3),
    st.just({}) | EXTRA,
)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300), FORMATS)
def test_arbitrary_bytes_are_parsed_or_rejected(raw: bytes, payload_format: str) -> None:
    parse_any(raw, payload_format)


@settings(max_examples=100, deadline=None)
@given(JSON, FORMATS)
def test_arbitrary_json_is_parsed_or_rejected(doc: Any, payload_format: str) -> None:
    parse_any(json.dumps(doc).encode(), payload_format)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(CONTRACT_NEAR | LEGACY_NEAR, FORMATS)
def test_nearly_valid_documents_are_parsed_or_rejected(doc: Any, payload_format: str) -> None:
    parse_any(json.dumps(doc).encode(), payload_format)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(PROPERTIES, VALID_TS, st.none() | SEQ, BOOT)
def test_valid_single_samples_round_trip(properties: dict[str, Any], ts: float, seq: int | None,
                                         boot: str | int | None) -> None:
    doc: dict[str, Any] = {"ts": ts, "properties": properties}
    if seq is not None:
        doc["seq"] = seq
    if boot is not None:
        doc["boot"] = boot
    tel = parse(doc, max_bytes=1 << 22)
    assert tel == Telemetry(None if boot is None else str(boot), (Sample("thermal", float(ts), seq, properties),))
    assert_contract(tel)
    assert tel.point_count == count_points(properties) == len(flatten(properties))


@st.composite
def batches(draw: st.DrawFn) -> tuple[dict[str, Any], list[tuple[float, int | None, dict[str, Any]]]]:
    n = draw(st.integers(min_value=1, max_value=4))
    ordered = sorted(draw(st.lists(SEQ, min_size=n, max_size=n, unique=True)))
    keep = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    seqs = [s if k else None for s, k in zip(ordered, keep, strict=True)]
    samples = [(draw(VALID_TS), s, draw(PROPERTIES)) for s in seqs]
    doc: dict[str, Any] = {"samples": [{"ts": ts, "properties": p, **({"seq": s} if s is not None else {})}
                                       for ts, s, p in samples]}
    return doc, samples


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batches(), st.text(min_size=1, max_size=64))
def test_valid_batches_round_trip(batch: tuple[dict[str, Any], list[Any]], boot: str) -> None:
    doc, samples = batch
    doc["boot"] = boot
    tel = parse(doc, max_bytes=1 << 22)
    assert tel.boot == boot
    assert [(s.feature, s.ts, s.seq, s.properties) for s in tel.samples] == [
        ("thermal", float(ts), seq, p) for ts, seq, p in samples
    ]
    assert_contract(tel)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(FEATURE_NAMES, PROPERTIES, min_size=1, max_size=3), VALID_TS, st.none() | SEQ)
def test_valid_legacy_payloads_round_trip(features: dict[str, dict[str, Any]], ts: float, seq: int | None) -> None:
    doc: dict[str, Any] = {"device_id": "esp32-a1", "timestamp": ts, **features}
    if seq is not None:
        doc["seq"] = seq
    tel = parse(doc, feature=None, payload_format="legacy", device_id="esp32-a1", max_bytes=1 << 22)
    assert tel.samples == tuple(Sample(name, float(ts), seq, p) for name, p in features.items())
    assert_contract(tel, increasing_seq=False)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(PROPERTIES)
def test_count_points_equals_the_number_of_flattened_paths(properties: dict[str, Any]) -> None:
    paths = flatten(properties)
    assert count_points(properties) == len(paths)
    assert len({p for p, _ in paths}) == len(paths)  # paths are unique
