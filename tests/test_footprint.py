"""The gateway's footprint: what it loads at start, its memory budget, and events sent in bursts."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import re
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import aiohttp
import aiomqtt
import pytest

from gateway.common.compact import SHARED_MAX, KeyedArray, Layout
from gateway.common.series import SeriesCatalogue, SeriesKey
from gateway.detect.core import DetectorCore
from gateway.detect.rules import RuleBook
from gateway.detect.stats import StatsSettings, StatsTier
from gateway.memory import THING_KIB, budget, check_budget, duckdb_limit_mb, machine_memory_mb
from gateway.twin.model import Feature
from tests.helpers import VIEWER_KEY, auth, gateway_process, telemetry, topic, wait_for

ROOT = Path(__file__).resolve().parent.parent


LAZY = ("scipy.stats", "scipy.optimize", "onnxruntime", "sklearn", "pandas", "pyarrow", "zeroconf", "cryptography",
        "asyncua", "snap7", "pymodbus", "pint")


def test_a_gateway_starts_without_the_libraries_only_some_features_need() -> None:
    # scipy.stats (remaining useful life) alone is about 90 MiB resident; ONNX Runtime is for models,
    # scikit-learn for training, pyarrow (about 28 MiB) for the uplink and history exports, zeroconf for
    # discovery, cryptography for TLS and signed models, the PLC libraries for connectors. None of them
    # may be loaded by the service itself.
    code = f"import sys, gateway.cli, gateway.service; print(sorted(m for m in {LAZY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


async def test_a_running_gateway_has_stored_readings_without_loading_arrow_or_pydantic(tmp_path: Path,
                                                                                       mosquitto) -> None:
    # The buffer's commits hand DuckDB NumPy columns: Arrow's libraries (about 28 MiB) stay out of a gateway
    # without an uplink even after it has stored points. The command line parses its options without
    # pydantic (typer 0.29 builds an adapter per parameter with it). Both would show in the memory map.
    gw = gateway_process(tmp_path, mosquitto[1])
    async with gw.run() as proc, aiohttp.ClientSession() as http, aiomqtt.Client(*mosquitto) as client:
        for seq in range(1, 21):
            await client.publish(topic(gw.site, "oven-1"), telemetry(seq, {"temperature": 180.0 + seq,
                                                                           "state": "baking"}), qos=1)
        deadline = time.monotonic() + 60
        while True:
            async with http.get(gw.url + "/metrics") as r:
                m = re.search(r"^egiz_buffer_points_total (\S+)$", await r.text(), re.M)
            if m and float(m.group(1)) >= 40:
                break
            assert time.monotonic() < deadline, "the gateway did not commit the readings"
            await asyncio.sleep(0.1)
        maps = await asyncio.to_thread(Path(f"/proc/{proc.pid}/maps").read_text)
    assert "duckdb" in maps  # the check can see what the process loaded
    assert "arrow" not in maps
    assert "pydantic" not in maps


def test_duckdb_memory_is_sized_to_the_machine(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        1000000 kB\nMemFree:          500000 kB\n")
    no_cgroup = tmp_path / "absent"
    pi = machine_memory_mb(meminfo, no_cgroup)
    assert pi == pytest.approx(976.6, abs=0.1)
    assert duckdb_limit_mb(0, pi) == 64  # a 1 GB Raspberry Pi: the floor
    assert duckdb_limit_mb(0, 2048) == 128
    assert duckdb_limit_mb(0, 24_000) == 256  # the ceiling
    assert duckdb_limit_mb(512, 1000) == 512  # an explicit setting wins
    assert duckdb_limit_mb(0, None) == 256
    cgroup = tmp_path / "memory.max"
    cgroup.write_text(f"{512 * 2**20}\n")
    assert machine_memory_mb(meminfo, cgroup) == 512  # a container's limit below the machine's memory
    cgroup.write_text("max\n")
    assert machine_memory_mb(meminfo, cgroup) == pi


def test_the_memory_budget_warns_on_a_small_machine_with_the_figures(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.memory")
    big = budget(resident=130, duckdb_mb=256, things=200, ws_queue=1024, machine_mb=24_000)
    check_budget(big)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    zero_w = budget(resident=200, duckdb_mb=64, things=10_000, ws_queue=1024, machine_mb=512)
    assert zero_w.over and zero_w.total_mb == pytest.approx(200 + 64 + 10_000 * THING_KIB / 1024 + 5, abs=0.1)
    check_budget(zero_w)
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1
    text = warning[0].getMessage()
    assert "512 MiB" in text and "buffer.memory_limit_mb" in text
    assert warning[0].budget_mb == round(zero_w.total_mb)  # type: ignore[attr-defined]


async def test_the_gateway_logs_its_memory_budget_at_start(mosquitto, start_gateway,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.memory")
    gw = await start_gateway(mosquitto)
    records = [r for r in caplog.records if r.name == "gateway.memory"]
    assert records, "no memory budget logged at start"
    r = records[0]
    assert r.resident_mb > 20 and r.duckdb_limit_mb == gw.service.buffer.memory_limit_mb  # type: ignore[attr-defined]
    assert 64 <= gw.service.buffer.memory_limit_mb <= 256


async def test_events_of_every_size_reach_a_subscribe_all_client_whole_and_in_order(mosquitto, start_gateway):
    # Events go out in bursts written as whole WebSocket frames: frames with 7-bit, 16-bit and 64-bit
    # lengths must each arrive as one intact message, in order, among hundreds of small ones.
    gw = await start_gateway(mosquitto, **{"ingest.max_payload_bytes": 400_000, "ingest.max_series_per_thing": 20_000})
    site = gw.site
    sizes = {"small": {"v": 1.0},
             "medium": {f"p{i}": [float(i)] * 8 for i in range(20)},  # a few hundred bytes
             "large": {f"p{i}": [12345.5 + i] * 64 for i in range(256)}}  # about 150 kB
    async with aiohttp.ClientSession() as http, http.ws_connect(gw.url + "/api/v1/ws",
                                                                headers=auth(VIEWER_KEY)) as ws:
        await ws.send_json({"action": "subscribe"})
        assert (await ws.receive_json(timeout=5))["event"] == "Subscribed"
        got: list[dict] = []

        async def read() -> None:
            async for msg in ws:
                assert msg.type == aiohttp.WSMsgType.TEXT, msg
                got.append(json.loads(msg.data))

        reader = asyncio.create_task(read())
        sent = []
        async with aiomqtt.Client(*mosquitto) as client:
            for seq in range(1, 301):
                kind = "large" if seq % 100 == 0 else "medium" if seq % 10 == 0 else "small"
                sent.append(kind)
                await client.publish(f"openegiz/{site}/oven/oven-1/main/telemetry",
                                     telemetry(seq, sizes[kind]), qos=1)
        changes = lambda: [e for e in got if e["event"] == "StateChanged"]  # noqa: E731
        await wait_for(lambda: len(changes()) >= len(sent), timeout=30)
        reader.cancel()
    events = changes()
    assert len(events) == len(sent)
    assert [e["version"] for e in events] == sorted(e["version"] for e in events)
    for kind, event in zip(sent, events, strict=True):
        assert event["properties"] == sizes[kind]
    assert len(json.dumps(events[99])) > 65_536


def _traced_bytes_per_item(fill: Callable[[], None], items: int) -> float:
    """Python memory `fill()` leaves allocated, per item it adds."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        fill()
        gc.collect()
        return (tracemalloc.get_traced_memory()[0] - before) / items
    finally:
        tracemalloc.stop()


