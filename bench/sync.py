"""Uplink benchmark: prints one JSON line per figure (see DESIGN.md for the targets).

Drain of a 1M-point backlog from a real gateway buffer through the forwarder to a real aggregator
(DuckDB) over HTTP on loopback, and over HTTPS verified against a site CA (`egiz pki`), bytes per
point on the wire, and the aggregator's ingest rate with
10 gateways sending at once, on DuckDB and (when reachable) on PostgreSQL. `--store-batches N` only
feeds the DuckDB store N batches in this process (3 gateways, 200 points, a Thing document and an
anomaly document each) and prints what glibc's heap and the RSS beside DuckDB's own memory grew by
per 1,000 batches after the first 1,000.

    python bench/sync.py [--points 1000000] [--pg postgresql://postgres@127.0.0.1/postgres]
    python bench/sync.py --store-batches 4000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import numpy as np
import pyarrow as pa
from harness import emit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloud_sync.aggregator import Aggregator
from cloud_sync.config import load_aggregator_config
from cloud_sync.store.duck import DuckStore
from gateway.buffer.buffer import TelemetryBuffer
from gateway.bus import EventBus
from gateway.common.pki import init_ca, issue
from gateway.common.readings import Sample
from gateway.common.wire import AnomalyDoc, Batch, ThingDoc, encode, points_schema
from gateway.config import GatewayConfig, load_config
from gateway.memory import native_heap_bytes, resident_mb
from gateway.metrics import GatewayMetrics
from gateway.twin.registry import TwinRegistry
from gateway.uplink.client import uplink_ssl
from gateway.uplink.forwarder import Forwarder

TOKEN = "bench-gateway-token-000000"
KEY = "bench-admin-key-00000000000"
T0 = 1_789_948_800.0


def aggregator(tmp: Path, gateways: int, backend: str = "duckdb", dsn: str = "",
               tls: dict[str, str] | None = None) -> Aggregator:
    cfg = load_aggregator_config(None, environ={}, overrides={**(tls or {}),
        "aggregator.data_dir": str(tmp / f"agg-{backend}"), "http.host": "127.0.0.1", "http.port": 0,
        "aggregator.ingest_concurrency": 16, "auth.api_keys": [{"key": KEY, "role": "admin"}],
        "storage.backend": backend, "storage.dsn": dsn,
        "auth.gateway_tokens": [{"gateway": f"gw-{i}", "token": f"{TOKEN}{i:02d}", "site": "bench",
                                 "line": f"line-{i}"} for i in range(gateways)],
    })
    return Aggregator(cfg)


async def drain(tmp: Path, n: int, tls: bool = False) -> None:
    server: dict[str, str] = {}
    client: dict[str, str] = {}
    if tls:  # a site CA and the aggregator's certificate, as `egiz pki init|issue` make them
        init_ca(tmp / "pki", "bench CA")
        cert, key = issue(tmp / "pki", "aggregator", dns=("localhost",), ips=("127.0.0.1",))
        server = {"http.tls_cert_file": str(cert), "http.tls_key_file": str(key)}
        client = {"uplink.ca_file": str(tmp / "pki" / "ca.crt")}
    agg = aggregator(tmp, 1, tls=server)
    await agg.start()
    cfg = load_config(GatewayConfig, None, environ={}, overrides={
        "gateway.site": "bench", "gateway.line": "line-0", "gateway.id": "gw-0", "gateway.data_dir": str(tmp / "gw"),
        "auth.open": True, "buffer.disk_budget_mb": 0,
        "uplink.url": f"{'https://localhost' if tls else 'http://127.0.0.1'}:{agg.http_port}",
        "uplink.token": f"{TOKEN}00", "uplink.order": "oldest_first", "uplink.batch_points": 100_000,
        "uplink.live_backlog_points": 1_000_000_000, **client,
    })
    metrics = GatewayMetrics()
    buf = TelemetryBuffer(cfg, metrics, uplink=True)
    await buf.start()
    registry = TwinRegistry(tmp / "gw" / "registry.sqlite", EventBus())
    await registry.start()
    rng = np.random.default_rng(2)
    # a line's backlog: 20 ovens x 5 properties at 1 Hz, values with two decimals
    per = n // 100
    for start in range(0, per, 2000):
        for th in range(20):
            vals = np.round(180 + th + rng.normal(0, 0.3, (2000, 5)), 2)
            samples = [Sample("thermal", T0 + s, s + 1, {f"p{k}": float(vals[s - start, k]) for k in range(5)})
                       for s in range(start, min(start + 2000, per))]
            buf.add(f"bench:oven-{th:02d}", "oven", samples, T0 + start, None)
        await buf.flush()
    backlog = buf.committed_id
    fwd = Forwarder(cfg, buf, registry, metrics)
    await fwd.start()
    await fwd.stop()  # only its HTTP session and state are needed: steps are driven here
    fwd._http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}00"},
                                      connector=aiohttp.TCPConnector(ssl=uplink_ssl(cfg.uplink)))
    t0 = time.perf_counter()
    while buf.synced_id < backlog:
        await fwd.step()
    elapsed = time.perf_counter() - t0
    sent = metrics.uplink_bytes._value.get()
    if tls:
        emit("uplink_drain_1m_backlog_tls", backlog / elapsed, "points/s", "reference", points=backlog)
    else:
        emit("uplink_drain_1m_backlog", backlog / elapsed, "points/s", ">= 200000", points=backlog)
        emit("uplink_bytes_per_point", sent / backlog, "bytes", "<= 6", points=backlog)
    await fwd._http.close()
    await buf.stop()
    await registry.stop()
    await agg.stop()


def gateway_batches(i: int, batches: int, per_batch: int) -> list[bytes]:
    rng = np.random.default_rng(i)
    out = []
    for b in range(batches):
        series = np.tile(np.arange(50, dtype=np.int32), per_batch // 50)
        ts = T0 + b * (per_batch // 50) + np.repeat(np.arange(per_batch // 50), 50).astype(float)
        pts = pa.table({"series": series, "ts": ts, "recv": ts + 0.02, "seq": np.arange(per_batch) + b * per_batch,
                        "value": np.round(rng.normal(180, 3, per_batch), 2), "text": pa.nulls(per_batch, pa.string())},
                       schema=points_schema())
        names = [(f"bench:m{i}-{k // 10}", "f", f"p{k % 10}") for k in range(50)]
        out.append(encode(Batch(f"gw-{i}", b + 1, "bench", f"line-{i}", b * per_batch, (b + 1) * per_batch, names,
                                pts)))
    return out


async def concurrent_ingest(tmp: Path, backend: str, dsn: str = "") -> None:
    gateways, batches, per_batch = 10, 10, 20_000
    agg = aggregator(tmp, gateways, backend, dsn)
    await agg.start()
    bodies = [gateway_batches(i, batches, per_batch) for i in range(gateways)]
    url = f"http://127.0.0.1:{agg.http_port}/api/v1/ingest/batches"

    async def one(i: int, http: aiohttp.ClientSession) -> None:
        for body in bodies[i]:
            while True:
                async with http.post(url, data=body, headers={"Authorization": f"Bearer {TOKEN}{i:02d}"}) as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.01)

    async with aiohttp.ClientSession() as http:
        start = time.perf_counter()
        await asyncio.gather(*(one(i, http) for i in range(gateways)))
        elapsed = time.perf_counter() - start
    total = gateways * batches * per_batch
    emit(f"aggregator_ingest_10_gateways_{backend}", total / elapsed, "points/s", "reference", points=total)
    await agg.stop()


def store_memory(tmp: Path, batches: int) -> None:
    """The DuckDB store alone, fed batches as gateways send them: what stays behind per 1,000."""
    gateways, per_batch = 3, 200
    names = {g: [(f"s{g}:m{k // 5}", "f", f"p{k % 5}") for k in range(20)] for g in range(gateways)}

    def batch(g: int, b: int) -> Batch:
        ts = T0 + b + np.repeat(np.arange(per_batch // 20), 20) / 100
        pts = pa.table({"series": np.tile(np.arange(20, dtype=np.int32), per_batch // 20), "ts": ts,
                        "recv": ts + 0.02, "seq": np.arange(per_batch) + b * per_batch,
                        "value": np.full(per_batch, 180.0), "text": pa.nulls(per_batch, pa.string())},
                       schema=points_schema())
        thing, anomaly = f"s{g}:m{b % 4}", f"a-{g}-{b // 10}"
        return Batch(f"gw-{g}", b + 1, f"s{g}", "line-a", b * per_batch, (b + 1) * per_batch, names[g], pts,
                     things=[ThingDoc(thing, "oven", b, T0 + b, {"id": thing, "version": b})],
                     anomalies=[AnomalyDoc(anomaly, thing, "open", "high", T0 + b, 0.5, {"id": anomaly})],
                     sent_at=T0 + b + 1)

    def sample(store: DuckStore) -> tuple[float, float]:
        return (native_heap_bytes() or 0) / 2**20, (resident_mb() or 0.0) - store.memory_bytes() / 2**20

    store = DuckStore(tmp, memory_limit_mb=256)
    store.open()
    marks = []
    for n in range(batches):
        g, b = n % gateways, n // gateways
        assert store.apply(batch(g, b), T0 + b + 1).status == "applied"
        if (n + 1) % 1000 == 0:
            marks.append(sample(store))
    store.close()
    per_1k = len(marks) - 1
    if per_1k < 1:
        raise SystemExit("--store-batches: at least 2000")
    heap = [round(m[0], 2) for m in marks]
    rss = [round(m[1], 2) for m in marks]
    emit("aggregator_native_heap_per_1k_batches", (heap[-1] - heap[0]) / per_1k, "MiB", "flat",
         batches=batches, every_1000=heap)
    emit("aggregator_rss_less_duckdb_per_1k_batches", (rss[-1] - rss[0]) / per_1k, "MiB", "flat",
         batches=batches, every_1000=rss)


async def main(points: int, pg: str) -> None:
    with tempfile.TemporaryDirectory(prefix="egiz-bench-sync-") as tmp:
        await drain(Path(tmp) / "plain", points)
        await drain(Path(tmp) / "tls", points, tls=True)
        await concurrent_ingest(Path(tmp), "duckdb")
        if pg:
            import psycopg

            name = f"egiz_bench_{uuid.uuid4().hex[:8]}"
            try:
                with psycopg.connect(pg, autocommit=True) as conn:
                    conn.execute(f"CREATE DATABASE {name}")
            except psycopg.Error as exc:
                print(json.dumps({"figure": "aggregator_ingest_10_gateways_postgres", "skipped": str(exc)[:120]}))
                return
            try:
                await concurrent_ingest(Path(tmp), "postgres", pg.rsplit("/", 1)[0] + f"/{name}")
            finally:
                with psycopg.connect(pg, autocommit=True) as conn:
                    conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=1_000_000)
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres",
                    help="an admin DSN to create a scratch database ('' to skip PostgreSQL)")
    ap.add_argument("--store-batches", type=int, default=0,
                    help="only the DuckDB store's memory over this many batches (at least 2000)")
    args = ap.parse_args()
    if args.store_batches:
        with tempfile.TemporaryDirectory(prefix="egiz-bench-sync-") as tmp:
            store_memory(Path(tmp), args.store_batches)
    else:
        asyncio.run(main(args.points, args.pg))
