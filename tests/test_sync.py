"""Gateway → aggregator: exactly once in effect through outages, tokens that only write their own line,
batches that are refused whole, clocks that are off."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pyarrow as pa
import pytest

from gateway.broker import find_free_port
from gateway.common.alarms import JournalQuery
from gateway.common.wire import Batch, encode, points_schema
from gateway.memory import native_heap_bytes
from tests.helpers import (
    ADMIN_KEY,
    EGIZ,
    OTHER_TOKEN,
    TOKEN,
    AggregatorFactory,
    GatewayFactory,
    LinkedFactory,
    aggregator_config,
    auth,
    exact,
    publish_ovens,
    unique_site,
    uplink,
    uplink_token,
    wait_for,
)


async def test_points_things_and_history_reach_the_aggregator_exactly_once(
        mosquitto, start_linked: LinkedFactory) -> None:
    site, agg, gw = await start_linked()
    await publish_ovens(mosquitto, gw, things=3, per_thing=40)
    await wait_for(lambda: exact(agg, site, 3, 40), timeout=20)
    async with aiohttp.ClientSession(headers=auth()) as http:
        base = f"http://127.0.0.1:{agg.http_port}"
        await wait_for(lambda: agg.store.thing(f"{site}:oven-02") is not None, timeout=10)
        async with http.get(f"{base}/api/v1/things?site={site}") as r:
            page = await r.json()
        assert page["total"] == 3 and page["items"][0]["line"] == "line-a"
        tid = f"{site}:oven-01"
        q = f"/api/v1/things/{tid}/history?resolution=raw&from={time.time() - 600}&to={time.time() + 60}"
        async with http.get(base + q) as r:
            central = await r.json()
        _, local = await gw.get(q)
        strip = ("thingId",)
        assert {k: v for k, v in central.items() if k not in strip} == {k: v for k, v in local.items()
                                                                           if k not in strip}
        async with http.get(f"{base}/api/v1/sites") as r:
            sites = (await r.json())["items"]
        (mine,) = [s for s in sites if s["site"] == site]
        assert mine["lines"][0]["gatewayId"] == f"gw-{site}" and mine["lines"][0]["online"]
        async with http.get(f"{base}/api/v1/gateways") as r:
            (g,) = [g for g in (await r.json())["items"] if g["site"] == site]
        assert g["points"] == 3 * 40 * 4
    m = gw.service.metrics
    assert m.uplink_points._value.get() == 3 * 40 * 4


async def test_an_outage_of_the_aggregator_drains_afterwards_without_loss_or_duplicates(
        tmp_path: Path, mosquitto, start_gateway: GatewayFactory, start_aggregator: AggregatorFactory) -> None:
    site = unique_site()
    port = find_free_port()
    gw = await start_gateway(mosquitto, **uplink(site, port, **{"uplink.batch_points": 500,
                                                                 "uplink.live_backlog_points": 1000}))
    await publish_ovens(mosquitto, gw, things=4, per_thing=150)  # the aggregator is not there yet
    await wait_for(lambda: gw.service.ingest.accepted_messages == 600)
    await asyncio.sleep(0.5)
    assert gw.service.forwarder is not None and gw.service.forwarder.failing_since is not None
    agg = await start_aggregator(aggregator_config(tmp_path, uplink_token(site), port=port))
    await publish_ovens(mosquitto, gw, things=4, per_thing=50, first_seq=151)  # live points while it backfills
    await wait_for(lambda: exact(agg, site, 4, 200), timeout=30)
    assert agg.store.point_count() == 4 * 200 * 4
    m = gw.service.metrics
    await wait_for(lambda: m.uplink_backlog_points._value.get() == 0, timeout=10)


async def test_a_gateway_writes_only_its_own_site_and_line(tmp_path: Path,
                                                           start_aggregator: AggregatorFactory) -> None:
    agg = await start_aggregator(aggregator_config(tmp_path, ("gw-a", TOKEN, "site-a", "line-1"),
                                                   ("gw-b", OTHER_TOKEN, "site-b", "line-1")))
    url = f"http://127.0.0.1:{agg.http_port}/api/v1/ingest/batches"

    def batch(gateway: str, site: str, line: str, thing: str, seq: int = 1) -> bytes:
        pts = pa.table({"series": pa.array([0], pa.int32()), "ts": [1.7e9], "recv": [1.7e9], "seq": [1],
                        "value": [1.0], "text": pa.nulls(1, pa.string())}, schema=points_schema())
        return encode(Batch(gateway, seq, site, line, 0, 1, [(thing, "f", "p")], pts))

    async with aiohttp.ClientSession() as http:
        async def post(body: bytes, token: str | None) -> tuple[int, dict[str, Any]]:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with http.post(url, data=body, headers=headers) as r:
                return r.status, await r.json()

        assert (await post(batch("gw-a", "site-a", "line-1", "site-a:x"), None))[0] == 401
        assert (await post(batch("gw-a", "site-a", "line-1", "site-a:x"), "not-a-token-at-all"))[0] == 401
        # another gateway's token, its gateway id, another site's Thing, another line: all refused
        status, err = await post(batch("gw-a", "site-a", "line-1", "site-a:x"), OTHER_TOKEN)
        assert status == 403 and "gw-b" in err["detail"]
        assert (await post(batch("gw-a", "site-b", "line-1", "site-b:x"), TOKEN))[0] == 403
        assert (await post(batch("gw-a", "site-a", "line-2", "site-a:x"), TOKEN))[0] == 403
        assert (await post(batch("gw-a", "site-a", "line-1", "site-b:x"), TOKEN))[0] == 403
        assert agg.store.point_count() == 0
        # malformed and truncated batches are refused whole, with a reason
        good = batch("gw-a", "site-a", "line-1", "site-a:x")
        status, err = await post(good[: len(good) // 2], TOKEN)
        assert status == 400 and err["error"] == "malformed"
        assert (await post(b"{}", TOKEN))[0] == 400
        # the real one: applied once; a repeat is a duplicate; a gap is out of order
        assert await post(good, TOKEN) == (200, {"status": "applied", "batch_seq": 1, "points": 1, "actions": []})
        assert (await post(good, TOKEN))[1]["status"] == "duplicate"
        status, err = await post(batch("gw-a", "site-a", "line-1", "site-a:x", seq=3), TOKEN)
        assert status == 409 and err["expected"] == 2
        assert agg.store.point_count() == 1


async def test_a_gateway_clock_minutes_off_keeps_device_and_receive_times(
        tmp_path: Path, start_aggregator: AggregatorFactory) -> None:
    agg = await start_aggregator(aggregator_config(tmp_path, ("gw-a", TOKEN, "site-a", "line-1")))
    now = time.time()
    skew = 300.0  # the gateway's clock is five minutes fast; the devices' NTP time is right
    ts = now - np.arange(10)[::-1]
    pts = pa.table({"series": pa.array([0] * 10, pa.int32()), "ts": ts, "recv": ts + skew + 0.01,
                    "seq": np.arange(1, 11), "value": np.arange(10.0), "text": pa.nulls(10, pa.string())},
                   schema=points_schema())
    body = encode(Batch("gw-a", 1, "site-a", "line-1", 0, 10, [("site-a:m", "f", "v")], pts, sent_at=now + skew))
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{agg.http_port}/api/v1/ingest/batches", data=body,
                             headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 200
        base = f"http://127.0.0.1:{agg.http_port}"
        async with http.get(f"{base}/api/v1/things/site-a:m/history?resolution=raw&from={now - 60}&to={now + 1}",
                            headers=auth()) as r:
            doc = await r.json()
        assert doc["series"][0]["points"]["t"] == [round(t * 1000) for t in ts]
        async with http.get(f"{base}/api/v1/gateways", headers=auth()) as r:
            (g,) = (await r.json())["items"]
        assert g["clockOffsetS"] == pytest.approx(-skew, abs=5)
    raw = agg.store.raw(agg.store.series_of("site-a:m"), 0, 2e9, 100)
    assert np.allclose(raw["ts"], ts)


async def test_the_read_api_needs_a_key(tmp_path: Path, start_aggregator: AggregatorFactory) -> None:
    agg = await start_aggregator(aggregator_config(tmp_path))
    async with aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{agg.http_port}"
        async with http.get(f"{base}/api/v1/sites") as r:
            assert r.status == 401
        async with http.get(f"{base}/api/v1/sites", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 401  # a gateway token is not an API key
        async with http.get(f"{base}/health") as r:
            assert r.status == 200
        async with http.ws_connect(f"{base}/api/v1/ws?access_token={ADMIN_KEY}") as ws:
            first = await ws.receive_json(timeout=5)
            assert first["event"] == "SiteSummaries"


async def test_the_demo_runs_two_sites_by_two_lines_into_one_aggregator(tmp_path: Path) -> None:
    agg_port = find_free_port()
    proc = await asyncio.create_subprocess_exec(
        EGIZ, "demo", "--http-port", "0", "--aggregator-port", str(agg_port),
        "--nodes", "3", "--rate", "5", "--faults", "", "--duration", "60", "--data-dir", str(tmp_path / "demo"),
        stderr=asyncio.subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession() as http:
            while True:
                assert proc.returncode is None, "the demo exited"
                try:
                    async with http.get(f"http://127.0.0.1:{agg_port}/api/v1/sites") as r:
                        sites = (await r.json())["items"] if r.status == 200 else []
                    async with http.get(f"http://127.0.0.1:{agg_port}/api/v1/things?limit=100") as r:
                        total = (await r.json())["total"] if r.status == 200 else 0
                except aiohttp.ClientError:
                    sites, total = [], 0
                if len(sites) == 2 and all(len(s["lines"]) == 2 for s in sites) and total == 14:  # + the PLCs
                    break
                assert time.monotonic() < deadline, f"the aggregator shows {sites} and {total} Things"
                await asyncio.sleep(0.5)
        assert {s["site"] for s in sites} == {"izmir-bakery", "ankara-bakery"}
    finally:
        if proc.returncode is None:
            proc.send_signal(2)
        assert await asyncio.wait_for(proc.wait(), 30) == 0


def test_the_aggregators_maintenance_checkpoints_a_wal_past_its_threshold(tmp_path: Path) -> None:
    """DuckDB skips its own checkpoint while any reader's transaction is open, and an aggregator with
    dashboards open nearly always has one: its WAL, held in memory, must not grow until the limit."""
    from cloud_sync.store.duck import DuckStore

    store = DuckStore(tmp_path, checkpoint_mb=1)
    store.open()
    wal = tmp_path / "aggregator.duckdb.wal"
    try:
        store.con.execute("SET checkpoint_threshold = '1GB'")  # DuckDB's own checkpoint did not come
        for k in range(200):  # batches as they come (one large insert would go to the file, not the WAL)
            store.con.execute("INSERT INTO points SELECT i, 1, i, i, i, i * 0.5, NULL FROM range(?, ?) t(i)",
                              [k * 2000, (k + 1) * 2000])
        assert wal.stat().st_size > 2 * 2**20
        store.maintain(time.time())
        assert (wal.stat().st_size if wal.exists() else 0) < 2**20
        assert store.point_count() == 400_000
    finally:
        store.close()


def test_the_aggregators_duckdb_memory_limit_is_configured_and_checked(tmp_path: Path) -> None:
    """`storage.memory_limit_mb` bounds DuckDB's cache of the points file; EGIZ_* overrides it, and
    a limit too small to run is refused at start naming the key."""
    from cloud_sync.aggregator import make_store
    from cloud_sync.config import load_aggregator_config
    from gateway.common.errors import ConfigError

    where = {"aggregator.data_dir": str(tmp_path), "auth.open": True, "http.host": "127.0.0.1"}
    cfg = load_aggregator_config(None, environ={"EGIZ_STORAGE__MEMORY_LIMIT_MB": "96"}, overrides=where)
    assert cfg.storage.memory_limit_mb == 96
    store = make_store(cfg)
    store.open()
    try:
        limit = store.con.execute("SELECT current_setting('memory_limit')").fetchone()[0]
    finally:
        store.close()
    assert limit.replace(" ", "") in ("96.0MiB", "91.5MiB", "96.0MB"), limit
    with pytest.raises(ConfigError) as err:
        load_aggregator_config(None, environ={}, overrides={**where, "storage.memory_limit_mb": 8})
    assert dict(err.value.problems)["storage.memory_limit_mb"].startswith("must be 64..")


@pytest.mark.skipif(native_heap_bytes() is None, reason="measures glibc's heap")
def test_the_aggregators_batches_leave_the_native_heap_flat(tmp_path: Path) -> None:
    """Every batch moves its gateway's last_seq, claims its Things, and files the Thing and anomaly
    documents that changed. Written with `INSERT ... ON CONFLICT` and a DELETE and an INSERT of the
    same key, 800 batches left 4.0 MiB of native memory behind for good; with an UPDATE of the stored
    rows and an INSERT of the missing ones, 1.1 MiB, most of it DuckDB settling in. Memory, not time:
    the figures do not depend on how fast the machine is."""
    from cloud_sync.store.duck import DuckStore
    from gateway.common.wire import AnomalyDoc, ThingDoc

    t0 = 1_789_948_800.0
    names = [(f"s:m{k}", "f", "p") for k in range(4)]

    def batch(b: int) -> Batch:
        pts = pa.table({"series": np.arange(20, dtype=np.int32) % 4, "ts": np.full(20, t0 + b),
                        "recv": np.full(20, t0 + b), "seq": np.arange(20) + 20 * b, "value": np.full(20, 1.5),
                        "text": pa.nulls(20, pa.string())}, schema=points_schema())
        thing = f"s:m{b % 4}"
        return Batch("gw-s", b + 1, "s", "line-a", 20 * b, 20 * (b + 1), names, pts,
                     things=[ThingDoc(thing, "oven", b, t0 + b, {"id": thing, "version": b})],
                     anomalies=[AnomalyDoc(f"a-{b // 10}", thing, "open", "high", t0 + b, 0.5, {"id": f"a-{b // 10}"})])

    store = DuckStore(tmp_path, memory_limit_mb=128)
    store.open()
    try:
        def apply(first: int, n: int) -> None:
            for b in range(first, first + n):
                assert store.apply(batch(b), t0 + b).status == "applied"

        apply(0, 200)  # DuckDB's own caches and Python's first allocations settle
        before = native_heap_bytes()
        apply(200, 800)
        grown = (native_heap_bytes() or 0) - (before or 0)
        assert grown < 2 * 2**20, f"{grown / 2**20:.2f} MiB more after 800 batches"
        assert store.apply(batch(999), t0).status == "duplicate"
        assert store.point_count() == 1000 * 20
        assert [(g.last_seq, g.points) for g in store.gateways()] == [(1000, 20_000)]
        assert [t["version"] for t in store.things(site="s", line=None, type_=None, limit=10, offset=0)[0]] == \
            [996, 997, 998, 999]
        assert store.anomalies(JournalQuery(limit=1000))[1] == 100
    finally:
        store.close()
