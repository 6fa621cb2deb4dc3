"""Anomalies, remaining useful life and models over HTTP.

`GET /api/v1/anomalies` (filters: state, thingId, severity, from, to; paginated),
`GET /api/v1/anomalies/{id}`, `POST /api/v1/anomalies/{id}/ack` and `/resolve` (operator),
`GET /api/v1/things/{id}/rul`, `GET /api/v1/models`, `POST /api/v1/models/{type}/activate|rollback` (admin).
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import numpy as np
from aiohttp import web

from gateway.alarms.journal import MAX_SHELVE_HOURS
from gateway.api.parts import PARTS
from gateway.common.alarms import journal_response, parse_query
from gateway.common.errors import Invalid, NotFound
from gateway.common.http import read_anomaly_action, read_json, read_object, requires
from gateway.detect.anomalies import Anomaly
from gateway.detect.explain import label

RUL_WINDOW_S = 24 * 3600.0


routes = web.RouteTableDef()


async def _anomaly(request: web.Request) -> Anomaly:
    """The anomaly the path names, or 404."""
    ident = request.match_info["id"]
    a = await request.app[PARTS].need_detector().log.get(ident)
    if a is None:
        raise NotFound(f"no anomaly {ident!r}")
    return a


@routes.get("/api/v1/anomalies")
@requires("viewer")
async def list_anomalies(request: web.Request) -> web.Response:
    """The alarm journal, newest first. `state=active` means open or acknowledged; `format=csv` exports."""
    parts = request.app[PARTS]
    det = parts.need_detector()
    q = parse_query(request.query)
    thing_ids = list(q.thing_ids)
    if q.site and q.site != parts.config.gateway.site:
        thing_ids = [""]  # another site's anomalies are not on this gateway
    if q.line:
        on_line = [t.id for t in parts.registry.changed_since(float("-inf"))
                   if str(t.metadata.get("line") or parts.config.gateway.line) == q.line]
        thing_ids = [t for t in thing_ids if t in on_line] if thing_ids else (on_line or [""])
    shelves = await parts.journal.shelves(active_at=time.time()) if parts.journal else []
    shelf_of = {(s.thing_id, s.anomaly_type): s for s in shelves}
    items, total = await det.log.query(
        states=q.states, thing_ids=thing_ids, severities=q.severities, since=q.since, until=q.until,
        limit=q.limit, offset=q.offset, anomaly_types=q.anomaly_types, acknowledged_by=q.acknowledged_by,
        conditions=list(shelf_of) if q.shelved is True else None,
        without_conditions=list(shelf_of) if q.shelved is False else ())
    docs = []
    for a in items:
        doc = a.to_json()
        shelf = shelf_of.get((a.thing_id, a.anomaly_type))
        doc["shelved"] = shelf.to_json() if shelf is not None and a.state != "resolved" else None
        docs.append(doc)
    return journal_response(docs, total, q)


@routes.get("/api/v1/anomalies/{id}")
@requires("viewer")
async def get_anomaly(request: web.Request) -> web.Response:
    return web.json_response((await _anomaly(request)).to_json())


@routes.post("/api/v1/anomalies/{id}/ack")
@requires("operator")
async def ack(request: web.Request) -> web.Response:
    """Acknowledged: someone is investigating (US-SYS-003). `falsePositive` is not taken here: resolve does."""
    return await _operator_action(request, "acknowledged")


@routes.post("/api/v1/anomalies/{id}/resolve")
@requires("operator")
async def resolve(request: web.Request) -> web.Response:
    """Resolved by an operator, optionally labelled a false positive (kept for retraining)."""
    return await _operator_action(request, "resolved")


async def _operator_action(request: web.Request, action: Literal["acknowledged", "resolved"]) -> web.Response:
    """Acknowledge or resolve the anomaly the path names; the alarm journal, where kept, records who did."""
    parts = request.app[PARTS]
    note, false_positive = await read_anomaly_action(request)
    by = parts.auth.caller(request)
    if action == "acknowledged":
        if false_positive:
            raise Invalid("mark a false positive with POST .../resolve")
        a = await parts.need_detector().acknowledge(request.match_info["id"], by, note)
    else:
        a = await parts.need_detector().resolve(request.match_info["id"], by, note, false_positive)
    if parts.journal is not None:
        await parts.journal.record(a.id, action, by, note)
    return web.json_response(a.to_json())


@routes.get("/api/v1/anomalies/{id}/journal")
@requires("viewer")
async def journal(request: web.Request) -> web.Response:
    """Who did what to one anomaly, oldest first."""
    parts = request.app[PARTS]
    a = await _anomaly(request)
    actions = await parts.need_journal().actions(a.id)
    return web.json_response({"anomalyId": a.id, "items": [x.to_json() for x in actions]})


@routes.post("/api/v1/anomalies/{id}/shelve")
@requires("operator")
async def shelve(request: web.Request) -> web.Response:
    """Silence the anomaly's condition (its Thing and type) for `hours`, saying why."""
    parts = request.app[PARTS]
    a = await _anomaly(request)
    doc = await read_object(request, frozenset({"hours", "reason"}), "hours and reason")
    hours = doc.get("hours")
    if isinstance(hours, bool) or not isinstance(hours, int | float) or not 0 < hours <= MAX_SHELVE_HOURS:
        raise Invalid(f"hours must be a number > 0 and <= {MAX_SHELVE_HOURS}")
    reason = doc.get("reason")
    if not isinstance(reason, str) or not reason.strip() or len(reason) > 2000:
        raise Invalid("give the reason (a string of at most 2000 characters)")
    shelf = await parts.need_journal().shelve(a.id, a.thing_id, a.anomaly_type, float(hours),
                                              parts.auth.caller(request), reason.strip())
    return web.json_response(shelf.to_json())


