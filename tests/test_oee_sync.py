"""OEE upstream: two lines of one site forward their OEE records; the aggregator serves the same
/api/v1/oee and /api/v1/downtime per line, site and across sites, a site being the time-weighted
combination of its lines."""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt

from gateway.common.timefmt import iso_utc
from gateway.common.wire import Batch, OeePeriodDoc, decode, encode
from tests.helpers import (
    ADMIN_KEY,
    OTHER_TOKEN,
    AggregatorFactory,
    GatewayFactory,
    aggregator_config,
    auth,
    unique_site,
    uplink,
    uplink_token,
)

RULES = {"mixer": {"running": [{"property": "motor.current", "op": ">", "value": 3.0}],
                   "good_counter": "production.good", "ideal_cycle_s": 2.0}}


async def publish_run(mosquitto: tuple[str, int], root: str, site: str, eid: str, t0: float, minutes: int,
                      idle: range, per_minute: int) -> None:
    """A mixer's readings, one a minute: running except in `idle`, `per_minute` units a running minute."""
    motor, production, good = [], [], 0
    for i in range(minutes):
        running = i not in idle
        good += per_minute if running and i else 0
        motor.append({"ts": t0 + 60 * i, "seq": 2 * i + 1, "properties": {"current": 5.0 if running else 1.0}})
        production.append({"ts": t0 + 60 * i, "seq": 2 * i + 2, "properties": {"good": good}})
    async with aiomqtt.Client(*mosquitto, identifier=f"node-{site}-{eid}") as node:
        for feature, samples in (("motor", motor), ("production", production)):
            await node.publish(f"{root}/{site}/mixer/{eid}/{feature}/telemetry",
                               json.dumps({"boot": f"b-{feature}", "samples": samples}), qos=1)


