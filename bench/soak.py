"""Soak benchmark: the gateway under a steady line's load for an hour; anything that grows is a bug.

Prints one JSON line per figure (see DESIGN.md for the targets). The set-up is bench/footprint.py's — a
private Mosquitto with the shipped settings, the gateway as its own process (`egiz gateway run`), paho
publishers in separate processes at a fixed rate (single-sample QoS 1 messages, 200 proofers) — plus
what a gateway on a line also does:

- the detector with a trained model: an autoencoder and an Isolation Forest for the proofers, trained
  with `egiz model train`'s code on rows like the published ones and activated before the gateway starts;
- the uplink to a real aggregator, `egiz aggregator run` as its own process (DuckDB);
- 50 WebSocket clients: one subscribed to everything, 49 watching 4 proofers each, as viewers watching
  a machine do (50 clients subscribed to everything would be 100k events/s, a load test of its own).

The gateway's RSS (VmRSS) and CPU time are sampled every 30 s. Figures:
  soak_rss_slope     least-squares slope of RSS over the run after the warm-up  target <= 5 MiB/hour
  soak_cpu_share     CPU share (cores) of the first vs the last quarter         flat
  soak_counts        lost, duplicates, WebSocket events missed / doubled, aggregator points received vs the
                     points the gateway stored (published to its buffer)        all 0 / equal
Each sample is also printed (`soak_sample`), so a run's curve can be plotted.

DuckDB's buffer cache (`buffer.memory_limit_mb`, sized to the machine: 64..256 MB) fills as points are
stored and read back by the uplink; it is bounded, but until it is full it shows as growth. `--duckdb-mb 64`
(a 1 GB Pi's limit) makes it fill sooner.

    python bench/soak.py [--minutes 60] [--rate 2000] [--clients 50] [--duckdb-mb 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from footprint import (
    KEY,
    SITE,
    Load,
    Publishers,
    accepted,
    cpu_seconds,
    duplicates,
    emit,
    gateway,
    memory_kib,
    metric,
    published,
    websocket,
)
from harness import metric_sum

from gateway.broker import BrokerProcess, BrokerSettings, find_free_port
from gateway.detect.models import ModelRegistry
from gateway.detect.train import FeatureRows, train_model
from tests.helpers import ADMIN_KEY, EGIZ, TOKEN, aggregator_toml, egiz_process

SAMPLE_S = 30.0
KIND = "proofer"
DEVICES = 200
WATCHED_PER_CLIENT = 4


# --------------------------------------------------------------------- the model
def proofer_rows(n: int, seed: int) -> FeatureRows:
    """Rows like the publishers' readings: temperature 20.5..26.5 in steps of one, humidity about 41 %."""
    rng = np.random.default_rng(seed)
    temp = 20.5 + rng.integers(0, 7, n) + rng.normal(0, 0.05, n)
    hum = 41.0 + rng.normal(0, 0.05, n)
    return FeatureRows(["main/humidity", "main/temperature"], np.column_stack([hum, temp]),
                       np.arange(n, dtype=float), np.array([f"{SITE}:{KIND}-00000"] * n, dtype=object))


def install_model(models_dir: Path) -> str:
    version = train_model(proofer_rows(5000, 1), KIND, models_dir, seed=1).name
    ModelRegistry(models_dir).activate(KIND, version)
    return version


# --------------------------------------------------------------------- WebSocket clients
@dataclass
class Follower:
    """One client's StateChanged events: how many, and how many were not newer than the last of their Thing
    (a message delivered twice). Memory stays flat: one timestamp per Thing."""

    devices: list[int] | None  # None: every device
    received: int = 0
    doubled: int = 0
    last: dict[str, float] = field(default_factory=dict)

    def on_event(self, ev: dict[str, Any]) -> None:
        stamped = published(ev)
        if stamped is None:
            return
        key, t_pub = stamped
        if t_pub <= self.last.get(key, 0.0):
            self.doubled += 1
        else:
            self.received += 1
            self.last[key] = t_pub

    def expected(self, load: Load, reached: dict[int, int]) -> int:
        """The messages published to this client's devices, `reached` as Publishers.reached."""
        devices = range(load.devices) if self.devices is None else self.devices
        return sum(load.messages_to(d, reached[load.process_of(d)]) for d in devices)


