"""Attacks on the aggregator across the network, each end to end against real services: a gateway
presenting its own token with another line's Thing or anomaly, a decompression bomb, a batch whose
points span hundreds of days, negative and absurd times, deep and malformed headers; and the
forwarder that sets refused Things aside instead of retrying them for ever."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from cloud_sync.aggregator import Aggregator
from gateway.broker import find_free_port
from gateway.common.wire import AnomalyDoc, Batch, ThingDoc, encode, points_schema
from tests.helpers import (
    ADMIN_KEY,
    EGIZ,
    OTHER_TOKEN,
    TOKEN,
    VIEWER_KEY,
    AggregatorFactory,
    GatewayFactory,
    RunningGateway,
    aggregator_config,
    aggregator_toml,
    auth,
    egiz_process,
    private_mosquitto,
    telemetry,
    topic,
    unique_site,
    wait_for,
    write_toml,
)

THIRD_TOKEN = "gateway-token-0000000000003"
NOW = time.time()


@pytest.fixture(params=["duckdb", "postgres"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Aggregator overrides for each store (PostgreSQL: a database of the test's own)."""
    if request.param == "duckdb":
        return {}
    return {"storage.backend": "postgres", "storage.dsn": request.getfixturevalue("pg_dsn")}


def lines_of(site: str) -> tuple[tuple[str, str, str, str], ...]:
    """Two gateways of one site on different lines, and one of another site."""
    return (("gw-a", TOKEN, site, "line-1"), ("gw-b", OTHER_TOKEN, site, "line-2"),
            ("gw-c", THIRD_TOKEN, "other-site", "line-1"))


@pytest.fixture
async def site_aggregator(tmp_path: Path, backend: dict[str, Any],
                          start_aggregator: AggregatorFactory) -> tuple[str, Aggregator]:
    """A site of the test's own and an aggregator on the test's backend taking the gateways of `lines_of` it."""
    site = unique_site()
    return site, await start_aggregator(aggregator_config(tmp_path, *lines_of(site), **backend))


def thing_doc(tid: str, version: int, line: str) -> dict[str, Any]:
    return {"id": tid, "type": "oven", "version": version, "lastUpdated": "2026-01-01T00:00:00Z",
            "metadata": {"name": tid, "line": line}, "features": {}}


def anomaly_doc(aid: str, tid: str, state: str = "open") -> dict[str, Any]:
    return {"id": aid, "thingId": tid, "state": state, "severity": "critical", "openedAt": "2026-01-01T00:00:00Z",
            "score": 0.9}


def batch(gateway: str, seq: int, site: str, line: str, *, points: dict[str, list[float]] | None = None,
          things: list[dict[str, Any]] | None = None, deleted: list[str] | None = None,
          anomalies: list[dict[str, Any]] | None = None, ts: float = NOW) -> bytes:
    """An uplink batch: `points` maps a Thing id to the values of its `thermal/temperature`."""
    series, rows = [], {"series": [], "ts": [], "seq": [], "value": []}  # type: list[tuple[str, str, str]], dict[str, list[Any]]
    for i, (tid, values) in enumerate((points or {}).items()):
        series.append((tid, "thermal", "temperature"))
        for n, v in enumerate(values):
            rows["series"].append(i)
            rows["ts"].append(ts + n)
            rows["seq"].append(n + 1)
            rows["value"].append(v)
    n = len(rows["ts"])
    table = pa.table({"series": pa.array(rows["series"], pa.int32()), "ts": pa.array(rows["ts"], pa.float64()),
                      "recv": pa.array([t + 0.01 for t in rows["ts"]], pa.float64()),
                      "seq": pa.array(rows["seq"], pa.int64()), "value": pa.array(rows["value"], pa.float64()),
                      "text": pa.nulls(n, pa.string())}, schema=points_schema())
    return encode(Batch(gateway, seq, site, line, 0, n, series, table,
                        [ThingDoc.parse(d) for d in things or []], deleted or [], {}, NOW,
                        [AnomalyDoc.parse(a) for a in anomalies or []]))


