"""The alarm journal across sites, on both storage backends: anomalies of two gateways reach the aggregator
with who acknowledged them and their comments and with the shelves silencing their conditions; the
aggregator filters, pages and exports them as a gateway does; an unshelve and a central acknowledgement
travel too."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest

from tests.helpers import (
    ADMIN_KEY,
    OPERATOR_KEY,
    OTHER_TOKEN,
    TOKEN,
    VIEWER_KEY,
    ZONE_TOO_HOT_RULES,
    AggregatorFactory,
    GatewayFactory,
    aggregator_config,
    auth,
    unique_site,
    uplink,
)

KEYS = [{"key": ADMIN_KEY, "role": "admin"}, {"key": OPERATOR_KEY, "role": "operator", "name": "shift lead"},
        {"key": VIEWER_KEY, "role": "viewer"}]


@pytest.fixture(params=["duckdb", "postgres"])
def storage(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The aggregator's storage settings: a DuckDB file, or a PostgreSQL database of the test's own."""
    if request.param == "duckdb":
        return {"storage.backend": "duckdb"}
    return {"storage.backend": "postgres", "storage.dsn": request.getfixturevalue("pg_dsn")}


async def until(what: str, check: Any, timeout: float = 20.0) -> Any:
    """Poll the async `check` until it returns something true (a busy machine gets generous time)."""
    deadline = time.monotonic() + timeout
    while True:
        got = await check()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what}: still {got!r}"
        await asyncio.sleep(0.1)


