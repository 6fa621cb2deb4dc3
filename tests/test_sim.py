"""The fleet simulator against a real Mosquitto: the payload contract, batches, status and Last Will,
fault specs and their ground truth, broker outages, and reproducible runs."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import random
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.broker import write_password_file
from gateway.sim import (
    FaultSpec,
    FleetOptions,
    FleetStats,
    RandomFaults,
    SimError,
    fleet_things,
    parse_faults,
    run_fleet,
)
from gateway.sim.equipment import FEATURES, make_model, production_level
from gateway.sim.faults import FaultSchedule
from tests.helpers import private_mosquitto, unique_site

Broker = tuple[str, int]


# ----------------------------------------------------------------------------------------- helpers
@dataclass
class Seen:
    topic: str
    doc: Any
    retain: bool

    @property
    def parts(self) -> list[str]:
        return self.topic.split("/")


async def _record(client: aiomqtt.Client, seen: list[Seen]) -> None:
    async for m in client.messages:
        payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
        seen.append(Seen(m.topic.value, json.loads(payload), m.retain))


async def _quiet(seen: list[Seen], for_s: float = 0.3) -> None:
    """Wait until nothing new has arrived for `for_s`."""
    while True:
        n = len(seen)
        await asyncio.sleep(for_s)
        if len(seen) == n:
            return


@contextlib.asynccontextmanager
async def spy(broker: Broker, pattern: str) -> AsyncIterator[list[Seen]]:
    """Everything published on `pattern` from entering until the fleet has gone quiet."""
    seen: list[Seen] = []
    async with aiomqtt.Client(*broker) as client:
        await client.subscribe(pattern, qos=1)
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(_record(client, seen))
            try:
                yield seen
                await _quiet(seen)
            finally:
                task.cancel()


async def retained(broker: Broker, pattern: str, expect: int) -> list[Seen]:
    """The retained messages a client that subscribes now receives."""
    seen: list[Seen] = []
    async with aiomqtt.Client(*broker) as client:
        await client.subscribe(pattern, qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await _record_until(client, seen, expect)
    return seen


async def _record_until(client: aiomqtt.Client, seen: list[Seen], expect: int) -> None:
    async for m in client.messages:
        payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
        seen.append(Seen(m.topic.value, json.loads(payload), m.retain))
        if len(seen) >= expect:
            return


def telemetry(seen: list[Seen]) -> list[Seen]:
    return [s for s in seen if s.parts[-1] == "telemetry"]


def statuses(seen: list[Seen], equipment_id: str) -> list[dict[str, Any]]:
    return [s.doc for s in seen if s.parts[-1] == "status" and s.parts[3] == equipment_id]


def samples_of(s: Seen) -> list[dict[str, Any]]:
    samples: list[dict[str, Any]] = s.doc.get("samples", [s.doc])
    return samples


def fleet(mosquitto: Broker, **options: Any) -> FleetOptions:
    """A fleet of a site of its own on `mosquitto`."""
    return FleetOptions(site=unique_site(), host=mosquitto[0], port=mosquitto[1], **options)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _between(lo: float, hi: float) -> Callable[[Any], bool]:
    return lambda v: _number(v) and lo <= v <= hi


def _phases(lo: float, hi: float) -> Callable[[Any], bool]:
    in_range = _between(lo, hi)
    return lambda v: isinstance(v, dict) and sorted(v) == ["a", "b", "c"] and all(in_range(x) for x in v.values())


def _text(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 256


SCHEMA: dict[str, dict[str, Callable[[Any], bool]]] = {
    "thermal": {"temperature_zones": lambda v: isinstance(v, list) and len(v) == 3 and all(_between(20, 400)(x)
                                                                                          for x in v),
                "setpoint": _between(50, 300)},
    "electrical": {"voltage": _phases(200, 260), "current": _phases(0, 400), "power_factor": _between(0.8, 1.0),
                   "power_kw": _between(0, 200)},
    "motor": {"current": _between(0, 100), "speed_rpm": _between(0, 300)},
    "vibration": {"rms": _between(0, 20), "peak": _between(0, 60)},
    "drive": {"speed_mps": _between(0, 2), "motor_current": _between(0, 50)},
    "climate": {"temperature": _between(-10, 60), "humidity": _between(0, 100)},
    "business_context": {"current_batch": _text, "recipe": _text, "operator_id": _text},
}


def check_properties(feature: str, props: Any) -> None:
    assert isinstance(props, dict) and set(props) == set(SCHEMA[feature]), (feature, props)
    for name, ok in SCHEMA[feature].items():
        assert ok(props[name]), (feature, name, props[name])


def local_epoch(hour: int) -> float:
    """Today at `hour`:00 local time, for a pinned simulated clock."""
    t = time.localtime()
    return time.mktime((t.tm_year, t.tm_mon, t.tm_mday, hour, 0, 0, 0, 0, -1))


def accounted(stats: FleetStats) -> None:
    assert stats.published == stats.confirmed + stats.dropped + stats.lost_in_dropout + stats.unconfirmed, stats


# ----------------------------------------------------------------------------------------- naming
def test_nodes_cycle_through_types_and_keep_their_names_when_a_fleet_is_split() -> None:
    whole = fleet_things(FleetOptions(site="s", nodes=7))
    assert whole[:6] == [("oven-001", "oven"), ("mixer-002", "mixer"), ("conveyor-003", "conveyor"),
                         ("proofer-004", "proofer"), ("cooler-005", "cooler"), ("oven-006", "oven")]
    second_half = fleet_things(FleetOptions(site="s", nodes=3, start_index=5))
    assert second_half == whole[4:7]
    assert fleet_things(FleetOptions(site="s", nodes=2, types=("cooler",))) == [("cooler-001", "cooler"),
                                                                               ("cooler-002", "cooler")]


def test_invalid_options_are_all_reported_at_once() -> None:
    with pytest.raises(ValueError) as err:
        FleetOptions(site="a/b", nodes=0, rate_hz=0, batch=0, types=("toaster",))
    for key in ("site", "nodes", "rate_hz", "batch", "types"):
        assert f"{key}:" in str(err.value)
    with pytest.raises(ValueError, match=r"no node 'oven-009'"):
        FleetOptions(site="s", nodes=5, faults=parse_faults("drift:oven-009@1"))
    with pytest.raises(ValueError, match=r"phase_imbalance cannot happen to a mixer"):
        FleetOptions(site="s", nodes=5, faults=parse_faults("phase_imbalance:mixer-002@1"))
    with pytest.raises(ValueError, match=r"overtemperature cannot happen to a conveyor"):
        FleetOptions(site="s", nodes=5, faults=parse_faults("overtemperature:conveyor-003@1"))


# ----------------------------------------------------------------------------------------- payloads
async def test_single_payloads_follow_the_contract(mosquitto: Broker) -> None:
    opts = fleet(mosquitto, nodes=5, rate_hz=10, duration_s=1.5, seed=3, context_every_s=0.5)
    site = opts.site
    types = dict(fleet_things(opts))
    start = time.time()
    async with spy(mosquitto, f"openegiz/{site}/#") as seen:
        async with asyncio.TaskGroup() as tg:
            run = tg.create_task(run_fleet(opts))
            await asyncio.sleep(0.7)
            live = await retained(mosquitto, f"openegiz/{site}/+/+/status", expect=5)
        stats = run.result()
    end = time.time()

    assert sorted(s.parts[3] for s in live) == sorted(types)
    assert all(s.retain and s.doc["state"] == "online" for s in live), live

    per_node: dict[str, list[Seen]] = {}
    for s in telemetry(seen):
        _, topic_site, etype, eid, feature, _ = s.parts
        assert topic_site == site and types[eid] == etype
        assert feature in (*FEATURES[etype], "business_context")
        assert set(s.doc) == {"ts", "seq", "boot", "properties"}
        assert isinstance(s.doc["ts"], float) and start - 0.01 <= s.doc["ts"] <= end
        assert isinstance(s.doc["seq"], int) and isinstance(s.doc["boot"], str) and s.doc["boot"]
        check_properties(feature, s.doc["properties"])
        per_node.setdefault(eid, []).append(s)

    assert set(per_node) == set(types)
    for eid, msgs in per_node.items():
        assert [m.doc["seq"] for m in msgs] == list(range(1, len(msgs) + 1)), eid  # +1 across features
        assert {m.doc["boot"] for m in msgs} == {stats.boots[eid]}
        assert stats.last_seq[eid] == len(msgs)
        assert sum(m.parts[4] == "business_context" for m in msgs) >= 2  # a new batch every 0.5 s
        status = statuses(seen, eid)
        assert [d["state"] for d in status] == ["online", "offline"]  # connect, then a clean stop
        assert all(d["fw"].startswith("sim-") and isinstance(d["ts"], float) for d in status)

    assert stats.confirmed == len(telemetry(seen)) + 2 * opts.nodes
    assert stats.dropped == stats.unconfirmed == stats.reconnects == 0
    assert stats.points == sum(sum(len(v) if isinstance(v, list | dict) else 1 for v in s.doc["properties"].values())
                               for s in telemetry(seen))
    accounted(stats)
    after = await retained(mosquitto, f"openegiz/{site}/+/+/status", expect=5)
    assert len(after) == 5 and all(s.retain and s.doc["state"] == "offline" for s in after)


async def test_batched_payloads_carry_consecutive_samples(mosquitto: Broker) -> None:
    opts = fleet(mosquitto, nodes=3, rate_hz=20, duration_s=1.2, seed=5, batch=4)
    site = opts.site
    async with spy(mosquitto, f"openegiz/{site}/+/+/+/telemetry") as seen:
        stats = await run_fleet(opts)

    batches = [s for s in seen if s.parts[4] != "business_context"]
    assert batches and all(set(s.doc) == {"boot", "samples"} for s in batches)
    streams: dict[tuple[str, str], list[int]] = {}
    for s in batches:
        streams.setdefault((s.parts[3], s.parts[4]), []).append(len(s.doc["samples"]))
    for sizes in streams.values():  # only the last flush of each node's feature, at stop, may be partial
        assert all(n == 4 for n in sizes[:-1]), sizes
    for s in batches:
        samples = s.doc["samples"]
        assert 1 <= len(samples) <= 4
        assert all(set(x) == {"ts", "seq", "properties"} for x in samples)
        assert [x["seq"] for x in samples] == list(range(samples[0]["seq"], samples[0]["seq"] + len(samples)))
        assert [x["ts"] for x in samples] == sorted(x["ts"] for x in samples)
        for x in samples:
            check_properties(s.parts[4], x["properties"])
    for eid, _ in fleet_things(opts):
        seqs = [x["seq"] for s in seen if s.parts[3] == eid for x in samples_of(s)]
        assert seqs == list(range(1, stats.last_seq[eid] + 1)), eid  # in order as they leave, nothing missing
    sample_count = sum(len(samples_of(s)) for s in seen)
    assert sample_count == sum(stats.last_seq.values())
    accounted(stats)


async def test_shared_connection_keeps_statuses_and_answers_commands(mosquitto: Broker) -> None:
    opts = fleet(mosquitto, nodes=3, rate_hz=10, duration_s=1.5, seed=9, shared_connection=True)
    site = opts.site
    async with spy(mosquitto, f"openegiz/{site}/#") as seen:
        async with asyncio.TaskGroup() as tg:
            run = tg.create_task(run_fleet(opts))
            await asyncio.sleep(0.5)
            async with aiomqtt.Client(*mosquitto) as gateway:
                base = f"openegiz/{site}"
                await gateway.publish(f"{base}/oven/oven-001/cmd", json.dumps(
                    {"cmdId": "c1", "feature": "thermal", "desiredProperties": {"setpoint": 210.0}}), qos=1)
                await gateway.publish(f"{base}/mixer/mixer-002/cmd", json.dumps(
                    {"cmdId": "c2", "feature": "motor", "desiredProperties": {"colour": "red"}}), qos=1)
        stats = run.result()

    acks = {s.doc["cmdId"]: s.doc for s in seen if s.topic.endswith("/cmd/ack")}
    assert acks["c1"] == {"cmdId": "c1", "status": "ok", "properties": {"setpoint": 210.0}}
    assert acks["c2"]["status"] == "rejected" and "colour" in acks["c2"]["detail"]
    setpoints = [s.doc["properties"]["setpoint"] for s in seen if s.parts[4:] == ["thermal", "telemetry"]]
    assert setpoints[0] == 190.0 and setpoints[-1] == 210.0
    for eid, _ in fleet_things(opts):
        assert [d["state"] for d in statuses(seen, eid)] == ["online", "offline"]
        seqs = [s.doc["seq"] for s in telemetry(seen) if s.parts[3] == eid]
        assert seqs == list(range(1, stats.last_seq[eid] + 1))
    accounted(stats)


# ----------------------------------------------------------------------------------------- faults
async def test_dropout_fires_the_last_will_and_the_node_returns_with_a_new_boot(mosquitto: Broker,
                                                                                  tmp_path: Path) -> None:
    truth = tmp_path / "truth.jsonl"
    opts = fleet(mosquitto, nodes=3, rate_hz=10, duration_s=2.5, seed=1, truth_path=truth,
                 faults=parse_faults("dropout:conveyor-003@0.5+1"))
    site = opts.site
    status_topic = f"openegiz/{site}/conveyor/conveyor-003/status"
    async with spy(mosquitto, f"openegiz/{site}/#") as seen:
        async with asyncio.TaskGroup() as tg:
            run = tg.create_task(run_fleet(opts))
            await asyncio.sleep(1.0)  # in the middle of the dropout
            during = await retained(mosquitto, status_topic, expect=1)
        stats = run.result()

    assert len(during) == 1 and during[0].retain
    assert during[0].doc == {"state": "offline", "fw": during[0].doc["fw"]}  # the Last Will (no stale ts)
    states = statuses(seen, "conveyor-003")
    assert [d["state"] for d in states] == ["online", "offline", "online", "offline"]
    assert "ts" not in states[1] and "ts" in states[3]  # the broker's Last Will, then a clean stop
    conveyor = [s.doc for s in telemetry(seen) if s.parts[3] == "conveyor-003"]
    boots = list(dict.fromkeys(d["boot"] for d in conveyor))
    assert len(boots) == 2 and boots[1] == stats.boots["conveyor-003"]
    for boot in boots:
        assert [d["seq"] for d in conveyor if d["boot"] == boot] == list(
            range(1, sum(d["boot"] == boot for d in conveyor) + 1))
    silence = max(b["ts"] - a["ts"] for a, b in itertools.pairwise(conveyor))
    assert 0.8 <= silence <= 1.4
    assert stats.reconnects == 0  # a dropout is the node's doing, not the broker's
    for eid in ("oven-001", "mixer-002"):  # the other nodes never noticed
        assert [d["state"] for d in statuses(seen, eid)] == ["online", "offline"]
    (line,) = [json.loads(x) for x in truth.read_text().splitlines()]
    assert line["thing"] == f"{site}:conveyor-003" and line["fault"] == "dropout"
    assert (line["feature"], line["property"]) == ("connectivity", "state")
    assert 0.8 <= line["end"] - line["start"] <= 1.3
    accounted(stats)


async def test_faults_bend_the_signals_and_are_written_to_the_ground_truth(mosquitto: Broker,
                                                                           tmp_path: Path) -> None:
    truth = tmp_path / "truth.jsonl"
    opts = fleet(mosquitto, nodes=2, rate_hz=20, duration_s=2.0, seed=2, truth_path=truth, clock_start=local_epoch(10),
                 faults=parse_faults("overtemperature:oven-001@0.3+1.2=40,stuck:mixer-002@0.5+30"))
    site = opts.site
    start = time.time()
    async with spy(mosquitto, f"openegiz/{site}/+/+/+/telemetry") as seen:
        stats = await run_fleet(opts)
        stopped = time.time()

    # Fault times count from the run's first sampling round, which follows the nodes' connections
    first = min(s.doc["ts"] for s in seen if s.parts[4] in ("thermal", "vibration"))
    assert first >= start
    start = first
    lines = {x["fault"]: x for x in map(json.loads, truth.read_text().splitlines())}
    assert set(lines) == {"overtemperature", "stuck"}
    over, stuck = lines["overtemperature"], lines["stuck"]
    assert (over["thing"], over["feature"], over["property"]) == (f"{site}:oven-001", "thermal",
                                                                   "temperature_zones[1]")
    assert 0.25 <= over["start"] - start <= 0.6 and 1.05 <= over["end"] - over["start"] <= 1.4
    assert (stuck["thing"], stuck["feature"], stuck["property"]) == (f"{site}:mixer-002", "vibration", "rms")
    assert stopped - 0.3 <= stuck["end"] <= stopped  # still going at stop: ended with the run

    zones = [(s.doc["ts"] - start, s.doc["properties"]["temperature_zones"][1])
             for s in seen if s.parts[4] == "thermal"]
    before = [z for t, z in zones if t < 0.25]
    hot = [z for t, z in zones if over["start"] - start + 0.5 < t < over["end"] - start - 0.05]
    after = [z for t, z in zones if t > over["end"] - start + 0.1]
    assert before and hot and after
    assert 35 <= sum(hot) / len(hot) - sum(before) / len(before) <= 45
    assert abs(sum(after) / len(after) - sum(before) / len(before)) < 5
    vibration = [s.doc["properties"] for s in seen if s.parts[4] == "vibration" and s.doc["ts"] > stuck["start"]]
    assert len(vibration) > 10 and all(v == vibration[0] for v in vibration)  # frozen
    assert stats.faults == 2
    accounted(stats)


def test_random_faults_follow_the_seed() -> None:
    things = fleet_things(FleetOptions(site="s", nodes=10))

    def draw(seed: int) -> list[tuple[str, str, float, float]]:
        schedule = FaultSchedule((RandomFaults(6.0),), things, random.Random(seed))
        out = []
        for minute in range(10 * 60):  # ten simulated hours
            started, _ = schedule.update(minute * 60.0, 0.0)
            out += [(f.kind, f.equipment_id, f.start_s, f.end_s) for f in started]
        return out

    first = draw(1)
    assert first == draw(1) and first != draw(2)
    assert 30 <= len(first) <= 90  # about six an hour
    assert all(kind != "phase_imbalance" or eid.startswith("oven") for kind, eid, *_ in first)


# ----------------------------------------------------------------------------------------- fault specs
def test_fault_specs_parse() -> None:
    assert parse_faults("") == parse_faults(" , ") == ()
    specs = parse_faults("drift:oven-001@10+30, random:2 ,spike:mixer-002@0=3.5,stuck:conveyor-003@7.25")
    assert specs == (FaultSpec("drift", "oven-001", 10.0, 30.0), RandomFaults(2.0),
                     FaultSpec("spike", "mixer-002", 0.0, 60.0, 3.5), FaultSpec("stuck", "conveyor-003", 7.25))
    assert specs[0].end_s == 40.0
    assert parse_faults("overtemperature:oven-001@30+60=-5")[0] == FaultSpec("overtemperature", "oven-001",
                                                                             30.0, 60.0, -5.0)


@pytest.mark.parametrize("bad", [
    "drift:oven-001", "melt:oven-001@1", "drift:@1", "random:x", "random:", "drift:oven-001@1+0",
    "drift:oven-001@-1", "drift:oven-001@1+", "drift:oven-001@1e3", "stuck:oven-001@1+2=3", "dropout:oven-001@1=1",
    "drift:oven 001@1", "random:oven-001@1", "drift:oven-001@nan", "drift:oven-001@1+inf",
])
def test_bad_fault_items_are_named_in_the_error(bad: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        parse_faults(f"drift:oven-001@1, {bad}")


@given(st.text(max_size=80) | st.lists(st.sampled_from(
    ["drift", "stuck", "random", ":", "@", "+", "=", ",", "oven-001", "1", "0.5", "-", "e9", " ", ".", "nan"]),
    max_size=12).map("".join))
def test_the_fault_parser_only_ever_raises_value_error(spec: str) -> None:
    try:
        parsed = parse_faults(spec)
    except ValueError:
        return
    for item in parsed:
        assert isinstance(item, FaultSpec | RandomFaults)


_decimal = st.from_regex(r"\A\d{1,6}(\.\d{1,3})?\Z")


@settings(max_examples=200)
@given(st.sampled_from(["drift", "spike", "phase_imbalance", "overtemperature"]),
       st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,20}\Z"), _decimal, _decimal, _decimal)
def test_well_formed_items_parse_to_their_values(kind: str, eid: str, start: str, duration: str,
                                                 magnitude: str) -> None:
    item = f"{kind}:{eid}@{start}+{duration}={magnitude}"
    if float(duration) == 0:
        with pytest.raises(ValueError, match=re.escape(item)):
            parse_faults(item)
        return
    (spec,) = parse_faults(item)
    assert spec == FaultSpec(kind, eid, float(start), float(duration), float(magnitude))


# ----------------------------------------------------------------------------------------- signals
def test_the_daily_cycle_idles_at_night_and_produces_by_day() -> None:
    assert production_level(2) == 0 and production_level(10) == 1 and production_level(4.5) == 0.5
    assert production_level(13.25) == pytest.approx(0.3) and production_level(23) == 0

    def first(etype: str, hour: float) -> dict[str, Any]:
        return make_model(etype, f"{etype}-001", random.Random(1)).read(hour, 0.0, 0.5)

    night, day = first("oven", 2), first("oven", 10)
    assert night["thermal"]["temperature_zones"][1] < 90 < 180 < day["thermal"]["temperature_zones"][1]
    assert day["electrical"]["power_kw"] > 2 * night["electrical"]["power_kw"]
    assert first("mixer", 2)["motor"]["speed_rpm"] == 0
    assert first("conveyor", 2)["drive"]["speed_mps"] < 0.02 < 0.4 < first("conveyor", 10)["drive"]["speed_mps"]
    assert first("proofer", 10)["climate"]["temperature"] > first("proofer", 2)["climate"]["temperature"] + 8


async def test_time_scale_speeds_up_the_daily_cycle(mosquitto: Broker) -> None:
    opts = fleet(mosquitto, nodes=1, rate_hz=10, duration_s=1.0, seed=4, clock_start=local_epoch(4),
                 time_scale=7200)  # 04:00 → 06:00
    async with spy(mosquitto, f"openegiz/{opts.site}/+/+/thermal/telemetry") as seen:
        await run_fleet(opts)
    zone = [s.doc["properties"]["temperature_zones"][1] for s in seen]
    assert zone[0] < 90 and zone[-1] > 170  # the oven heated up for the morning shift


async def test_a_seed_reproduces_the_readings_but_never_the_boot(mosquitto: Broker) -> None:
    async def readings(seed: int) -> tuple[dict[tuple[str, str, int], Any], FleetStats]:
        for _attempt in range(3):  # a run that missed a tick (a busy machine) samples other moments: run again
            opts = fleet(mosquitto, nodes=3, rate_hz=20, duration_s=0.6, seed=seed, clock_start=local_epoch(10),
                         context_every_s=0.2)
            site = opts.site
            async with spy(mosquitto, f"openegiz/{site}/+/+/+/telemetry") as seen:
                stats = await run_fleet(opts)
            if stats.late_ticks == 0:
                break
        assert stats.late_ticks == 0, "the machine was too busy to sample on time, three times"
        return {(s.parts[3], s.parts[4], s.doc["seq"]): s.doc["properties"] for s in seen}, stats

    (a, stats_a), (b, stats_b), (c, _) = [await readings(seed) for seed in (42, 42, 43)]
    common = a.keys() & b.keys()
    assert len(common) >= 0.9 * min(len(a), len(b))
    assert all(a[k] == b[k] for k in common)
    assert any(a[k] != c[k] for k in a.keys() & c.keys())
    assert set(stats_a.boots.values()).isdisjoint(stats_b.boots.values())


# ----------------------------------------------------------------------------------------- outages
@dataclass
class Outage:
    """A run against our own broker, watched by a subscriber whose session survives broker restarts."""

    stats: FleetStats
    options: FleetOptions
    received: list[Seen]

    def first_seqs(self, equipment_id: str) -> list[int]:
        """Seqs in the order they first arrived (a re-send may repeat a message, never reorder)."""
        seqs = [x["seq"] for s in self.received if s.parts[3] == equipment_id for x in samples_of(s)]
        return list(dict.fromkeys(seqs))


async def run_through_outages(tmp_path: Path, *, down_at_start_s: float, restart_at_s: float | None,
                              **options: Any) -> Outage:
    broker = private_mosquitto(tmp_path)
    address = (broker.host, broker.port)
    site = unique_site()
    received: list[Seen] = []

    async def persistent_spy() -> None:
        while True:
            try:
                async with aiomqtt.Client(*address, identifier=f"spy-{site}", clean_session=False) as client:
                    await client.subscribe(f"openegiz/{site}/+/+/+/telemetry", qos=1)
                    await _record(client, received)
            except aiomqtt.MqttError:
                await asyncio.sleep(0.05)

    opts = FleetOptions(site=site, port=broker.port, **options)
    await broker.start()
    try:
        async with asyncio.TaskGroup() as tg:
            watcher = tg.create_task(persistent_spy())
            await asyncio.sleep(0.3)
            if down_at_start_s:
                await broker.stop()
            run = tg.create_task(run_fleet(opts))
            if down_at_start_s:
                await asyncio.sleep(down_at_start_s)
                await broker.start()
            if restart_at_s is not None:
                await asyncio.sleep(restart_at_s - down_at_start_s)
                await broker.restart()
            stats = await run
            await _quiet(received, 0.5)
            watcher.cancel()
    finally:
        await broker.stop()
    accounted(stats)
    return Outage(stats, opts, received)


async def test_a_broker_restart_mid_stream_loses_nothing(tmp_path: Path) -> None:
    out = await run_through_outages(tmp_path, down_at_start_s=0, restart_at_s=1.0, nodes=3, rate_hz=20,
                                    duration_s=2.5, seed=6)
    assert out.stats.reconnects >= 3 and out.stats.dropped == out.stats.unconfirmed == 0
    for eid, _ in fleet_things(out.options):
        assert out.first_seqs(eid) == list(range(1, out.stats.last_seq[eid] + 1)), eid


async def test_a_full_ring_drops_its_oldest_and_counts_them(tmp_path: Path) -> None:
    out = await run_through_outages(tmp_path, down_at_start_s=0.6, restart_at_s=None, nodes=3, rate_hz=20,
                                    duration_s=1.5, seed=6, ring_size=8)
    assert out.stats.dropped > 0 and out.stats.unconfirmed == 0
    missing = 0
    for eid, _ in fleet_things(out.options):
        firsts = out.first_seqs(eid)
        assert firsts == sorted(firsts), eid
        assert 1 not in firsts and out.stats.last_seq[eid] in firsts  # the oldest went, the newest arrived
        missing += out.stats.last_seq[eid] - len(firsts)
    assert missing == out.stats.dropped  # everything not dropped from the full ring was delivered


async def test_a_broker_refusing_the_credentials_stops_the_run(tmp_path: Path) -> None:
    passwords = tmp_path / "passwd"
    write_password_file(passwords, {"sim": "right"})
    async with private_mosquitto(tmp_path, allow_anonymous=False, password_file=passwords) as broker:
        opts = FleetOptions(site=unique_site(), nodes=2, rate_hz=5, duration_s=5, port=broker.port,
                            username="sim", password="wrong")
        with pytest.raises(SimError, match="refused"):
            await run_fleet(opts)
        ok = await run_fleet(FleetOptions(site=unique_site(), nodes=2, rate_hz=5, duration_s=0.3, port=broker.port,
                                          username="sim", password="right"))
        assert ok.confirmed == ok.published > 0
