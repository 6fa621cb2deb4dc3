"""Gateway ingest benchmark: prints one JSON line per figure (see DESIGN.md for the targets).

Runs a private Mosquitto with the shipped settings, the gateway as its own process (as deployed),
and C publishers (`mosquitto_pub -l`) so the publisher is not the bottleneck. Figures:
bare aiomqtt subscriber msg/s, gateway msg/s (single-sample) and points/s (batched) with 0 lost,
their ratio, publish → WebSocket StateChanged latency at 2k msg/s, RSS and start-to-ready with 10k Things.

    python bench/ingest.py [--messages 200000] [--things 20] [--quick]
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
from harness import (
    ACCEPTED,
    KEY,
    QUIET,
    SITE,
    emit,
    gateway,
    metric,
    options,
    pct,
    private_broker,
    publish_files,
    run,
    wait_accepted,
)


def write_lines(path: Path, count: int, *, batch: int, start_seq: int = 1) -> int:
    """`count` payloads for one node; returns the number of points they carry."""
    now = time.time()
    points = 0
    with path.open("w") as f:
        seq = start_seq
        for _ in range(count):
            if batch == 1:
                f.write(json.dumps({"ts": now, "seq": seq, "boot": "b1", "properties": {
                    "temperature": 20.5 + seq % 7, "humidity": 41.0, "power_factor": 0.92}}) + "\n")
                seq += 1
                points += 3
            else:
                samples = []
                for _ in range(batch):
                    samples.append({"ts": now, "seq": seq, "properties": {
                        "temperature_zones": [180.0 + seq % 5, 181.0, 182.0], "setpoint": 180.0}})
                    seq += 1
                    points += 4
                f.write(json.dumps({"boot": "b1", "samples": samples}, separators=(",", ":")) + "\n")
    return points


async def bare_subscriber(port: int, tmp: Path, messages: int, things: int) -> float:
    """msg/s of a plain aiomqtt QoS 1 subscriber that only counts, measured like the gateway."""
    per = messages // things
    files = []
    for i in range(things):
        path = tmp / f"bare-{i}.txt"
        write_lines(path, per, batch=1)
        files.append((f"bare/{i}/telemetry", path))
    total = per * things
    got = 0
    first = last = 0.0
    async with aiomqtt.Client("127.0.0.1", port, identifier="bench-bare", clean_session=False) as client:
        await client.subscribe("bare/+/telemetry", qos=1)
        pub = asyncio.create_task(publish_files(port, files))
        async for _ in client.messages:
            got += 1
            if got == 1:
                first = time.perf_counter()
            if got == total:
                last = time.perf_counter()
                break
        await pub
    return (total - 1) / (last - first)


async def throughput(
    url: str, port: int, tmp: Path, messages: int, things: int, batch: int
) -> tuple[float, float, float]:
    """(messages/s, points/s, lost) for the full pipeline."""
    per = messages // things
    files, points = [], 0
    for i in range(things):
        path = tmp / f"gw-{batch}-{i}.txt"
        points += write_lines(path, per, batch=batch, start_seq=1 if batch == 1 else 10**9)
        kind = "oven" if batch > 1 else "proofer"
        files.append((f"openegiz/{SITE}/{kind}/{kind}-b{batch}-{i:03d}/main/telemetry", path))
    async with aiohttp.ClientSession() as http:
        before = await metric(http, url, ACCEPTED)
        points_before = await metric(http, url, "egiz_ingest_points_total")
        t0 = time.perf_counter()
        await publish_files(port, files)
        done = await wait_accepted(http, url, before + per * things, timeout=600)
        applied_points = await metric(http, url, "egiz_ingest_points_total") - points_before
        lost = per * things - (await metric(http, url, ACCEPTED) - before)
        dup = await metric(http, url, "egiz_ingest_duplicate_samples_total")
    elapsed = done - t0
    assert applied_points == points, (applied_points, points)
    return per * things / elapsed, points / elapsed, lost + dup


async def latency(url: str, port: int, rate: int, seconds: float) -> list[float]:
    """Publish at `rate` msg/s with the send time inside; measure when StateChanged reaches a WS client."""
    delays: list[float] = []

    def seen(ev: dict[str, Any]) -> None:
        if ev.get("event") == "StateChanged" and "t_pub" in ev["properties"]:
            delays.append(time.time() - ev["properties"]["t_pub"])

    async with ws_events(url, "mixer", seen):
        async with aiomqtt.Client("127.0.0.1", port, max_inflight_messages=1000) as client:
            n = int(rate * seconds)
            t0 = time.perf_counter()
            for i in range(n):
                due = t0 + i / rate
                wait = due - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                await client.publish(f"openegiz/{SITE}/mixer/mixer-{i % 50:03d}/motor/telemetry", json.dumps(
                    {"ts": time.time(), "seq": i // 50 + 1, "boot": "lat",
                     "properties": {"current": 12.5, "t_pub": time.time()}}), qos=1)
        deadline = time.perf_counter() + 10
        while len(delays) < n and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
    return delays


@asynccontextmanager
async def ws_events(url: str, thing_type: str, seen: Callable[[dict[str, Any]], None]) -> AsyncIterator[None]:
    """A WebSocket client of the gateway subscribed to one Thing type; `seen` gets each event while the
    block runs."""
    async with aiohttp.ClientSession() as http, http.ws_connect(url + "/api/v1/ws",
                                                                headers={"Authorization": f"Bearer {KEY}"}) as ws:
        await ws.send_json({"action": "subscribe", "filter": {"type": thing_type}})
        await ws.receive_json()

        async def read() -> None:
            async for msg in ws:
                seen(json.loads(msg.data))

        reader = asyncio.create_task(read())
        try:
            yield
        finally:
            reader.cancel()


async def populate(port: int, things: int) -> None:
    """10k Things with 3 features each, through MQTT as nodes would."""
    async with aiomqtt.Client("127.0.0.1", port, max_inflight_messages=2000, logger=QUIET) as client:
        pending = []
        for i in range(things):
            base = f"openegiz/{SITE}/oven/oven-{i:05d}"
            now = time.time()
            for j, (feature, props) in enumerate((
                ("thermal", {"temperature_zones": [180.0, 181.0, 182.0], "setpoint": 180.0}),
                ("electrical", {"voltage": {"a": 230.0, "b": 229.0, "c": 231.0}, "power_factor": 0.92}),
                ("business_context", {"current_batch": f"batch-{i}", "recipe": "white-bread"}),
            )):
                pending.append(client.publish(f"{base}/{feature}/telemetry", json.dumps(
                    {"ts": now, "seq": j + 1, "boot": "pop", "properties": props}), qos=1))
            if len(pending) >= 600:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)


async def main() -> None:
    args = options(__doc__, {"messages": 20_000, "registry_things": 1000},
                   messages=200_000, things=20, registry_things=10_000)
    with tempfile.TemporaryDirectory(prefix="egiz-bench-") as d:
        tmp = Path(d)
        async with private_broker(tmp) as port:
            bare = await bare_subscriber(port, tmp, args.messages, args.things)
            emit("bare_aiomqtt_subscriber_rate", bare, "msg/s", "reference")
            async with gateway(tmp, port, tmp / "data") as gw:
                msg_rate, _, lost = await throughput(gw.url, port, tmp, args.messages, args.things, batch=1)
                emit("gateway_ingest_single_sample", msg_rate, "msg/s", ">= 10000", lost=lost)
                emit("gateway_to_bare_ratio", msg_rate / bare, "ratio", ">= 0.5")
                batches = max(args.messages // 20, args.things)
                _, point_rate, lost_b = await throughput(gw.url, port, tmp, batches, args.things, batch=50)
                emit("gateway_ingest_batched", point_rate, "points/s", ">= 100000", lost=lost_b)
                delays = await latency(gw.url, port, 2000, 5 if args.quick else 10)
                emit("publish_to_ws_p50", pct(delays, 50) * 1000, "ms", "reference", samples=len(delays))
                emit("publish_to_ws_p99", pct(delays, 99) * 1000, "ms", "<= 20", samples=len(delays))
            data10k = tmp / "data-10k"
            async with gateway(tmp, port, data10k) as gw:
                await populate(port, args.registry_things)
                async with aiohttp.ClientSession() as http:
                    await wait_accepted(http, gw.url, args.registry_things * 3, timeout=300)
                rss = gw.process.memory_info().rss / 2**20
                emit("gateway_rss_10k_things", rss, "MiB", "<= 200", things=args.registry_things)
            async with gateway(tmp, port, data10k) as gw:
                emit("start_to_ready_10k_things", gw.ready_s, "s", "<= 2", things=args.registry_things)


if __name__ == "__main__":
    run(main)
