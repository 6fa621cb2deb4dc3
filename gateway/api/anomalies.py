"""Anomalies, remaining useful life and models over HTTP.

`GET /api/v1/anomalies` (filters: state, thingId, severity, from, to; paginated),
`GET /api/v1/anomalies/{id}`, `POST /api/v1/anomalies/{id}/ack` and `/resolve` (operator),
`GET /api/v1/things/{id}/rul`, `GET /api/v1/models`, `POST /api/v1/models/{type}/activate|rollback` (admin).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
from aiohttp import web

from gateway.api.parts import PARTS, Parts
from gateway.common.errors import Invalid, NotFound
from gateway.common.history import parse_time
from gateway.common.http import int_param, read_json, requires
from gateway.detect.detector import AnomalyDetector
from gateway.detect.explain import label

MAX_LIMIT = 1000
RUL_WINDOW_S = 24 * 3600.0
STATES = {"open", "acknowledged", "resolved"}
SEVERITIES = {"info", "warning", "critical"}


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/anomalies", list_anomalies)
    app.router.add_get("/api/v1/anomalies/{id}", get_anomaly)
    app.router.add_post("/api/v1/anomalies/{id}/ack", ack)
    app.router.add_post("/api/v1/anomalies/{id}/resolve", resolve)
    app.router.add_get("/api/v1/things/{id}/rul", rul)
    app.router.add_get("/api/v1/models", list_models)
    app.router.add_post("/api/v1/models/{type}/activate", activate)
    app.router.add_post("/api/v1/models/{type}/rollback", rollback)


def _detector(parts: Parts) -> AnomalyDetector:
    if parts.detector is None:
        raise NotFound("anomaly detection is switched off on this gateway (detect.enabled = false)")
    return parts.detector


def _list(value: str | None, allowed: set[str] | None, name: str) -> list[str]:
    items = [v for v in (value or "").split(",") if v]
    if allowed is not None:
        bad = [v for v in items if v not in allowed]
        if bad:
            raise Invalid(f"{name}: unknown {', '.join(bad)} (one or more of {', '.join(sorted(allowed))})")
    return items



@requires("viewer")
async def list_anomalies(request: web.Request) -> web.Response:
    """Newest first. `state=active` means open or acknowledged."""
    det = _detector(request.app[PARTS])
    q = request.query
    unknown = sorted(set(q) - {"state", "thingId", "severity", "from", "to", "limit", "offset"})
    if unknown:
        raise Invalid(f"unknown parameter(s) {', '.join(unknown)}")
    states = _list(q.get("state"), STATES | {"active"}, "state")
    if "active" in states:
        states = sorted((set(states) - {"active"}) | {"open", "acknowledged"})
    limit = int_param(q.get("limit"), "limit", 100, 1, MAX_LIMIT)
    offset = int_param(q.get("offset"), "offset", 0, 0, 10**9)
    items, total = await det.log.query(
        states=states, thing_ids=_list(q.get("thingId"), None, "thingId"),
        severities=_list(q.get("severity"), SEVERITIES, "severity"),
        since=parse_time(q["from"], "from") if q.get("from") else None,
        until=parse_time(q["to"], "to") if q.get("to") else None, limit=limit, offset=offset)
    return web.json_response({"items": [a.to_json() for a in items], "total": total, "limit": limit,
                              "offset": offset})


@requires("viewer")
async def get_anomaly(request: web.Request) -> web.Response:
    det = _detector(request.app[PARTS])
    a = await det.log.get(request.match_info["id"])
    if a is None:
        raise NotFound(f"no anomaly {request.match_info['id']!r}")
    return web.json_response(a.to_json())


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    doc = await read_json(request)
    if not isinstance(doc, dict):
        raise Invalid("the body must be a JSON object")
    unknown = sorted(set(doc) - {"note", "falsePositive"})
    if unknown:
        raise Invalid(f"unknown field(s) {', '.join(unknown)}")
    if not isinstance(doc.get("note", ""), str) or len(doc.get("note", "")) > 2000:
        raise Invalid("note must be a string of at most 2000 characters")
    if not isinstance(doc.get("falsePositive", False), bool):
        raise Invalid("falsePositive must be true or false")
    return doc


@requires("operator")
async def ack(request: web.Request) -> web.Response:
    """Acknowledged: someone is investigating (US-SYS-003). `falsePositive` is not taken here: resolve does."""
    parts = request.app[PARTS]
    body = await _body(request)
    if body.get("falsePositive"):
        raise Invalid("mark a false positive with POST .../resolve")
    a = await _detector(parts).acknowledge(request.match_info["id"], parts.auth.caller(request), body.get("note", ""))
    return web.json_response(a.to_json())


@requires("operator")
async def resolve(request: web.Request) -> web.Response:
    """Resolved by an operator, optionally labelled a false positive (kept for retraining)."""
    parts = request.app[PARTS]
    body = await _body(request)
    a = await _detector(parts).resolve(request.match_info["id"], parts.auth.caller(request), body.get("note", ""),
                                       bool(body.get("falsePositive", False)))
    return web.json_response(a.to_json())


@requires("viewer")
async def rul(request: web.Request) -> web.Response:
    """Remaining useful life per health indicator: every property a threshold rule limits, fitted over the
    last 24 h of 1-minute averages."""
    parts = request.app[PARTS]
    det = _detector(parts)
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


@requires("viewer")
async def list_models(request: web.Request) -> web.Response:
    det = _detector(request.app[PARTS])
    types = []
    for status in det.model_status():
        versions = [v.__dict__ for v in det.models.versions(status["type"])]
        types.append({**status, "versions": versions})
    return web.json_response({"types": types})


@requires("admin")
async def activate(request: web.Request) -> web.Response:
    """Check a version completely, make it active, and put it in use now (no restart)."""
    det = _detector(request.app[PARTS])
    body = await read_json(request)
    if not isinstance(body, dict) or not isinstance(body.get("version"), str) or set(body) != {"version"}:
        raise Invalid('the body must be {"version": "..."}')
    ttype = request.match_info["type"]
    await det.activate(ttype, body["version"])
    return web.json_response({"type": ttype, "active": body["version"]})


@requires("admin")
async def rollback(request: web.Request) -> web.Response:
    det = _detector(request.app[PARTS])
    ttype = request.match_info["type"]
    version = await det.rollback(ttype)
    return web.json_response({"type": ttype, "active": version})