async def test_the_journal_across_sites_filters_pages_exports_and_shows_shelves(
        mosquitto: tuple[str, int], start_gateway: GatewayFactory, start_aggregator: AggregatorFactory,
        tmp_path: Path, storage: dict[str, Any]) -> None:
    site_a, site_b = unique_site(), unique_site()
    agg = await start_aggregator(aggregator_config(
        tmp_path, (f"gw-{site_a}", TOKEN, site_a, "line-a"), (f"gw-{site_b}", OTHER_TOKEN, site_b, "line-b"),
        **{"auth.api_keys": KEYS, **storage}))
    rules = tmp_path / "rules.yaml"
    rules.write_text(ZONE_TOO_HOT_RULES)
    detect = {"detect.enabled": True, "detect.rules_file": str(rules)}
    gw_a = await start_gateway(mosquitto, **uplink(site_a, agg.http_port), **detect)
    gw_b = await start_gateway(mosquitto, **uplink(site_b, agg.http_port, **{"uplink.token": OTHER_TOKEN,
                                                                              "gateway.line": "line-b"}), **detect)
    base = f"http://127.0.0.1:{agg.http_port}"
    async with aiomqtt.Client(*mosquitto) as mqtt:
        for site, oven in ((site_a, "oven-001"), (site_a, "oven-002"), (site_b, "oven-001")):
            await mqtt.publish(f"openegiz/{site}/oven/{oven}/thermal/telemetry", json.dumps(
                {"ts": time.time(), "seq": 1, "boot": "b", "properties": {"temperature_zones": [190.0, 290.0, 190.0]}}),
                qos=1)

    async with aiohttp.ClientSession() as http:
        async def get(path: str, key: str = VIEWER_KEY, **params: str) -> tuple[int, Any]:
            async with http.get(base + path, params=params, headers=auth(key)) as r:
                return r.status, await r.json() if r.content_type == "application/json" else await r.text()

        async def page(**params: str) -> dict[str, Any]:
            status, body = await get("/api/v1/anomalies", **params)
            assert status == 200, body
            return body

        async def total(**params: str) -> int:
            return int((await page(**params))["total"])

        await until("three anomalies of two sites", lambda: _at_least(total, 3))
        everything = (await page())["items"]
        of = {(a["site"], a["thingId"].split(":")[1]): a for a in everything}
        first, second, other = of[(site_a, "oven-001")], of[(site_a, "oven-002")], of[(site_b, "oven-001")]
        assert (first["line"], other["line"], other["gatewayId"]) == ("line-a", "line-b", f"gw-{site_b}")

        # acknowledged with a comment and shelved, at the gateway: both reach the aggregator
        status, _ = await gw_a.send("POST", f"/api/v1/anomalies/{first['id']}/ack", {"note": "=checking the probe"},
                                    key=OPERATOR_KEY)
        assert status == 200
        status, shelf = await gw_a.send("POST", f"/api/v1/anomalies/{second['id']}/shelve",
                                        {"hours": 2, "reason": "probe being replaced"}, key=OPERATOR_KEY)
        assert status == 200

        async def journal_arrived() -> bool:
            doc = (await get(f"/api/v1/anomalies/{first['id']}"))[1]
            shelved = (await get(f"/api/v1/anomalies/{second['id']}"))[1]
            return doc["state"] == "acknowledged" and [e["action"] for e in doc["journal"]] == ["acknowledged"] \
                and shelved["shelved"] is not None

        await until("the acknowledgement and the shelf at the aggregator", journal_arrived)
        doc = (await get(f"/api/v1/anomalies/{first['id']}"))[1]
        entry = doc["journal"][0]
        assert (entry["by"], entry["comment"]) == ("operator key", "=checking the probe")
        assert doc["acknowledgedBy"] == "operator key" and doc["shelved"] is None
        shelved = (await get(f"/api/v1/anomalies/{second['id']}"))[1]
        assert (shelved["shelved"]["id"], shelved["shelved"]["by"], shelved["shelved"]["reason"]) == \
            (shelf["id"], "operator key", "probe being replaced")
        assert [e["action"] for e in shelved["journal"]] == ["shelved"]

        # the gateway's filters, across sites
        assert await total(site=site_a) == 2 and await total(site=site_b) == 1 and await total(site="nowhere") == 0
        assert await total(line="line-b") == 1 and await total(line="line-a", site=site_a) == 2
        assert await total(thingId=f"{site_a}:oven-001,{site_b}:oven-001") == 2
        assert await total(type="threshold", severity="critical") == 3 and await total(type="model") == 0
        assert await total(state="acknowledged", site=site_a) == 1 and await total(state="open", site=site_a) == 1
        assert await total(acknowledgedBy="operator key", site=site_a) == 1
        assert await total(**{"from": "2000-01-01T00:00:00Z", "to": "2000-01-02T00:00:00Z"}) == 0
        assert await total(**{"from": "2000-01-01T00:00:00Z", "site": site_b}) == 1
        assert [a["id"] for a in (await page(shelved="true"))["items"]] == [second["id"]]
        assert await total(shelved="false", site=site_a) == 1
        one, two = await page(limit="2"), await page(limit="2", offset="2")
        assert len(one["items"]) == 2 and len(two["items"]) == 1 and one["total"] == 3
        assert {a["id"] for a in one["items"] + two["items"]} == {first["id"], second["id"], other["id"]}
        for bad in ({"format": "xml"}, {"state": "sleeping"}, {"shelved": "maybe"}, {"from": "yesterday"},
                    {"limit": "0"}, {"colour": "red"}):
            status, body = await get("/api/v1/anomalies", **bad)
            assert status == 400 and body["error"] and body["detail"], (bad, body)
        async with http.get(f"{base}/api/v1/anomalies") as r:
            assert r.status == 401

        status, text = await get("/api/v1/anomalies", format="csv")
        assert status == 200
        rows = list(csv.DictReader(io.StringIO(text)))
        assert len(rows) == 3 and {r["id"] for r in rows} == {first["id"], second["id"], other["id"]}
        row = next(r for r in rows if r["id"] == second["id"])
        assert (row["site"], row["line"], row["gatewayId"], row["shelvedBy"]) == \
            (site_a, "line-a", f"gw-{site_a}", "operator key")
        assert next(r for r in rows if r["id"] == first["id"])["acknowledgedBy"] == "operator key"

        # the shelf ended early at the gateway: the aggregator follows
        assert (await gw_a.send("DELETE", f"/api/v1/alarm-shelves/{shelf['id']}", key=OPERATOR_KEY))[0] == 200
        await until("the shelf gone centrally", lambda: _is_zero(total, shelved="true"))

        # acknowledged centrally: the gateway that owns it applies it and journals it; the entry comes back
        async with http.post(f"{base}/api/v1/anomalies/{other['id']}/ack", json={"note": "seen from HQ"},
                             headers=auth(VIEWER_KEY)) as r:
            assert r.status == 403
        async with http.post(f"{base}/api/v1/anomalies/{other['id']}/ack", json={"note": "seen from HQ"},
                             headers=auth(OPERATOR_KEY)) as r:
            assert r.status == 202

        async def central_entry() -> list[Any]:
            doc = (await get(f"/api/v1/anomalies/{other['id']}"))[1]
            return [(e["action"], e["by"], e["comment"]) for e in doc["journal"]] if doc["pending"] == [] else []

        entries = await until("the central acknowledgement journaled", central_entry)
        assert entries == [("acknowledged", "shift lead (central)", "seen from HQ")]
        local = (await gw_b.get(f"/api/v1/anomalies/{other['id']}/journal"))[1]["items"]
        assert [(x["action"], x["by"]) for x in local] == [("acknowledged", "shift lead (central)")]


async def _at_least(total: Any, n: int) -> bool:
    return bool(await total() >= n)