async def post(http: aiohttp.ClientSession, agg: Aggregator | int, body: bytes, token: str) -> tuple[int, Any]:
    port = agg if isinstance(agg, int) else agg.http_port
    async with http.post(f"http://127.0.0.1:{port}/api/v1/ingest/batches", data=body,
                         headers={"Authorization": f"Bearer {token}"}) as r:
        return r.status, await r.json(content_type=None)


# --------------------------------------------------------------------------------- ownership

async def test_a_gateway_with_its_own_token_cannot_touch_another_gateways_thing_or_anomaly(
        site_aggregator: tuple[str, Aggregator]) -> None:
    site, agg = site_aggregator
    oven_b = f"{site}:oven-b"
    async with aiohttp.ClientSession() as http:
        # gw-b registers its oven, five points and an anomaly: the first to write them, it owns them
        status, _ = await post(http, agg, batch("gw-b", 1, site, "line-2", points={oven_b: [1, 2, 3, 4, 5]},
                                                things=[thing_doc(oven_b, 3, "line-2")],
                                                anomalies=[anomaly_doc("anom-b-1", oven_b)]), OTHER_TOKEN)
        assert status == 200
        before = (agg.store.point_count(), agg.store.thing(oven_b), agg.store.anomaly("anom-b-1"))
        attacks = {
            "replace its document": batch("gw-a", 1, site, "line-1", things=[thing_doc(oven_b, 999, "line-1")]),
            "add to its history": batch("gw-a", 1, site, "line-1", points={oven_b: [9, 9, 9, 9, 9]}),
            "delete it": batch("gw-a", 1, site, "line-1", deleted=[oven_b]),
            "overwrite its anomaly": batch("gw-a", 1, site, "line-1",
                                           anomalies=[anomaly_doc("anom-b-1", f"{site}:oven-a", "resolved")]),
            "raise an anomaly on it": batch("gw-a", 1, site, "line-1", anomalies=[anomaly_doc("anom-a-1", oven_b)]),
        }
        for what, body in attacks.items():
            # mixed with the gateway's own, legitimate oven: the whole batch is refused, nothing applied
            status, err = await post(http, agg, body, TOKEN)
            assert status == 403, what
            assert err["error"] == "foreign_thing", what
            assert oven_b in err["detail"] or "anom-b-1" in err["detail"], what
            assert oven_b in err["thingIds"] or err["anomalyIds"] == ["anom-b-1"], what
        # another site's gateway overwriting it by id: refused too
        status, err = await post(http, agg, batch("gw-c", 1, "other-site", "line-1",
                                                  anomalies=[anomaly_doc("anom-b-1", "other-site:x")]), THIRD_TOKEN)
        assert status == 403 and err["anomalyIds"] == ["anom-b-1"]
        assert (agg.store.point_count(), agg.store.thing(oven_b), agg.store.anomaly("anom-b-1")) == before
        assert agg.store.stored_seqs(oven_b, "temperature") == [(s, 1) for s in range(1, 6)]
        # nothing of the refused batches counted: gw-a's first real batch is still number 1
        status, ok = await post(http, agg, batch("gw-a", 1, site, "line-1", points={f"{site}:oven-a": [1.0]}),
                                TOKEN)
        assert (status, ok["status"]) == (200, "applied")
        owner = f"http://127.0.0.1:{agg.http_port}/api/v1/things/{oven_b}/owner"
        async with http.get(owner, headers=auth()) as r:
            assert (await r.json())["gatewayId"] == "gw-b"
        # an admin moves the machine to line 1: from now on gw-a writes it, and gw-b no longer may
        async with http.put(owner, json={"gateway": "gw-c"}, headers=auth()) as r:
            assert r.status == 400  # another site's gateway
        async with http.put(owner, json={"gateway": "gw-a"}, headers=auth()) as r:
            assert r.status == 200 and (await r.json())["formerGatewayId"] == "gw-b"
        status, _ = await post(http, agg, batch("gw-a", 2, site, "line-1", things=[thing_doc(oven_b, 1, "line-1")]),
                               TOKEN)
        assert status == 200
        doc = agg.store.thing(oven_b)
        assert doc is not None and (doc["gatewayId"], doc["line"], doc["version"]) == ("gw-a", "line-1", 1)
        status, err = await post(http, agg, batch("gw-b", 2, site, "line-2", points={oven_b: [7.0]}), OTHER_TOKEN)
        assert status == 403 and err["thingIds"] == [oven_b]


