"""Telemetry as nodes send it: payload builders and publishers onto a broker, and what a store file kept of
`publish_lines`."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiomqtt
import duckdb

if TYPE_CHECKING:
    from cloud_sync.aggregator import Aggregator
    from tests.helpers.gateways import RunningGateway

THINGS = 20  # ovens of `publish_lines`
T_BASE = 1_790_000_000.0  # device time of `publish_lines`


def reading(seq: int, props: dict[str, Any], *, boot: str = "b1", ts: float | None = None) -> dict[str, Any]:
    """One single-sample telemetry document of the contract payload."""
    return {"ts": time.time() if ts is None else ts, "seq": seq, "boot": boot, "properties": props}


def telemetry(seq: int, props: dict[str, Any], *, boot: str = "b1", ts: float | None = None) -> str:
    """`reading` as the JSON a node publishes."""
    return json.dumps(reading(seq, props, boot=boot, ts=ts))


def topic(site: str, equipment_id: str, feature: str = "thermal", thing_type: str = "oven") -> str:
    return f"openegiz/{site}/{thing_type}/{equipment_id}/{feature}/telemetry"


async def publish_lines(port: int, site: str, tmp: Path, per_thing: int) -> tuple[set[tuple[str, int]], float]:
    """QoS 1 from C publishers (`mosquitto_pub -l`, one per oven), so the publisher is not the bottleneck.

    Every message of a publisher that exits with 0 was acknowledged by the broker (PUBACK), as long
    as the broker is not restarted meanwhile: that set {(equipment id, seq)} is returned with the rate
    reached.
    """
    procs, sent = [], set()
    for i in range(THINGS):
        eid = f"oven-{i:03d}"
        lines = tmp / f"{eid}.jsonl"
        with lines.open("w") as f:
            for seq in range(1, per_thing + 1):
                f.write(json.dumps(reading(seq, {"v": seq}, ts=T_BASE + seq / 100)))
                f.write("\n")
                sent.add((eid, seq))
        procs.append((lines, topic(site, eid)))
    start = time.monotonic()
    running = [await asyncio.create_subprocess_exec(
        "mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-l", "-t", t, "-i", f"pub-{n}",
        stdin=lines.open("rb")) for n, (lines, t) in enumerate(procs)]
    codes = [await p.wait() for p in running]
    assert codes == [0] * THINGS, f"a publisher failed: {codes}"
    return sent, len(sent) / (time.monotonic() - start)


async def publish_ovens(mosquitto: tuple[str, int], gw: RunningGateway, things: int, per_thing: int,
                        first_seq: int = 1) -> None:
    """`per_thing` readings of four points for each of `things` ovens (oven-00, oven-01, ...) of `gw`'s site."""
    async with aiomqtt.Client(*mosquitto) as client:
        for seq in range(first_seq, first_seq + per_thing):
            for i in range(things):
                props = {"temperature": round(180 + seq * 0.01, 2), "zones": [1.5, 2.5], "door": "closed"}
                await client.publish(topic(gw.site, f"oven-{i:02d}"), telemetry(seq, props, boot="b"), qos=1)


def exact(agg: Aggregator, site: str, things: int, per_thing: int) -> bool:
    """Whether the aggregator holds every temperature of `publish_ovens`, each once."""
    for i in range(things):
        seqs = agg.store.stored_seqs(f"{site}:oven-{i:02d}", "temperature")
        if seqs != [(s, 1) for s in range(1, per_thing + 1)]:
            return False
    return True


def stored_lines(db: Path) -> tuple[list[tuple[str, int, int]], set[tuple[str, int]]]:
    """What the DuckDB file `db` (closed by its owner) holds of `publish_lines`: `(thing, seq, copies)` of
    every value stored twice or more, and every `(equipment id, seq)` stored."""
    con = duckdb.connect(str(db), read_only=True)
    rows = con.execute("SELECT s.thing_id, p.seq, count(*) FROM points p JOIN series s ON p.series = s.id "
                       "WHERE s.path = 'v' GROUP BY ALL").fetchall()
    con.close()
    doubled = [(t, s, n) for t, s, n in rows if n > 1]
    return doubled, {(t.split(":", 1)[1], s) for t, s, _ in rows}