@routes.get("/api/v1/alarm-shelves")
@requires("viewer")
async def list_shelves(request: web.Request) -> web.Response:
    """Shelves silencing now (`active=true`, the default) or all of them."""
    parts = request.app[PARTS]
    active = request.query.get("active", "true")
    if active not in ("true", "false"):
        raise Invalid("active must be true or false")
    shelves = await parts.need_journal().shelves(active_at=time.time() if active == "true" else None)
    return web.json_response({"items": [s.to_json() for s in shelves]})


@routes.delete("/api/v1/alarm-shelves/{id}")
@requires("operator")
async def unshelve(request: web.Request) -> web.Response:
    """End a shelf before its time."""
    parts = request.app[PARTS]
    shelf = await parts.need_journal().unshelve(request.match_info["id"], parts.auth.caller(request))
    if shelf is None:
        raise NotFound(f"no shelf {request.match_info['id']!r}")
    return web.json_response(shelf.to_json())


@routes.get("/api/v1/things/{id}/rul")
@requires("viewer")
async def rul(request: web.Request) -> web.Response:
    """Remaining useful life per health indicator: every property a threshold rule limits, fitted over the
    last 24 h of 1-minute averages."""
    parts = request.app[PARTS]
    det = parts.need_detector()
    thing_id = request.match_info["id"]
    thing = parts.registry.get(thing_id)
    if thing is None:
        raise NotFound(f"no Thing {thing_id!r}", thing_id=thing_id)
    buffer = parts.buffer
    now = time.time()
    indicators: list[tuple[int, str, float, str]] = []
    for sid in buffer.series_of(thing_id):
        key, _ttype = buffer.series_keys[sid]
        if sid not in buffer.numeric_series:
            continue
        values = {p: v for p, v in _flat(thing.features.get(key.feature)).items()}
        for rule in det.core.rules.book.matching(thing.type, key.feature, key.path):
            if rule.kind != "threshold":
                continue
            bound = rule.above or rule.below
            assert bound is not None
            limit = bound.resolve(values)
            if limit is not None:
                indicators.append((sid, f"{key.feature}/{key.path}", limit, rule.name))
    if not indicators:
        return web.json_response({"thingId": thing_id, "indicators": [],
                                  "detail": "no threshold rule limits a property of this Thing"})
    sids = sorted({i[0] for i in indicators})
    data = await buffer.read(lambda: buffer.store.buckets(sids, now - RUL_WINDOW_S, now, 60.0))
    # Here, not at the top: the fit needs scipy.stats, about 90 MiB resident, which a gateway whose
    # users never ask for a remaining useful life should not carry.
    from gateway.detect.rul import estimate_rul

    out = []
    for sid, prop, limit, rule_name in indicators:
        mask = data["series"] == sid
        t = np.asarray(data["t"][mask], dtype=np.float64) + 30.0
        y = np.asarray(data["avg"][mask], dtype=np.float64)
        est = estimate_rul(t, y, limit=limit, now=now)
        out.append({"property": prop, "label": label(prop), "limit": round(limit, 3), "rule": rule_name,
                    **est.to_json()})
    return web.json_response({"thingId": thing_id, "windowHours": RUL_WINDOW_S / 3600, "indicators": out})


def _flat(feature: Any) -> dict[str, float]:
    from gateway.common.series import flatten

    if feature is None:
        return {}
    return {p: float(v) for p, v in flatten(feature.properties)
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


@routes.get("/api/v1/models")
@requires("viewer")
async def list_models(request: web.Request) -> web.Response:
    det = request.app[PARTS].need_detector()
    types = []
    for status in det.model_status():
        versions = [v.__dict__ for v in det.models.versions(status["type"])]
        types.append({**status, "versions": versions})
    return web.json_response({"types": types})


@routes.post("/api/v1/models/{type}/activate")
@requires("admin")
async def activate(request: web.Request) -> web.Response:
    """Check a version completely, make it active, and put it in use now (no restart)."""
    det = request.app[PARTS].need_detector()
    body = await read_json(request)
    if not isinstance(body, dict) or not isinstance(body.get("version"), str) or set(body) != {"version"}:
        raise Invalid('the body must be {"version": "..."}')
    ttype = request.match_info["type"]
    await det.activate(ttype, body["version"])
    return web.json_response({"type": ttype, "active": body["version"]})


@routes.post("/api/v1/models/{type}/rollback")
@requires("admin")
async def rollback(request: web.Request) -> web.Response:
    det = request.app[PARTS].need_detector()
    ttype = request.match_info["type"]
    version = await det.rollback(ttype)
    return web.json_response({"type": ttype, "active": version})