async def start_line(start_gateway: GatewayFactory, broker: tuple[str, int], data_dir: Path, site: str,
                     gateway: str, line: str, token: str, agg: Aggregator) -> RunningGateway:
    """A line's gateway on its own broker, forwarding to `agg` with its own token, quickly."""
    return await start_gateway(broker, **{
        "gateway.site": site, "gateway.line": line, "gateway.id": gateway, "gateway.data_dir": str(data_dir),
        "uplink.url": f"http://127.0.0.1:{agg.http_port}", "uplink.token": token, "uplink.interval_s": 0.05,
        "uplink.things_interval_s": 0.2, "uplink.retry_min_s": 0.05, "uplink.retry_max_s": 0.5})


async def publish(broker: tuple[str, int], site: str, equipment: str, seqs: range, value: float) -> None:
    async with aiomqtt.Client(*broker) as client:
        for seq in seqs:
            await client.publish(topic(site, equipment), telemetry(seq, {"temperature": value + seq}, boot="b"),
                                 qos=1)


async def test_two_lines_of_one_site_the_forwarder_quarantines_a_foreign_thing_and_sends_the_rest(
        tmp_path: Path, site_aggregator: tuple[str, Aggregator], start_gateway: GatewayFactory) -> None:
    site, agg = site_aggregator
    oven_a, oven_b = f"{site}:oven-a", f"{site}:oven-b"
    # each line has its own broker, as on the floor
    async with private_mosquitto(tmp_path / "line-1") as broker_1, private_mosquitto(tmp_path / "line-2") as broker_2:
        b1, b2 = (broker_1.host, broker_1.port), (broker_2.host, broker_2.port)
        gw_b = await start_line(start_gateway, b2, tmp_path / "gw-b", site, "gw-b", "line-2", OTHER_TOKEN, agg)
        gw_a = await start_line(start_gateway, b1, tmp_path / "gw-a", site, "gw-a", "line-1", TOKEN, agg)
        await publish(b2, site, "oven-b", range(1, 21), 100.0)
        await wait_for(lambda: agg.store.stored_seqs(oven_b, "temperature") == [(s, 1) for s in range(1, 21)],
                       timeout=40)
        await wait_for(lambda: agg.store.owner(oven_b) == "gw-b", timeout=30)
        # line 1 has a machine with the same equipment id (or pretends to): its points are held back
        await publish(b1, site, "oven-b", range(1, 11), 900.0)
        await publish(b1, site, "oven-a", range(1, 21), 500.0)
        await wait_for(lambda: agg.store.stored_seqs(oven_a, "temperature") == [(s, 1) for s in range(1, 21)],
                       timeout=40)
        fwd = gw_a.service.forwarder
        assert fwd is not None
        await wait_for(lambda: fwd.quarantine.points == 10, timeout=30)
        status, held = await gw_a.get("/api/v1/uplink/quarantine", key=VIEWER_KEY)
        assert status == 200 and [h["id"] for h in held["items"]] == [oven_b]
        assert held["items"][0]["points"] == 10 and "another gateway" in held["items"][0]["reason"]
        status, ready = await gw_a.get("/ready")
        assert status == 200 and any("quarantine" in w for w in ready["warnings"])
        _, metrics = await gw_a.get("/metrics")
        assert "egiz_uplink_quarantine_things 1.0" in metrics and "egiz_uplink_quarantine_points 10.0" in metrics
        # gw-b's oven is untouched: its line, its owner, only its own points
        # its document goes up with gw-b's next Thing round, which may come after its points
        await wait_for(lambda: agg.store.thing(oven_b) is not None, timeout=30)
        doc = agg.store.thing(oven_b)
        assert doc is not None and (doc["gatewayId"], doc["line"]) == ("gw-b", "line-2")
        assert agg.store.stored_seqs(oven_b, "temperature") == [(s, 1) for s in range(1, 21)]
        # the forwarder is not stuck: new points of line 1 keep flowing
        await publish(b1, site, "oven-a", range(21, 31), 500.0)
        await wait_for(lambda: agg.store.stored_seqs(oven_a, "temperature") == [(s, 1) for s in range(1, 31)],
                       timeout=40)
        assert fwd.failing_since is None
        # only an admin may decide; a viewer may not
        assert (await gw_a.send("POST", f"/api/v1/uplink/quarantine/{oven_b}/resend", key=VIEWER_KEY))[0] == 403
        # the machine really moved to line 1: the aggregator's admin transfers it, the gateway's re-sends
        async with aiohttp.ClientSession() as http, http.put(
                f"http://127.0.0.1:{agg.http_port}/api/v1/things/{oven_b}/owner", json={"gateway": "gw-a"},
                headers=auth(ADMIN_KEY)) as r:
            assert r.status == 200
        status, _ = await gw_a.send("POST", f"/api/v1/uplink/quarantine/{oven_b}/resend")
        assert status == 202
        await wait_for(lambda: not fwd.quarantine.held, timeout=40)
        await wait_for(lambda: agg.store.stored_seqs(oven_b, "temperature")
                       == [(s, 2) for s in range(1, 11)] + [(s, 1) for s in range(11, 21)], timeout=40)
        await wait_for(lambda: (agg.store.thing(oven_b) or {}).get("line") == "line-1", timeout=40)
        assert (await gw_a.get("/api/v1/uplink/quarantine"))[1]["items"] == []
        # and now it is gw-b whose points of that Thing are held, while its other machines flow
        await publish(b2, site, "oven-b", range(21, 26), 100.0)
        fwd_b = gw_b.service.forwarder
        assert fwd_b is not None
        await wait_for(lambda: fwd_b.quarantine.points == 5, timeout=40)
        status, dropped = await gw_b.send("DELETE", f"/api/v1/uplink/quarantine/{oven_b}")
        assert status == 200 and dropped["state"] == "dropped" and not fwd_b.quarantine.held
        await gw_a.http.close()
        await gw_b.http.close()
        await gw_a.service.stop()
        await gw_b.service.stop()