async def _is_zero(total: Any, **params: str) -> bool:
    return bool(await total(**params) == 0)


DOC = {"id": "a-1", "thingId": "s:oven-001", "anomalyType": "threshold", "state": "acknowledged",
       "severity": "critical", "openedAt": "2026-12-07T10:00:00Z", "score": 0.9, "acknowledgedBy": "ayse",
       "resolvedAt": None,
       "journal": [{"at": "2026-12-07T10:01:00Z", "action": "acknowledged", "by": "ayse", "comment": "on it"}],
       "shelved": {"id": "shelf-1", "since": "2026-12-07T10:02:00Z", "until": "2026-12-07T12:02:00Z",
                   "by": "ayse", "reason": "probe being replaced"}}


def _batch(doc: dict[str, Any]) -> bytes:

    from gateway.common.wire import AnomalyDoc, Batch, encode, points_schema

    parsed = AnomalyDoc(doc["id"], doc["thingId"], "open", "critical", 0.0, 0.0, doc)  # sent as it is
    return encode(Batch("gw", 1, "s", "line-a", 0, 0, [], points_schema().empty_table(),
                        anomalies=[parsed]))


def test_the_journal_and_the_shelf_travel_checked() -> None:
    from gateway.common.wire import WireError, decode, fit_anomaly

    got = decode(_batch(DOC)).anomalies[0]
    assert (got.anomaly_type, got.acknowledged_by, got.resolved_at) == ("threshold", "ayse", None)
    assert [(e.action, e.by, e.comment) for e in got.journal] == [("acknowledged", "ayse", "on it")]
    assert got.shelved is not None and got.shelved.until - got.shelved.since == 7200.0
    old = {k: v for k, v in DOC.items() if k not in ("journal", "shelved")}  # from a gateway before journals
    assert decode(_batch(old)).anomalies[0].journal == () and decode(_batch(old)).anomalies[0].shelved is None
    entry = DOC["journal"][0]
    shelf = DOC["shelved"]
    for bad in ({"journal": "acknowledged"}, {"journal": [{**entry, "action": "deleted"}]},
                {"journal": [{**entry, "at": "yesterday"}]}, {"journal": [{**entry, "by": 7}]},
                {"journal": [{**entry, "comment": "x" * 5000}]}, {"journal": [entry] * 201},
                {"shelved": "yes"}, {"shelved": {**shelf, "until": "2026-12-07T09:00:00Z"}},
                {"shelved": {**shelf, "id": ""}}, {"acknowledgedBy": ["ayse"]}, {"resolvedAt": "soon"}):
        with pytest.raises(WireError) as refused:
            decode(_batch({**DOC, **bad}))
        assert refused.value.reason == "bad_document" and "a-1" in refused.value.detail, bad
    # the gateway cuts what it sends to the limits: a long key name never holds an anomaly back
    long = {**DOC, "acknowledgedBy": "k" * 500, "journal": [{**entry, "by": "k" * 500, "comment": "c" * 9000}] * 300}
    fitted = decode(_batch(fit_anomaly(long))).anomalies[0]
    assert len(fitted.journal) == 200 and fitted.acknowledged_by == "k" * 200


def test_a_store_written_before_the_journal_gains_its_columns(tmp_path: Path) -> None:
    """An aggregator upgraded in place: its anomalies stay, and the new filters work on them."""
    import duckdb

    from cloud_sync.store.duck import DuckStore
    from gateway.common.alarms import JournalQuery

    with duckdb.connect(str(tmp_path / "aggregator.duckdb")) as con:
        con.execute("CREATE TABLE anomalies (id VARCHAR PRIMARY KEY, site VARCHAR, line VARCHAR, "
                    "gateway_id VARCHAR, thing_id VARCHAR, state VARCHAR, severity VARCHAR, opened_at DOUBLE, "
                    "score DOUBLE, doc VARCHAR)")
        con.execute("INSERT INTO anomalies VALUES ('old-1', 's', 'line-a', 'gw', 's:oven-001', 'open', 'critical', "
                    "1.0, 0.9, ?)", [json.dumps({"id": "old-1", "thingId": "s:oven-001", "state": "open"})])
    store = DuckStore(tmp_path)
    store.open()
    try:
        items, total = store.anomalies(JournalQuery(site="s"), time.time())
        assert total == 1 and items[0]["id"] == "old-1" and items[0]["journal"] == [] and items[0]["shelved"] is None
        assert store.anomalies(JournalQuery(shelved=False), time.time())[1] == 1
        assert store.anomalies(JournalQuery(shelved=True), time.time())[1] == 0
        assert store.anomalies(JournalQuery(anomaly_types=("threshold",)), time.time())[1] == 0
    finally:
        store.close()
