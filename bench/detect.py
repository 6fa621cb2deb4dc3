"""Anomaly detection benchmark: prints one JSON line per figure (see DESIGN.md for the targets).

- publish → `AnomalyDetected` on a WebSocket, p50/p99, with the gateway as its own process behind a
  private Mosquitto, under a background load of normal telemetry (target p99 <= 100 ms);
- scored feature rows per second through the ONNX models, batched as the detector batches them
  (one autoencoder run per tick, the forest at most once a second), and the whole tick (rules,
  statistics, models) per reading;
- the detector's CPU time per message without a model (rules and statistics, as every type has before
  it is trained), one tick per 50 messages as at 1k msg/s: single-sample messages of 200 proofers
  round robin (`bench/footprint.py`'s load), and the same messages from one proofer alone;
- ONNX vs scikit-learn agreement of a freshly trained model (max absolute difference).

    python bench/detect.py [--things 300] [--background-rate 1000 (normal msg/s meanwhile)] [--quick]
"""

from __future__ import annotations

import asyncio
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
from harness import QUIET, SITE, emit, gateway, options, pct, private_broker, run
from ingest import ws_events

from gateway.common.series import flatten
from gateway.detect.core import DetectorCore, DetectSettings
from gateway.detect.models import ModelRegistry
from gateway.detect.rules import load_rules
from gateway.detect.train import FeatureRows, train_model

HOT = 400.0  # the built-in rules call an oven zone above setpoint + 20 critical


async def anomaly_latency(url: str, port: int, things: int, background_rate: int) -> list[float]:
    """Each of `things` ovens gets one overheated reading, timed; normal traffic flows meanwhile."""
    delays: list[float] = []
    sent: dict[str, float] = {}

    def seen(ev: dict[str, Any]) -> None:
        if ev.get("event") == "AnomalyDetected" and ev["thingId"] in sent:
            delays.append(time.time() - sent[ev["thingId"]])

    async with ws_events(url, "oven", seen):
        stop = asyncio.Event()

        async def background(client: aiomqtt.Client) -> None:
            i = 0
            t0 = time.perf_counter()
            while not stop.is_set():
                due = t0 + i / background_rate
                if due > time.perf_counter():
                    await asyncio.sleep(due - time.perf_counter())
                await client.publish(f"openegiz/{SITE}/mixer/mixer-{i % 200:03d}/motor/telemetry", json.dumps(
                    {"ts": time.time(), "seq": i // 200 + 1, "boot": "bg",
                     "properties": {"current": 12.0 + (i % 7) * 0.1, "speed_rpm": 120.0}}), qos=1)
                i += 1

        async with aiomqtt.Client("127.0.0.1", port, max_inflight_messages=1000, logger=QUIET) as client:
            for i in range(things):  # every oven known and normal first
                await client.publish(f"openegiz/{SITE}/oven/oven-{i:04d}/thermal/telemetry", json.dumps(
                    {"ts": time.time(), "seq": 1, "boot": "lat",
                     "properties": {"temperature_zones": [190.0, 191.0, 189.0], "setpoint": 190.0}}), qos=1)
            await asyncio.sleep(1.0)
            bg = asyncio.create_task(background(client))
            for i in range(things):
                thing = f"{SITE}:oven-{i:04d}"
                sent[thing] = time.time()
                await client.publish(f"openegiz/{SITE}/oven/oven-{i:04d}/thermal/telemetry", json.dumps(
                    {"ts": time.time(), "seq": 2, "boot": "lat",
                     "properties": {"temperature_zones": [190.0, HOT, 189.0], "setpoint": 190.0}}), qos=1)
                await asyncio.sleep(0.02)
            deadline = time.perf_counter() + 10
            while len(delays) < things and time.perf_counter() < deadline:
                await asyncio.sleep(0.05)
            stop.set()
            await bg
    return delays


def oven_rows(n: int, seed: int) -> FeatureRows:
    """Oven-like rows: three zones following a level, power following the zones, three noisy phases."""
    rng = np.random.default_rng(seed)
    level = rng.uniform(80, 200, n)
    zones = [level + off + rng.normal(0, 0.35, n) for off in (-3.0, 0.0, 2.0)]
    power = 0.18 * (level - 20) + rng.normal(0, 0.3, n)
    volts = [230 + rng.normal(0, 0.6, n) for _ in range(3)]
    amps = [power * 1000 / (3 * v * 0.92) for v in volts]
    x = np.column_stack([*amps, np.full(n, 0.92) + rng.normal(0, 0.004, n), power, *volts, *zones])
    keys = [f"electrical/current.{p}" for p in "abc"] + ["electrical/power_factor", "electrical/power_kw"] + \
        [f"electrical/voltage.{p}" for p in "abc"] + [f"thermal/temperature_zones[{i}]" for i in range(3)]
    return FeatureRows(keys, x, np.arange(n, dtype=float), np.array(["b:oven-1"] * n, dtype=object))