# --------------------------------------------------------------------------------- malformed input

def bomb() -> bytes:
    """About 30 KB that a naive reader inflates to more than 1 GB: 24M rows of zeros, zstd-compressed."""
    n = 24_000_000
    zeros = pa.array(np.zeros(n, np.int64))
    flags = pa.array(np.zeros(n, bool))
    header = json.dumps({"format": "egiz-batch/1", "gateway_id": "gw-a", "batch_seq": 1, "site": "s1",
                         "line": "line-1", "first_id": 0, "last_id": n, "scale": 0,
                         "series": [["s1:oven-a", "thermal", "temperature"]]}).encode()
    table = pa.table({"series_delta": zeros, "ts_ms_delta": zeros, "recv_lag_ms": zeros, "seq_delta": zeros,
                      "seq_null": flags, "is_num": flags, "text": pa.nulls(n, pa.string()),
                      "value_scaled_delta": zeros}).replace_schema_metadata(
        {"egiz": pa.compress(header, codec="zstd", asbytes=True), "egiz_size": str(len(header))})
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema, options=ipc.IpcWriteOptions(compression="zstd")) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


async def test_a_decompression_bomb_is_refused_before_it_is_inflated(tmp_path: Path) -> None:
    body = bomb()
    assert len(body) < 60_000
    port = find_free_port()
    config = aggregator_toml(tmp_path, port, "s1", auth={"gateway_tokens": [
        {"gateway": "gw-a", "token": TOKEN, "site": "s1", "line": "line-1"}]})
    url = f"http://127.0.0.1:{port}"
    async with egiz_process("aggregator", "run", "--config", str(config), url=url, log=tmp_path / "agg.log",
                            what="aggregator") as proc, aiohttp.ClientSession() as http:
        before = peak_rss_mb(proc.pid)
        for _ in range(3):
            status, err = await post(http, port, body, TOKEN)
            assert status == 400 and err["error"] == "too_large", err
        grown = peak_rss_mb(proc.pid) - before
        assert grown < 150, f"the aggregator's peak memory grew by {grown:.0f} MB on a {len(body)} byte body"
        async with http.get(url + "/ready") as r:
            assert r.status == 200