async def test_site_oee_is_the_time_weighted_combination_of_its_lines(
        mosquitto: tuple[str, int], start_gateway: GatewayFactory, start_aggregator: AggregatorFactory,
        tmp_path: Path) -> None:
    site = unique_site()
    agg = await start_aggregator(aggregator_config(tmp_path, uplink_token(site),
                                                   (f"gw-{site}-b", OTHER_TOKEN, site, "line-b")))
    assert agg.http_port is not None
    oee = {"oee.enabled": True, "oee.types": RULES, "oee.flush_interval_s": 0.2}
    gw_a = await start_gateway(mosquitto, **uplink(site, agg.http_port), **oee)
    gw_b = await start_gateway(mosquitto, **uplink(site, agg.http_port, **{
        "gateway.id": f"gw-{site}-b", "gateway.line": "line-b", "uplink.token": OTHER_TOKEN}), **oee,
        **{"gateway.data_dir": str(tmp_path / "data-b"),  # line b's nodes publish to its own broker topics
           "ingest.telemetry_topic": "line-b/{site}/{type}/{equipment_id}/{feature}/telemetry",
           "ingest.status_topic": "line-b/{site}/{type}/{equipment_id}/status",
           "ingest.command_topic": "line-b/{site}/{type}/{equipment_id}/cmd"})
    t0 = math.floor(time.time() / 3600) * 3600 - 4 * 3600
    await publish_run(mosquitto, "openegiz", site, "mixer-1", t0, 120, range(60, 90), 25)  # 90 of 120 min running
    await publish_run(mosquitto, "line-b", site, "mixer-2", t0, 60, range(10, 40), 28)  # 30 of 60 min running
    span = {"from": iso_utc(t0), "to": iso_utc(t0 + 3 * 3600)}
    base = f"http://127.0.0.1:{agg.http_port}"

    async def central(params: dict[str, str]) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http, \
                http.get(base + "/api/v1/oee", params={**params, **span}, headers=auth(ADMIN_KEY)) as r:
            body = await r.json()
            assert r.status == 200, body
            return body

    lines = {}
    for gw, line in ((gw_a, "line-a"), (gw_b, "line-b")):
        deadline = time.monotonic() + 20  # readings applied, the machine offline an hour later, all forwarded
        while True:
            local = (await gw.get("/api/v1/oee", params={"scope": "line", "id": line, "by": "none", **span}))[1]
            there = await central({"scope": "line", "id": f"{site}/{line}", "by": "none"})
            if local["total"]["plannedProductionS"] > 0 and local["total"]["stopS"]["offline"] > 0 \
                    and there["total"] == local["total"]:
                break
            assert time.monotonic() < deadline, (local["total"], there["total"])
            await asyncio.sleep(0.2)
        lines[line] = local["total"]
    a, b = lines["line-a"], lines["line-b"]
    assert a["runS"] == 90 * 60 and b["runS"] == 30 * 60  # offline a minute after the last reading

    site_total = (await central({"scope": "site", "id": site, "by": "none"}))["total"]
    weighted = (a["oee"] * a["plannedProductionS"] + b["oee"] * b["plannedProductionS"]) / \
        (a["plannedProductionS"] + b["plannedProductionS"])
    assert abs(site_total["oee"] - weighted) < 1e-3, (site_total, a, b)
    avail = (a["runS"] + b["runS"]) / (a["plannedProductionS"] + b["plannedProductionS"])
    assert site_total["availability"] == round(avail, 4)
    assert site_total["good"] == a["good"] + b["good"]
    fleet = (await central({"by": "hour"}))
    assert fleet["scope"] == "all" and fleet["total"]["good"] >= site_total["good"]
    async with aiohttp.ClientSession() as http, http.get(base + "/api/v1/downtime", params={
            "scope": "site", "id": site, **span}, headers=auth(ADMIN_KEY)) as r:
        down = await r.json()
    assert r.status == 200 and down["sixBigLosses"]["idlingAndMinorStops"] == 60 * 60
    assert (down["pareto"][0]["reason"], down["pareto"][0]["seconds"]) == ("unassigned", down["stopS"])

    # the state bands across sites: every closed event of a line's gateway, as it sent it
    async with aiohttp.ClientSession() as http:
        for gw, line in ((gw_a, "line-a"), (gw_b, "line-b")):
            local = (await gw.get("/api/v1/oee/events", params={"scope": "line", "id": line, **span}))[1]["items"]
            async with http.get(base + "/api/v1/oee/events", params={"scope": "line", "id": f"{site}/{line}", **span},
                                headers=auth(ADMIN_KEY)) as r:
                body = await r.json()
                assert r.status == 200, body
            closed = [(e["thingId"], e["state"], e["start"], e["end"]) for e in local if not e["open"]]
            assert closed and set(closed) <= {(e["thingId"], e["state"], e["start"], e["end"]) for e in body["items"]}
            assert {(e["site"], e["line"]) for e in body["items"]} == {(site, line)}
            assert {e["state"] for e in body["items"]} >= {"idle", "running"}
        async with http.get(base + "/api/v1/oee/events", params={"state": "bogus"}, headers=auth(ADMIN_KEY)) as r:
            assert r.status == 400 and "state" in (await r.json())["detail"]


def test_oee_records_travel_in_the_batch_and_are_checked() -> None:

    from gateway.common.wire import OEE_FIELDS, WireError, points_schema

    period = OeePeriodDoc("s:m-1", "line-a", 3600.0, "2026-12-07", "early", True,
                          dict.fromkeys(OEE_FIELDS, 1.0), 10.0)
    batch = Batch("gw", 1, "s", "line-a", 0, 0, [], points_schema().empty_table(),
                  oee_periods=[period])
    assert decode(encode(batch)).oee_periods == [period]
    assert decode(encode(Batch("gw", 1, "s", "line-a", 0, 0, [], batch.points))).oee_periods == []
    bad = Batch("gw", 1, "s", "line-a", 0, 0, [], batch.points, oee_periods=[
        OeePeriodDoc("s:m-1", "line-a", 3600.0, "d", "x", True, {**dict.fromkeys(OEE_FIELDS, 1.0), "good": -1}, 1)])
    try:
        decode(encode(bad))
    except WireError as exc:
        assert exc.reason == "bad_document" and "totals" in exc.detail
    else:
        raise AssertionError("a negative count was accepted")