def model_figures(tmp: Path, quick: bool) -> None:
    rows = oven_rows(20_000 if not quick else 5000, 1)
    t0 = time.perf_counter()
    version = train_model(rows, "oven", tmp / "models").name
    train_s = time.perf_counter() - t0
    bundle = ModelRegistry(tmp / "models").load("oven", version)
    agreement = bundle.manifest["agreement"]
    for part in ("autoencoder", "isolation_forest"):
        diff = agreement[f"{part}_max_abs_diff"]
        print(json.dumps({"figure": f"onnx_vs_sklearn_{part}", "value": float(f"{diff:.3g}"), "unit": "max abs diff",
                          "target": "<= 0.001", "rows": agreement["rows"], "train_s": round(train_s, 1)}), flush=True)
    x = oven_rows(1000, 2).x
    for batch in (1, 50, 500):
        xb = x[:batch]
        forest = np.zeros(batch)
        runs = 2000 if batch == 1 else 400
        t0 = time.perf_counter()
        for i in range(runs):  # the detector: autoencoder every tick, forest once a second (every 20th tick)
            bundle.score(xb, None if i % 20 == 0 else forest)
        el = time.perf_counter() - t0
        emit("model_scored_rows", runs * batch / el, "rows/s", "reference", batch=batch,
             tick_ms=round(el / runs * 1000, 3))
    # the whole tick: 500 ovens, one reading each (thermal + electrical), rules + statistics + models
    core = DetectorCore(load_rules(None), DetectSettings(), {"oven": bundle})
    readings = 0
    t0 = time.perf_counter()
    for tick in range(40 if quick else 200):
        for i in range(500):
            r = x[(tick + i) % len(x)]
            tid = f"b:oven-{i:04d}"
            core.add(tid, "oven", "electrical", float(tick),
                     [("current.a", r[0]), ("current.b", r[1]), ("current.c", r[2]), ("power_factor", r[3]),
                      ("power_kw", r[4]), ("voltage.a", r[5]), ("voltage.b", r[6]), ("voltage.c", r[7])])
            core.add(tid, "oven", "thermal", float(tick),
                     [("temperature_zones[0]", r[8]), ("temperature_zones[1]", r[9]), ("temperature_zones[2]", r[10]),
                      ("setpoint", 190.0)])
            readings += 2
        core.tick()
    el = time.perf_counter() - t0
    emit("detector_readings", readings / el, "readings/s", "reference", things=500,
         note="rules + statistics + batched models, one thread")


def detector_cpu(quick: bool) -> None:
    """CPU time of the detector's worker per message (`AnomalyDetector._process`: flatten, add, one tick per
    50 messages), the best of three runs."""
    n = 10_000 if quick else 60_000
    for devices in (200, 1):
        best = math.inf
        for _ in range(3):
            core = DetectorCore(load_rules(None), DetectSettings())
            t0 = time.process_time()
            for k in range(0, n, 50):
                for i in range(k, k + 50):
                    props = {"temperature": 20.5 + (i // devices) % 7, "humidity": 41.0, "t_pub": 1.7e9 + i / 1000}
                    core.add(f"b:proofer-{i % devices:05d}", "proofer", "main", 1.7e9 + i / 1000, flatten(props))
                core.tick()
            best = min(best, time.process_time() - t0)
        emit("detector_cpu_per_message", best / n * 1e6, "us", "reference", things=devices, messages=n,
             per_tick=50, note="rules + statistics, no model, one thread")


async def main() -> None:
    args = options(__doc__, {"things": 60}, things=300, background_rate=1000)
    with tempfile.TemporaryDirectory(prefix="egiz-bench-") as d:
        tmp = Path(d)
        detector_cpu(args.quick)
        model_figures(tmp, args.quick)
        async with private_broker(tmp) as port:
            async with gateway(tmp, port, tmp / "data") as gw:
                delays = await anomaly_latency(gw.url, port, args.things, args.background_rate)
            emit("publish_to_anomaly_p50", pct(delays, 50) * 1000, "ms", "reference", samples=len(delays),
                 background_msg_s=args.background_rate)
            emit("publish_to_anomaly_p99", pct(delays, 99) * 1000, "ms", "<= 100", samples=len(delays),
                 background_msg_s=args.background_rate)


if __name__ == "__main__":
    run(main)