async def test_negative_absurd_times_deep_headers_and_bad_strings_are_a_400_naming_the_thing(
        site_aggregator: tuple[str, Aggregator]) -> None:
    site, agg = site_aggregator
    oven = f"{site}:oven-a"
    async with aiohttp.ClientSession() as http:
        for ts in (-5.0, 0.0, 1e12, NOW + 365 * 86400):
            status, err = await post(http, agg, batch("gw-a", 1, site, "line-1", points={oven: [1.0]}, ts=ts), TOKEN)
            assert (status, err["error"], err["thingIds"]) == (400, "bad_time", [oven]), ts
        bad_docs = [
            {**thing_doc(oven, 1, "line-1"), "metadata": {"name": "nul \x00 inside"}},
            {**thing_doc(oven, 1, "line-1"), "type": "oven\ud800"},
            {**thing_doc(oven, 1, "line-1"), "version": 2**70},
            {**thing_doc(oven, 1, "line-1"), "lastUpdated": "yesterday"},
        ]
        for doc in bad_docs:
            raw = json.dumps({"format": "egiz-batch/1", "gateway_id": "gw-a", "batch_seq": 1, "site": site,
                              "line": "line-1", "first_id": 0, "last_id": 0, "scale": 0, "series": [],
                              "things": [doc]})
            status, err = await post(http, agg, raw_batch(raw), TOKEN)
            assert (status, err["error"], err["thingIds"]) == (400, "bad_document", [oven]), doc
        status, err = await post(http, agg, b"", TOKEN)  # an empty body: a 400 at once, not a hung request
        assert status == 400 and err["error"] == "malformed"
        deep = '{"format": "egiz-batch/1", "x": ' + "[" * 200_000 + "]" * 200_000 + "}"
        status, err = await post(http, agg, raw_batch(deep), TOKEN)
        assert status == 400 and err["error"] == "malformed"
        text = pa.array(["ok\x00no"], pa.string())
        status, err = await post(http, agg, raw_batch(json.dumps({
            "format": "egiz-batch/1", "gateway_id": "gw-a", "batch_seq": 1, "site": site, "line": "line-1",
            "first_id": 0, "last_id": 1, "scale": 0, "series": [[oven, "f", "p"]]}), rows=1, text=text), TOKEN)
        assert (status, err["error"], err["thingIds"]) == (400, "bad_values", [oven])
        assert agg.store.point_count() == 0 and agg.store.thing(oven) is None
        # and a good batch afterwards is applied as number 1
        status, ok = await post(http, agg, batch("gw-a", 1, site, "line-1", points={oven: [1.0]}), TOKEN)
        assert (status, ok["status"]) == (200, "applied")


def raw_batch(header: str, rows: int = 0, text: pa.Array | None = None) -> bytes:
    """An Arrow stream with a header as given (not necessarily valid) and `rows` zero points."""
    zeros = pa.array(np.zeros(rows, np.int64))
    table = pa.table({"series_delta": zeros, "ts_ms_delta": pa.array(np.full(rows, int(NOW * 1000))),
                      "recv_lag_ms": zeros, "seq_delta": zeros, "seq_null": pa.array(np.zeros(rows, bool)),
                      "is_num": pa.array(np.zeros(rows, bool)),
                      "text": text if text is not None else pa.nulls(rows, pa.string()),
                      "value_scaled_delta": zeros})
    raw = header.encode("utf-8", "surrogatepass")
    table = table.replace_schema_metadata({"egiz": pa.compress(raw, codec="zstd", asbytes=True),
                                           "egiz_size": str(len(raw))})
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