# interned here, as ingest interns a Thing's id: the interpreter's table of names grows before the count starts
THINGS_NAMES = [sys.intern(f"plant:oven-{i:05d}") for i in range(3000)]
FEATURES = ("thermal", "electrical", "business_context")
PROPS = ("temperature", "humidity", "t_pub")


def test_the_live_state_of_a_series_and_of_a_detector_property_stays_compact() -> None:
    # 10,000 Things with three features of three properties are 90,000 series and as many detector
    # statistics: at the 486 and 330 bytes they took as dicts, tuples and objects, 72 MiB of a 200 MiB budget.
    catalogue = SeriesCatalogue()

    def remember() -> None:
        sid = 1
        for thing in THINGS_NAMES:
            for feature in FEATURES:
                for prop in PROPS:
                    catalogue.remember(sid, SeriesKey(thing, feature, prop), "oven", prop != "t_pub")
                    sid += 1

    per_series = _traced_bytes_per_item(remember, 27_000)
    # 194 with a SeriesKey and an entry of one big dict per series, 100 with a dict per Thing and an int per id
    assert per_series < 70, per_series
    tier = StatsTier(StatsSettings())

    def update() -> None:
        for thing in THINGS_NAMES:
            for feature in FEATURES:
                for prop in PROPS:
                    tier.update(thing, f"{feature}/{prop}", 1.0)

    per_property = _traced_bytes_per_item(update, 27_000)
    assert per_property < 165, per_property  # a row of the statistics arrays, its slot and limits; 184 with a dict
    # ... and still answers as a dict and a set did
    sid = catalogue.get(("plant:oven-00002", "electrical", "humidity"))
    assert sid is not None and catalogue.series_keys[sid] == (SeriesKey("plant:oven-00002", "electrical", "humidity"),
                                                              "oven")
    assert sid in catalogue.series_keys and 0 not in catalogue.series_keys and 27_001 not in catalogue.series_keys
    assert len(catalogue.series_keys) == 27_000 and len(catalogue.numeric_series) == 18_000
    assert sid in catalogue.numeric_series and sid + 1 not in catalogue.numeric_series  # t_pub: not numeric here
    assert catalogue.series_of("plant:oven-00002", "electrical") == [sid - 1, sid, sid + 1]
    assert catalogue.series_of("plant:oven-00002", prop="humidity") == [sid - 3, sid, sid + 3]
    assert sorted(catalogue.series_keys) == list(range(1, 27_001))
    catalogue.remember(sid, SeriesKey("plant:oven-99999", "electrical", "humidity"), "oven", True)  # re-keyed
    assert catalogue.get(("plant:oven-00002", "electrical", "humidity")) is None
    assert ("plant:oven-99999", "electrical", "humidity") in catalogue and len(catalogue) == 27_000
    assert catalogue.series_of("plant:oven-00002", "electrical") == [sid - 1, sid + 1]
    assert catalogue.series_of("plant:oven-99999") == [sid] and catalogue.count_of("plant:oven-99999") == 1
    assert len(tier) == 27_000
    tier.forget("plant:oven-00002")
    assert len(tier) == 27_000 - 9