def followers(load: Load, clients: int) -> list[tuple[Follower, dict[str, Any] | None]]:
    out: list[tuple[Follower, dict[str, Any] | None]] = [(Follower(None), None)]
    for c in range(clients - 1):
        devices = [(c * WATCHED_PER_CLIENT + k) % load.devices for k in range(WATCHED_PER_CLIENT)]
        out.append((Follower(devices), {"thingIds": [load.thing_id(d) for d in devices]}))
    return out


# --------------------------------------------------------------------- sampling and figures
@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the publishers started
    rss_mib: float
    cpu_s: float
    agg_rss_mib: float
    duckdb_mib: float = 0.0  # what the gateway's DuckDB holds (egiz_buffer_duckdb_memory_bytes)


def slope_per_hour(samples: list[Sample]) -> float:
    """Least-squares slope of RSS, MiB per hour."""
    t = np.array([s.t for s in samples]) / 3600
    y = np.array([s.rss_mib for s in samples])
    return float(np.polyfit(t, y, 1)[0]) if len(samples) >= 2 else float("nan")


def cpu_share(samples: list[Sample], lo: float, hi: float) -> float:
    """Cores used between the samples nearest to `lo` and `hi` seconds."""
    a = min(samples, key=lambda s: abs(s.t - lo))
    b = min(samples, key=lambda s: abs(s.t - hi))
    return (b.cpu_s - a.cpu_s) / (b.t - a.t) if b.t > a.t else float("nan")


async def aggregator_points(http: aiohttp.ClientSession, url: str) -> float:
    return await metric_sum(http, url, "egiz_aggregator_points_total", ADMIN_KEY)