async def test_a_batch_spanning_many_days_creates_only_the_partitions_it_needs_and_at_most_the_cap(
        tmp_path: Path, pg_dsn: str, start_aggregator: AggregatorFactory) -> None:
    import psycopg

    site = unique_site()
    agg = await start_aggregator(aggregator_config(tmp_path, *lines_of(site), **{
        "storage.backend": "postgres", "storage.dsn": pg_dsn, "storage.max_partitions_per_batch": 16}))
    oven, stray = f"{site}:oven-a", f"{site}:oven-z"

    def partitions() -> int:
        with psycopg.connect(pg_dsn) as conn:
            row = conn.execute("SELECT count(*) FROM pg_inherits WHERE inhparent = 'egiz_points'::regclass").fetchone()
            return int(row[0]) if row else 0

    async with aiohttp.ClientSession() as http:
        # two points 200 days apart: two partitions, not 201
        far = batch("gw-a", 1, site, "line-1", points={oven: [1.0]}, ts=NOW - 200 * 86400)
        status, _ = await post(http, agg, far, TOKEN)
        near = batch("gw-a", 2, site, "line-1", points={oven: [2.0]})
        status2, _ = await post(http, agg, near, TOKEN)
        assert (status, status2) == (200, 200) and partitions() == 2
        # one Thing's clock jumps about over 40 days: refused, naming it, and nothing created
        series = [(oven, "thermal", "temperature"), (stray, "thermal", "temperature")]
        ts = [NOW] * 20 + [NOW - d * 86400 for d in range(1, 41)]
        table = pa.table({"series": pa.array([0] * 20 + [1] * 40, pa.int32()), "ts": ts, "recv": ts,
                          "seq": list(range(60)), "value": [1.0] * 60, "text": pa.nulls(60, pa.string())},
                         schema=points_schema())
        status, err = await post(http, agg, encode(Batch("gw-a", 3, site, "line-1", 0, 60, series, table)), TOKEN)
        assert (status, err["error"], err["thingIds"]) == (400, "too_many_partitions", [stray])
        assert partitions() == 2 and agg.store.point_count() == 2


async def test_a_batch_rolled_back_by_postgresql_leaves_no_series_or_partition_cached(
        tmp_path: Path, pg_dsn: str, start_aggregator: AggregatorFactory) -> None:
    import psycopg

    site = unique_site()
    agg = await start_aggregator(aggregator_config(tmp_path, *lines_of(site), **{
        "storage.backend": "postgres", "storage.dsn": pg_dsn}))
    new = f"{site}:new"
    day = NOW - 30 * 86400  # a day no partition exists for yet
    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # the database fails the batch after its points went in
        conn.execute("CREATE FUNCTION egiz_t_fail() RETURNS trigger LANGUAGE plpgsql AS "
                     "$$ BEGIN RAISE EXCEPTION 'disk full (test)'; END $$")
        conn.execute("CREATE TRIGGER egiz_t_fail BEFORE INSERT ON egiz_things FOR EACH ROW "
                     "EXECUTE FUNCTION egiz_t_fail()")
    body = batch("gw-a", 1, site, "line-1", points={new: [1.0, 2.0, 3.0]}, things=[thing_doc(new, 1, "line-1")],
                 ts=day)
    async with aiohttp.ClientSession() as http:
        status, err = await post(http, agg, body, TOKEN)
        assert status == 503 and err["error"] == "store_unavailable"
        assert new not in {k.thing_id for k, _t in agg.store.series_keys.values()}
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("DROP TRIGGER egiz_t_fail ON egiz_things")
        status, ok = await post(http, agg, body, TOKEN)  # the gateway's retry
        assert (status, ok["status"], ok["points"]) == (200, "applied", 3)
    assert agg.store.stored_seqs(new, "temperature") == [(1, 1), (2, 1), (3, 1)]
    with psycopg.connect(pg_dsn) as conn:
        orphans = conn.execute("SELECT count(*) FROM egiz_points p LEFT JOIN egiz_series s ON p.series = s.id "
                               "WHERE s.id IS NULL").fetchone()
    assert orphans == (0,)


# --------------------------------------------------------------------------------- the service's own guards

