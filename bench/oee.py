"""OEE benchmark: prints one JSON line per figure (targets in docs/oee.md).

- the OEE query of one line over 30 days (machines read at 1 Hz through the real tracker), by shift,
  by hour and for the downtime Pareto (target <= 50 ms);
- the tracker's CPU per 1,000 readings, in process (every reading a tracked production reading);
- the tracker's instructions per reading, counted by valgrind's callgrind (not by the clock, so the machine's
  load does not change them), for each build given: a child process of that build's Python feeds the
  tracker one oven's readings at 1 Hz, and the count is taken between two `sched_yield` calls, at which
  callgrind dumps its counters (`--dump-before=sched_yield`), so start-up and shut-down are left out.
  Skipped when valgrind is not installed;
- the cost of OEE tracking on the ingest path: two gateway processes, one with OEE off and one with
  OEE on, each behind its own private Mosquitto, take the same single-sample production readings of
  10 ovens in rounds, alternately (the order turns each round), so that both see the same load of a
  shared machine; a gateway's CPU seconds per 1,000 messages are measured over each round, and the
  figure is the median over the rounds of the on/off difference (target <= 5 % of ingest CPU).
  A round is long (40,000 messages) because the figure is the difference of two close numbers: in
  shorter rounds, the work a gateway does on its own clock (the buffer's and the registry's writes,
  the OEE flush) fell into some rounds and not others, and the CPU clock counts in 10 ms ticks, so
  single rounds swung by tens of points. `pooled` is the same difference over the sums of all
  rounds, `rounds` each round's.
  `in_process_share` is the tracker's in-process CPU per reading against the same ingest CPU.

With `--gateway LABEL=EGIZ` (repeatable) the ingest rounds run for each build in turn (in-process
figures are always this checkout's):

    python bench/oee.py [--quick] [--rounds 11] [--messages 40000] [--counted 20000]
                        [--gateway before=/path/to/egiz --gateway after=egiz]
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from harness import (
    ACCEPTED,
    EGIZ,
    SITE,
    GatewayProcess,
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
from gateway.memory import settle_heap
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


def oven_readings(model: ProductionModel, thing: Thing, t0: float, first_s: int, count: int) -> list[StateChanged]:
    """`count` production readings of one oven at 1 Hz from `t0 + first_s` on, one event each (as ingest
    publishes them for single-sample messages)."""
    events = []
    for s in range(first_s, first_s + count):
        ts = t0 + s
        props = dict(model.step(float(s), 1.0))
        events.append(StateChanged(thing.id, thing, feature="production", properties=props, timestamp=ts,
                                   samples=((ts, props),)))
    return events


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
        events = oven_readings(model, thing, t0, hour * 3600, 3600)
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


COUNT_CHILD = "--count-tracker-instructions"  # the child process of `tracker_instructions`, run under callgrind
WARM = 600  # readings taken before the count: the machine made, its caches filled, a few minutes' records open


async def count_child(tmp: Path, readings: int) -> None:
    """The tracker takes `WARM` readings, then `readings` more between two `sched_yield` calls (callgrind's
    dumps), as the gateway's heap is set (`settle_heap`)."""
    cfg = oee_section(tmp)
    t0 = (time.time() // DAY - 1) * DAY
    clock = Clock(t0 + WARM + readings)
    tracker = OeeTracker(cfg.oee, tmp, "line-a", EventBus(), CollectorRegistry(), clock=clock)
    await tracker.start()
    thing = Thing(f"{SITE}:oven-001", "oven", metadata={"line": "line-a"})
    events = oven_readings(ProductionModel("oven", random.Random(1)), thing, t0, 0, WARM + readings)
    tracker._consume(events[:WARM])
    settle_heap()
    os.sched_yield()
    tracker._consume(events[WARM:])
    os.sched_yield()
    await tracker.stop()


def tracker_instructions(tmp: Path, egiz: str, readings: int) -> float | None:
    """The instructions the tracker of build `egiz` spends per reading (None without valgrind)."""
    valgrind = shutil.which("valgrind")
    if valgrind is None or readings <= 0:
        return None
    python = Path(egiz).read_text().splitlines()[0].removeprefix("#!").strip()  # the build's Python
    out = tmp / "callgrind.out"
    subprocess.run([valgrind, "--tool=callgrind", "--dump-before=sched_yield", f"--callgrind-out-file={out}",
                    python, __file__, COUNT_CHILD, str(readings), str(tmp)],
                   env={**os.environ, "PYTHONHASHSEED": "0"}, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    # dumps: `.1` start-up up to the first sched_yield, `.2` the counted readings, `out` the rest
    found = re.search(r"^(?:summary|totals): (\d+)", Path(f"{out}.2").read_text(), re.M)
    if found is None:
        raise RuntimeError("callgrind's dump of the counted readings has no total")
    return int(found.group(1)) / readings


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


OVENS = 10
POLL_S = 0.25  # how often a gateway's /metrics is read while it is measured (each read costs it CPU)
SETTLE_S = 2.5  # after a round, for work a gateway does on its own clock (the OEE flush, every 2 s)


class Ovens:
    """The ovens' production readings, round after round: each oven's model, sequence and time go on."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.models = [ProductionModel("oven", random.Random(i)) for i in range(OVENS)]
        self.seq = 0
        self.round = 0

    def next_round(self, messages: int) -> list[Path]:
        """One file of `messages // OVENS` readings per oven, time-stamped from now on, 1 ms apart."""
        per = messages // OVENS
        now = time.time()
        paths = []
        for i, model in enumerate(self.models):
            path = self.tmp / f"round-{self.round}-{i}.txt"
            with path.open("w") as f:
                for k in range(1, per + 1):
                    seq = self.seq + k
                    f.write(json.dumps({"ts": now + k * 0.001, "seq": seq, "boot": "b1",
                                        "properties": model.step(float(seq), 1.0)}) + "\n")
            paths.append(path)
        self.seq += per
        self.round += 1
        return paths


@dataclass
class Side:
    """One gateway process measured: a build (`label`) with OEE on or off, behind its own broker."""

    label: str
    oee: bool
    gw: GatewayProcess
    port: int
    cpu: list[float] = field(default_factory=list)  # CPU seconds per 1,000 messages, one per measured round
    rate: list[float] = field(default_factory=list)  # messages/s, one per measured round

    def topic(self, oven: int) -> str:
        return f"openegiz/{SITE}/oven/oven-{oven:03d}/production/telemetry"


async def ingest_round(http: aiohttp.ClientSession, side: Side, files: list[Path], messages: int,
                       measured: bool) -> None:
    """Publish one round to `side` and wait until it has applied every message (and, with OEE on, until its
    tracker has taken the readings) and settled; with `measured`, keep its CPU and its rate."""
    accepted = await metric(http, side.gw.url, ACCEPTED)
    taken = await metric(http, side.gw.url, "egiz_oee_readings_total")
    cpu0 = sum(side.gw.process.cpu_times()[:2])
    t0 = time.perf_counter()
    await publish_files(side.port, [(side.topic(i), path) for i, path in enumerate(files)])
    done = await wait_accepted(http, side.gw.url, accepted + messages, timeout=600, interval=POLL_S)
    if side.oee:  # the tracker takes the readings in its own rounds, a moment after ingest accepted them
        await wait_metric(http, side.gw.url, "egiz_oee_readings_total", taken + messages * 0.99, 120,
                          "OEE tracker took readings:", POLL_S)
    await asyncio.sleep(SETTLE_S)
    if measured:
        side.cpu.append((sum(side.gw.process.cpu_times()[:2]) - cpu0) / messages * 1000)
        side.rate.append(messages / (done - t0))


async def ingest_cpu(tmp: Path, builds: list[tuple[str, str]], messages: int, rounds: int) -> list[Side]:
    """Every build with OEE off and on, each its own gateway and broker, all fed the same rounds in turn."""
    ovens = Ovens(tmp)
    oee = {"enabled": True, "types": oee_rules(("oven",)), "shifts": list(DEMO_SHIFTS)}
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())
        sides = []
        for label, egiz in builds:
            for on in (False, True):
                port = await stack.enter_async_context(private_broker(tmp / f"broker-{label}-{on:d}"))
                sections: dict[str, dict[str, Any]] = {"detect": {"enabled": False}}
                if on:
                    sections["oee"] = oee
                gw = await stack.enter_async_context(
                    gateway(tmp, port, tmp / f"data-{label}-{on:d}", egiz=egiz, **sections))
                sides.append(Side(label, on, gw, port))
        warm = max(messages // 5, OVENS)  # Things registered, machines created, caches filled: not measured
        files = ovens.next_round(warm)
        for side in sides:
            await ingest_round(http, side, files, warm // OVENS * OVENS, measured=False)
        for r in range(rounds):
            files = ovens.next_round(messages)
            for side in sides[r % len(sides):] + sides[:r % len(sides)]:
                await ingest_round(http, side, files, messages // OVENS * OVENS, measured=True)
    return sides


def this_checkout(egiz: str) -> bool:
    return os.path.abspath(egiz) == os.path.abspath(EGIZ)


async def main() -> None:
    args = options(__doc__, {"days": 3, "messages": 5_000, "rounds": 2, "counted": 2_000}, builds=True,
                   days=30, machines=5, messages=40_000, rounds=11, counted=20_000)
    with tempfile.TemporaryDirectory(prefix="egiz-bench-oee-") as d:
        tmp = Path(d)
        for label, egiz in args.gateway:
            count_dir = tmp / f"count-{label}"
            count_dir.mkdir()
            per = tracker_instructions(count_dir, egiz, args.counted)
            if per is not None:
                emit("oee_tracker_instructions_per_reading", per, "instructions", "reference", gateway=label,
                     readings=args.counted)
        tracker, start, end, per_reading = await build_history(tmp / "history", args.days, args.machines)
        try:
            emit("oee_tracker_cpu_per_1k_readings", per_reading * 1000 * 1000, "ms", "reference",
                 note="in process, every reading a tracked production reading")
            await query_times(tracker, start, end, 30)
        finally:
            await tracker.stop()
        sides = await ingest_cpu(tmp, args.gateway, args.messages, args.rounds)
    for label, egiz in args.gateway:
        off, on = (next(s for s in sides if s.label == label and s.oee == o) for o in (False, True))
        shares = [(b - a) / a * 100 for a, b in zip(off.cpu, on.cpu, strict=True)]
        emit("ingest_cpu_per_1k_msgs_oee_off", statistics.median(off.cpu), "core-s", "reference", gateway=label,
             msg_per_s=round(statistics.median(off.rate)))
        emit("ingest_cpu_per_1k_msgs_oee_on", statistics.median(on.cpu), "core-s", "reference", gateway=label,
             msg_per_s=round(statistics.median(on.rate)))
        extra: dict[str, Any] = {"gateway": label, "rounds": [round(x, 1) for x in shares],
                                 "pooled": round((sum(on.cpu) - sum(off.cpu)) / sum(off.cpu) * 100, 2)}
        if this_checkout(egiz):  # the in-process figure is this checkout's
            extra["in_process_share"] = round(per_reading * 1000 / statistics.median(off.cpu) * 100, 2)
        emit("oee_share_of_ingest_cpu", statistics.median(shares), "%", "<= 5", **extra)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == COUNT_CHILD:
        asyncio.run(count_child(Path(sys.argv[3]), int(sys.argv[2])))
    else:
        run(main)