def test_the_detectors_state_of_a_property_read_through_the_detector_stays_compact() -> None:
    # What the detector keeps per (Thing, property) besides the statistics' row: the latest value, and
    # how its slot is found. A (name, slot) tuple per property in a dict per feature made it 395 bytes.
    core = DetectorCore(RuleBook((), "none"))

    def read() -> None:
        for thing in THINGS_NAMES:
            for feature in FEATURES:
                core.add(thing, "oven", feature, 1.0, [(prop, 1.0) for prop in PROPS])
        core.tick()

    per_property = _traced_bytes_per_item(read, 27_000)
    assert per_property < 225, per_property  # 250 with a dict of slots and a dict of latest values per Thing
    assert len(core.stats) == 27_000
    assert core.stats.slots_of("plant:oven-00002").keys() == {f"{f}/{p}" for f in FEATURES for p in PROPS}


def test_a_feature_that_was_never_sent_a_command_holds_no_desired_properties() -> None:
    # 10,000 Things of three features are 30,000 features; an empty dict of desired properties each was 2 MiB.
    features: list[Feature] = []

    def make() -> None:
        features.extend(Feature({"temperature": 180.0}) for _ in range(30_000))

    per_feature = _traced_bytes_per_item(make, 30_000)
    assert per_feature < 270, per_feature  # the object and its properties: 248; 312 with an empty dict of desired ones
    f = features[0]
    assert f.to_document() == {"properties": {"temperature": 180.0}}
    assert f.desired == {} and f == Feature({"temperature": 180.0}, {})
    f.desired["setpoint"] = 200.0  # a command: the dict is made on first use
    assert f.to_document() == {"properties": {"temperature": 180.0}, "desiredProperties": {"setpoint": 200.0}}
    assert f != features[1] and features[1].desired_now == {}