async def test_duplicate_tokens_and_open_mode_on_the_network_are_refused_at_start(tmp_path: Path) -> None:
    base = {"aggregator": {"data_dir": tmp_path / "agg"}, "http": {"host": "127.0.0.1", "port": find_free_port()}}
    same = {"auth": {"api_keys": [{"key": ADMIN_KEY, "role": "admin"}], "gateway_tokens": [
        {"gateway": "gw-a", "token": TOKEN, "site": "s1", "line": "l1"},
        {"gateway": "gw-b", "token": TOKEN, "site": "s1", "line": "l2"}]}}
    proc = await asyncio.create_subprocess_exec(EGIZ, "aggregator", "run", "--config",
                                                str(write_toml(tmp_path / "dup.toml", {**base, **same})),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2 and b"auth.gateway_tokens[1].token" in out and TOKEN.encode() not in out
    wide = {**base, "http": {"host": "0.0.0.0", "port": find_free_port()}, "auth": {"open": True}}
    proc = await asyncio.create_subprocess_exec(EGIZ, "aggregator", "run", "--config",
                                                str(write_toml(tmp_path / "open.toml", wide)),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2 and b"auth.open" in out and b"auth.open_remote" in out
    forced = {**wide, "auth": {"open": True, "open_remote": True}}
    proc = await asyncio.create_subprocess_exec(EGIZ, "aggregator", "check", "--config",
                                                str(write_toml(tmp_path / "forced.toml", forced)),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0


async def test_open_mode_warns_and_the_websocket_has_a_client_cap(
        tmp_path: Path, start_aggregator: AggregatorFactory, caplog: pytest.LogCaptureFixture) -> None:
    agg = await start_aggregator(aggregator_config(tmp_path, **{"auth.open": True, "auth.api_keys": [],
                                                                "aggregator.ws_max_clients": 2}))
    assert any("auth.open" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    base = f"http://127.0.0.1:{agg.http_port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/ready") as r:
            assert any("auth.open" in w for w in (await r.json())["warnings"])
        async with http.ws_connect(base + "/api/v1/ws") as one, http.ws_connect(base + "/api/v1/ws") as two:
            assert (await one.receive_json())["event"] == (await two.receive_json())["event"] == "SiteSummaries"
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(base + "/api/v1/ws")
            assert refused.value.status == 503
        async with http.ws_connect(base + "/api/v1/ws") as again:  # a slot is free again
            assert (await again.receive_json())["event"] == "SiteSummaries"
        async with http.get(base + "/metrics") as r:
            assert "egiz_aggregator_ws_refused_total 1.0" in await r.text()


async def test_a_thing_the_aggregator_can_never_take_is_held_and_the_line_keeps_forwarding(
        tmp_path: Path, mosquitto: tuple[str, int], start_gateway: GatewayFactory,
        start_aggregator: AggregatorFactory) -> None:
    site = unique_site()
    agg = await start_aggregator(aggregator_config(tmp_path, ("gw-a", TOKEN, site, "line-a")))
    gw = await start_line(start_gateway, mosquitto, tmp_path / "gw-a", site, "gw-a", "line-a", TOKEN, agg)
    odd = f"{site}:odd-1"
    status, _ = await gw.send("POST", "/api/v1/things", {"id": odd, "type": "oven",
                                                         "metadata": {"name": "nul \u0000 in a name"}})
    assert status == 201  # the line accepts it; the aggregator refuses it (400 naming it) for ever
    await publish(mosquitto, site, "odd-1", range(1, 6), 1.0)
    await publish(mosquitto, site, "oven-ok", range(1, 11), 1.0)
    await wait_for(lambda: agg.store.stored_seqs(f"{site}:oven-ok", "temperature") == [(s, 1) for s in range(1, 11)],
                   timeout=40)
    fwd = gw.service.forwarder
    assert fwd is not None
    await wait_for(lambda: fwd.quarantine.holds_thing(odd), timeout=30)  # its document went up and was refused
    # Its points may have gone up before its document was first refused; from then on they are held:
    # every one of the five is either stored once or held, none lost, none doubled.
    await publish(mosquitto, site, "odd-1", range(6, 9), 1.0)
    await wait_for(lambda: fwd.quarantine.points + len(agg.store.stored_seqs(odd, "temperature")) == 8
                   and fwd.quarantine.points >= 3, timeout=40)
    assert all(copies == 1 for _seq, copies in agg.store.stored_seqs(odd, "temperature"))
    (held,) = (await gw.get("/api/v1/uplink/quarantine"))[1]["items"]
    assert held["id"] == odd and "bad_document" in held["reason"]
    assert agg.store.thing(odd) is None
    _, metrics = await gw.get("/metrics")
    assert 'egiz_uplink_batches_total{result="refused"}' in metrics
