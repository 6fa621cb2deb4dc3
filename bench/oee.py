"""OEE benchmark: prints one JSON line per figure (targets in docs/oee.md).

- the OEE query of one line over 30 days (machines read at 1 Hz through the real tracker), by shift,
  by hour and for the downtime Pareto (target <= 50 ms);
- the tracker's CPU per 1,000 readings, in process (every reading a tracked production reading);
- the cost of OEE tracking on the ingest path: the gateway as its own process behind a private
  Mosquitto, the same single-sample production readings published with OEE off and on, its CPU
  seconds per 1,000 messages compared (target <= 5 % of ingest CPU).

    python bench/oee.py [--quick]
"""

from __future__ import annotations

import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from harness import (
    ACCEPTED,
    SITE,
    emit,
    gateway,
    metric,
    options,
    private_broker,
    publish_files,
    run,
    wait_accepted,
    wait_metric,
)
from prometheus_client import CollectorRegistry

from gateway.bus import EventBus, StateChanged
from gateway.config import GatewayConfig, load_config
from gateway.oee import store
from gateway.oee.tracker import OeeTracker
from gateway.sim.production import DEMO_SHIFTS, ProductionModel, oee_rules
from gateway.twin.model import Thing

DAY = 86400


def oee_section(tmp: Path) -> GatewayConfig:
    return load_config(GatewayConfig, None, environ={}, overrides={
        "gateway.site": SITE, "gateway.line": "line-a", "gateway.id": "gw-bench", "gateway.data_dir": str(tmp),
        "auth.open": True, "oee.enabled": True, "oee.types": oee_rules(("oven",)), "oee.shifts": list(DEMO_SHIFTS)})


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def build_history(tmp: Path, days: int, machines: int) -> tuple[OeeTracker, float, float, float]:
    """`days` of one oven at 1 Hz through the tracker; its rows copied for the line's other machines.
    Returns the tracker, the range, and the tracker's CPU seconds per reading."""
    cfg = oee_section(tmp)
    t0 = (time.time() // DAY - days) * DAY
    clock = Clock(t0)
    bus = EventBus()
    tracker = OeeTracker(cfg.oee, tmp, "line-a", bus, CollectorRegistry(), clock=clock)
    await tracker.start()
    model = ProductionModel("oven", random.Random(1))
    thing = Thing(f"{SITE}:oven-001", "oven", metadata={"line": "line-a"})
    cpu = 0.0
    readings = 0
    for hour in range(days * 24):
        events = []
        for s in range(3600):
            ts = t0 + hour * 3600 + s
            props = dict(model.step(float(hour * 3600 + s), 1.0))
            events.append(StateChanged(thing.id, thing, feature="production", properties=props, timestamp=ts,
                                       samples=((ts, props),)))
        clock.t = t0 + (hour + 1) * 3600
        c0 = time.process_time()
        tracker._consume(events)
        cpu += time.process_time() - c0
        readings += len(events)
        if hour % 6 == 5:
            await tracker.flush()
    await tracker.flush()

    def copy(conn: Any) -> None:
        cols = ", ".join(store.SUMMED)
        with conn:
            for i in range(2, machines + 1):
                conn.execute(f"INSERT INTO oee_periods (thing_id, line, hour, day, shift, planned, {cols}) "
                             f"SELECT ?, line, hour, day, shift, planned, {cols} FROM oee_periods "
                             "WHERE thing_id = ?", (f"{SITE}:oven-{i:03d}", thing.id))
                conn.execute('INSERT INTO oee_events (id, thing_id, line, state, start, "end", source, reason, '
                             "note, reason_by, planned_s, open) SELECT id || ?, ?, line, state, start, \"end\", "
                             "source, reason, note, reason_by, planned_s, open FROM oee_events WHERE thing_id = ?",
                             (f"-{i}", f"{SITE}:oven-{i:03d}", thing.id))

    await tracker.query(copy)
    return tracker, t0, t0 + days * DAY, cpu / readings


async def query_times(tracker: OeeTracker, start: float, end: float, runs: int) -> None:
    scope = store.Scope("line", "line-a")
    for name, fn in (
        ("oee_query_line_30d_by_shift", lambda c: store.totals(c, scope, start, end, "shift")),
        ("oee_query_line_30d_by_hour", lambda c: store.totals(c, scope, start, end, "hour")),
        ("downtime_pareto_line_30d", lambda c: (store.totals(c, scope, start, end, "none"),
                                                store.pareto(c, scope, start, end,
                                                             ("down", "idle", "changeover", "offline")))),
    ):
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            await tracker.read(fn)
            times.append(time.perf_counter() - t)
        emit(name, statistics.median(times) * 1000, "ms", "<= 50", p95_ms=round(sorted(times)[int(0.95 * runs) - 1]
                                                                              * 1000, 3), runs=runs)


def production_lines(path: Path, count: int, ovens: int, i: int) -> None:
    model = ProductionModel("oven", random.Random(i))
    now = time.time()
    with path.open("w") as f:
        for seq in range(1, count + 1):
            f.write(json.dumps({"ts": now + seq * 0.001, "seq": seq, "boot": "b1",
                                "properties": model.step(float(seq), 1.0)}) + "\n")


async def ingest_cpu(tmp: Path, port: int, oee: bool, messages: int, ovens: int) -> tuple[float, float]:
    """(CPU seconds per 1,000 messages, messages/s) of the gateway process for production readings."""
    per = messages // ovens
    files = []
    for i in range(ovens):
        path = tmp / f"prod-{oee}-{i}.txt"
        production_lines(path, per, ovens, i)
        files.append((f"openegiz/{SITE}/oven/oven-{oee:d}{i:03d}/production/telemetry", path))
    sections: dict[str, dict[str, Any]] = {"detect": {"enabled": False}}
    if oee:
        sections["oee"] = {"enabled": True, "types": oee_rules(("oven",)), "shifts": list(DEMO_SHIFTS)}
    async with gateway(tmp, port, tmp / f"data-{oee}", **sections) as gw, aiohttp.ClientSession() as http:
        before = await metric(http, gw.url, ACCEPTED)
        cpu0 = sum(gw.process.cpu_times()[:2])
        t0 = time.perf_counter()
        await publish_files(port, files)
        done = await wait_accepted(http, gw.url, before + per * ovens, timeout=600)
        if oee:  # the tracker takes the readings in its own rounds, a moment after ingest accepted them
            await wait_metric(http, gw.url, "egiz_oee_readings_total", per * ovens * 0.99, 60,
                              "OEE tracker took readings:")
        cpu = sum(gw.process.cpu_times()[:2]) - cpu0
    return cpu / (per * ovens) * 1000, per * ovens / (done - t0)


async def main() -> None:
    args = options(__doc__, {"days": 3, "messages": 10_000}, days=30, machines=5, messages=60_000)
    with tempfile.TemporaryDirectory(prefix="egiz-bench-oee-") as d:
        tmp = Path(d)
        tracker, start, end, per_reading = await build_history(tmp / "history", args.days, args.machines)
        try:
            emit("oee_tracker_cpu_per_1k_readings", per_reading * 1000 * 1000, "ms", "reference",
                 note="in process, every reading a tracked production reading")
            await query_times(tracker, start, end, 30)
        finally:
            await tracker.stop()
        async with private_broker(tmp) as port:
            off, rate_off = await ingest_cpu(tmp, port, False, args.messages, 10)
            on, rate_on = await ingest_cpu(tmp, port, True, args.messages, 10)
        emit("ingest_cpu_per_1k_msgs_oee_off", off, "core-s", "reference", msg_per_s=round(rate_off))
        emit("ingest_cpu_per_1k_msgs_oee_on", on, "core-s", "reference", msg_per_s=round(rate_on))
        emit("oee_share_of_ingest_cpu", (on - off) / off * 100, "%", "<= 5",
             in_process_share=round(per_reading * 1000 / off * 100, 2))


if __name__ == "__main__":
    run(main)