async def soak(minutes: float, rate: int, clients: int, duckdb_mb: float, tmp: Path) -> None:
    seconds = minutes * 60
    warmup = min(600.0, seconds / 6)
    load = Load(rate, seconds, DEVICES, kind=KIND, timed=True)
    models = tmp / "models"
    version = install_model(models)
    broker = BrokerProcess(BrokerSettings(port=find_free_port(), data_dir=tmp / "broker", allow_anonymous=True))
    await broker.start()
    agg_port = find_free_port()
    agg_url = f"http://127.0.0.1:{agg_port}"
    agg_cfg = aggregator_toml(tmp, agg_port, SITE)
    try:
        async with AsyncExitStack() as stack, aiohttp.ClientSession() as http:
            agg = await stack.enter_async_context(egiz_process(
                "aggregator", "run", "--config", str(agg_cfg), url=agg_url, log=tmp / "aggregator.log",
                what="aggregator"))
            gw = await stack.enter_async_context(gateway(
                EGIZ, "soak", tmp, broker.port, "soak",
                gateway={"id": f"gw-{SITE}"},
                detect={"models_dir": models, "ignore": ["*setpoint*", "t_pub"]},
                uplink={"url": agg_url, "token": TOKEN}, buffer={"memory_limit_mb": duckdb_mb}))
            watchers = followers(load, clients)
            for watcher, subscribe in watchers:
                await stack.enter_async_context(websocket(gw.url, watcher, subscribe))
            before, dup_before = await accepted(http, gw.url), await duplicates(http, gw.url)
            pubs = Publishers(broker.port, load, "soak")
            stack.callback(pubs.stop)
            await asyncio.sleep(max(0.0, pubs.start_at - time.time()))
            samples: list[Sample] = []
            end = pubs.start_at + seconds
            while True:  # until the publishers are done, also when the machine makes them late
                s = Sample(round(time.time() - pubs.start_at, 1), memory_kib(gw.pid, "VmRSS") / 1024,
                           cpu_seconds(gw.pid), memory_kib(agg.pid, "VmRSS") / 1024,
                           await metric(http, gw.url, "egiz_buffer_duckdb_memory_bytes") / 2**20)
                samples.append(s)
                print(json.dumps({"figure": "soak_sample", "t_s": s.t, "rss_mib": round(s.rss_mib, 1),
                                  "duckdb_mib": round(s.duckdb_mib, 1),
                                  "cpu_s": round(s.cpu_s, 1), "aggregator_rss_mib": round(s.agg_rss_mib, 1),
                                  "applied": int(await accepted(http, gw.url) - before)}), flush=True)
                if time.time() + 1 >= end and not any(p.is_alive() for p in pubs.procs):
                    break
                await asyncio.sleep(max(1.0, min(SAMPLE_S, end - time.time())))
            sent, publish_s = await pubs.wait()
            # a gateway behind its publishers (a busy machine) applies the broker's backlog after they stop:
            # wait while it makes progress, up to a minute without any
            last, stalled_at = -1.0, time.monotonic()
            while (done := await accepted(http, gw.url) - before) < sent and time.monotonic() - stalled_at < 60:
                if done > last:
                    last, stalled_at = done, time.monotonic()
                await asyncio.sleep(0.5)
            # everything committed and confirmed by the aggregator, then the books of both sides
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and (
                    await metric(http, gw.url, "egiz_buffer_pending_points") > 0
                    or await metric(http, gw.url, "egiz_uplink_backlog_points") > 0
                    or await aggregator_points(http, agg_url) < await metric(http, gw.url, "egiz_buffer_points_total")):
                await asyncio.sleep(0.5)
            expected = [w.expected(load, pubs.reached) for w, _ in watchers]
            deadline = time.monotonic() + 30
            while any(w.received < e for (w, _), e in zip(watchers, expected, strict=True)) \
                    and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            applied = await accepted(http, gw.url) - before
            dup = await duplicates(http, gw.url) - dup_before
            stored = await metric(http, gw.url, "egiz_buffer_points_total")
            confirmed = await metric(http, gw.url, "egiz_uplink_points_total")
            received = await aggregator_points(http, agg_url)
            slow = await metric(http, gw.url, "egiz_ws_slow_disconnects_total")
            anomalies = await metric_sum(http, gw.url, "egiz_anomalies_opened_total", KEY)
            scored = await metric(http, gw.url, "egiz_detect_rows_scored_total")
    finally:
        await broker.stop()

    duration = samples[-1].t
    steady = [s for s in samples if s.t >= warmup]
    q = duration / 4
    emit("soak_rss_slope", slope_per_hour(steady), "MiB/hour", "<= 5", minutes=minutes, rate=rate,
         clients=clients, warmup_s=warmup, samples=len(steady), rss_start_mib=round(steady[0].rss_mib, 1),
         rss_end_mib=round(steady[-1].rss_mib, 1), rss_peak_mib=round(max(s.rss_mib for s in samples), 1),
         aggregator_rss_slope_mib_h=round(slope_per_hour([Sample(s.t, s.agg_rss_mib, 0, 0) for s in steady]), 2),
         # DuckDB's cache is bounded by buffer.memory_limit_mb: what grows besides it
         rss_less_duckdb_slope_mib_h=round(slope_per_hour([Sample(s.t, s.rss_mib - s.duckdb_mib, 0, 0)
                                                           for s in steady]), 2),
         duckdb_end_mib=round(steady[-1].duckdb_mib, 1),
         # a bounded cache that filled during the run is flat in its second half; a leak is not
         last_half_slope_mib_h=round(slope_per_hour([s for s in samples if s.t >= duration / 2]), 2),
         model=f"{KIND}/{version}", duckdb_mb=duckdb_mb or "auto")
    first, last = cpu_share(samples, 0, q), cpu_share(samples, duration - q, duration)
    emit("soak_cpu_share", last, "cores", "flat", first_quarter=round(first, 3), last_quarter=round(last, 3),
         whole=round(cpu_share(samples, 0, duration), 3), cpu_s_per_1k_msgs=round(
             (samples[-1].cpu_s - samples[0].cpu_s) / max(applied, 1) * 1000, 4))
    emit("soak_counts", sent - applied, "messages lost", "0", sent=sent, lost=int(sent - applied),
         publish_rate=round(sent / publish_s), duplicates_dropped=int(dup), ws_clients=len(watchers),
         ws_missed=sum(max(0, e - w.received) for (w, _), e in zip(watchers, expected, strict=True)),
         ws_doubled=sum(w.doubled for w, _ in watchers), ws_closed_slow=int(slow),
         gateway_points_stored=int(stored), gateway_points_confirmed=int(confirmed), aggregator_points=int(received),
         anomalies_opened=int(anomalies), model_rows_scored=int(scored))


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=60.0, help="length of the run")
    ap.add_argument("--rate", type=int, default=2000, help="messages per second")
    ap.add_argument("--clients", type=int, default=50, help="WebSocket clients (at least 1)")
    ap.add_argument("--duckdb-mb", type=float, default=0.0,
                    help="the gateway's buffer.memory_limit_mb (0: sized to the machine, as shipped; 64: a 1 GB Pi)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="egiz-soak-") as d:
        await soak(args.minutes, args.rate, max(1, args.clients), args.duckdb_mb, Path(d))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main())
