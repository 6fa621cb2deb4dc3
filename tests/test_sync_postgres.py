"""The aggregator on PostgreSQL: two replicas on one database never apply a batch twice."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from pathlib import Path

import aiohttp
import numpy as np
import pyarrow as pa

from gateway.common.wire import Batch, encode, points_schema
from tests.helpers import (
    TOKEN,
    AggregatorFactory,
    LinkedFactory,
    aggregator_config,
    auth,
    exact,
    publish_ovens,
    wait_for,
)


def batches(gateway: str, site: str, count: int, per_batch: int) -> list[bytes]:
    out = []
    for b in range(count):
        seqs = np.arange(b * per_batch + 1, (b + 1) * per_batch + 1)
        ts = 1.79e9 + seqs.astype(float)
        pts = pa.table({"series": pa.array(np.zeros(per_batch, np.int32)), "ts": ts, "recv": ts + 0.01,
                        "seq": seqs, "value": seqs * 0.5, "text": pa.nulls(per_batch, pa.string())},
                       schema=points_schema())
        out.append(encode(Batch(gateway, b + 1, site, "line-1", b * per_batch, (b + 1) * per_batch,
                                [(f"{site}:m-1", "f", "v")], pts)))
    return out


async def test_two_replicas_behind_round_robin_with_retries_store_each_batch_once(
        tmp_path: Path, pg_dsn: str, start_aggregator: AggregatorFactory) -> None:
    cfg = aggregator_config(tmp_path, ("gw-a", TOKEN, "site-a", "line-1"),
                            **{"storage.backend": "postgres", "storage.dsn": pg_dsn})
    replicas = [await start_aggregator(cfg), await start_aggregator(cfg)]
    urls = itertools.cycle([f"http://127.0.0.1:{a.http_port}/api/v1/ingest/batches" for a in replicas])
    bodies = batches("gw-a", "site-a", 40, 250)
    rng = random.Random(5)
    results: list[str] = []
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        async def send(body: bytes) -> None:
            while True:  # a client that retries every answer but success, on the next replica
                async with http.post(next(urls), data=body) as r:
                    doc = await r.json()
                    if r.status == 200:
                        results.append(doc["status"])
                        return
                await asyncio.sleep(0.01)

        for i, body in enumerate(bodies):
            # every batch is sent twice at once, to both replicas, and some a third time later
            await asyncio.gather(send(body), send(body))
            if rng.random() < 0.3:
                await send(bodies[rng.randrange(0, i + 1)])
    assert results.count("applied") == 40
    store = replicas[0].store
    assert store.stored_seqs("site-a:m-1", "v") == [(s, 1) for s in range(1, 40 * 250 + 1)]
    assert store.point_count() == 40 * 250


async def test_gateway_to_postgres_aggregator(pg_dsn: str, mosquitto, start_linked: LinkedFactory) -> None:
    site, agg, gw = await start_linked(aggregator={"storage.backend": "postgres", "storage.dsn": pg_dsn})
    await publish_ovens(mosquitto, gw, things=2, per_thing=30)
    await wait_for(lambda: exact(agg, site, 2, 30), timeout=20)
    await wait_for(lambda: agg.store.thing(f"{site}:oven-01") is not None, timeout=10)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{agg.http_port}/api/v1/things/{site}:oven-00/history"
                            f"?resolution=1m&from={time.time() - 3600}&to={time.time() + 60}&property=temperature",
                            headers=auth()) as r:
            doc = await r.json()
        assert r.status == 200 and sum(doc["series"][0]["points"]["count"]) == 30