def test_keyed_arrays_share_their_layout_and_answer_as_dicts() -> None:
    root: Layout[str] = KeyedArray.root()
    a: KeyedArray[str, int] = KeyedArray(root, "q")
    b: KeyedArray[str, int] = KeyedArray(root, "q")
    for m, base in ((a, 10), (b, 20)):
        for i, key in enumerate(("x", "y", "z")):
            m[key] = base + i
    assert dict(a) == {"x": 10, "y": 11, "z": 12} and dict(b.items()) == {"x": 20, "y": 21, "z": 22}
    assert a._layout is b._layout  # the same keys in the same order: one index of them
    assert list(a) == ["x", "y", "z"] and a.values() == [10, 11, 12] and len(a) == 3
    assert a.get("y") == 11 and a.get("w") is None and a.get("w", -1) == -1 and "w" not in a and "z" in a
    with pytest.raises(KeyError):
        a["w"]
    a["y"] = 2**40  # a value changed in place: b keeps its own
    assert a["y"] == 2**40 and b["y"] == 21
    rest = b.without("x", root)
    assert dict(rest) == {"y": 21, "z": 22} and dict(a) == {"x": 10, "y": 2**40, "z": 12}
    assert dict(b) == {"x": 20, "y": 21, "z": 22}  # a new mapping: a reader of the old one sees it whole
    with pytest.raises(KeyError):
        rest.without("x", root)
    c: KeyedArray[str, float] = KeyedArray(root, "d")
    c["z"], c["x"] = 1.5, 2.5  # another order: another layout, the same answers
    assert dict(c) == {"z": 1.5, "x": 2.5} and c._layout is not a._layout
    big: KeyedArray[str, int] = KeyedArray(root, "q")
    for i in range(SHARED_MAX * 3):  # past SHARED_MAX keys the layout is the mapping's own, grown in place
        big[f"k{i}"] = i
    assert dict(big) == {f"k{i}": i for i in range(SHARED_MAX * 3)} and not big._layout.shared
    big = big.without("k0", root)
    assert len(big) == SHARED_MAX * 3 - 1 and big["k5"] == 5 and "k0" not in big


def test_the_gateways_buffer_runs_duckdb_on_one_thread_and_the_aggregator_on_two(tmp_path: Path) -> None:
    """A second DuckDB thread costs the gateway's peak memory 1-7 MiB with 200 Things and made nothing faster
    on a small board; the aggregator, on a server, keeps two."""
    from cloud_sync.store.duck import DuckStore
    from gateway.buffer.store import BufferStore

    buffer = BufferStore(tmp_path / "buffer.duckdb", memory_limit_mb=64, checkpoint_mb=16)
    buffer.open()
    central = DuckStore(tmp_path / "central")
    central.open()
    try:
        assert buffer.con.execute("SELECT current_setting('threads')").fetchone() == (1,)
        assert buffer.reader().execute("SELECT current_setting('threads')").fetchone() == (1,)
        assert central.con.execute("SELECT current_setting('threads')").fetchone() == (2,)
    finally:
        buffer.close()
        central.close()
