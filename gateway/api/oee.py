"""OEE, machine states and downtime over HTTP.

`GET /api/v1/oee` (scope, id, from, to, by), `GET /api/v1/downtime` (six big losses, Pareto by reason),
`GET /api/v1/oee/states` (every machine's state now), `GET /api/v1/oee/events` (the state timeline),
`GET /api/v1/oee/reasons`, `PUT /api/v1/oee/events/{id}/reason` and
`POST /api/v1/oee/machines/{id}/state` (operator).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from gateway.api.parts import PARTS, Parts
from gateway.common.errors import Invalid, NotFound
from gateway.common.history import parse_time
from gateway.common.http import int_param, known_params, read_object, requires
from gateway.common.oee import STOP_STATES, Totals, downtime_answer, oee_answer
from gateway.common.timefmt import iso_utc
from gateway.oee import store
from gateway.oee.settings import STATES
from gateway.oee.tracker import OeeTracker

MAX_RANGE_S = 400 * 86400.0
BY = ("shift", "hour", "day", "none")
TEXTS = ("reason", "note", "state")  # free text an operator gives with a stop


routes = web.RouteTableDef()


def _opened(request: web.Request, *params: str) -> tuple[Parts, OeeTracker, Mapping[str, str]]:
    """The parts, the tracker (or 404) and the query of a scoped request that also takes `params`, checked."""
    parts = request.app[PARTS]
    q = request.query
    tracker = parts.need_oee()
    known_params(q, {"scope", "id", "from", "to", *params})
    return parts, tracker, q


def scope_and_range(parts: Parts, q: Mapping[str, str], now: float) -> tuple[store.Scope, float, float]:
    """`scope`/`id` and `from`/`to` (default: the last 24 hours) of a request, checked."""
    kind = q.get("scope", "site")
    if kind not in ("machine", "line", "site"):
        raise Invalid("scope must be machine, line or site")
    site = parts.config.gateway.site
    scope_id = q.get("id", "")
    if kind == "site":
        scope_id = scope_id or site
        if scope_id != site:
            raise NotFound(f"this gateway serves site {site!r}, not {scope_id!r}")
    elif not scope_id:
        raise Invalid(f"scope={kind} needs an id")
    elif kind == "machine" and parts.registry.get(scope_id) is None:
        raise NotFound(f"no Thing {scope_id!r}", thing_id=scope_id)
    end = parse_time(q["to"], "to") if q.get("to") else now
    start = parse_time(q["from"], "from") if q.get("from") else end - 86400.0
    if not start < end:
        raise Invalid("from must be before to")
    if end - start > MAX_RANGE_S:
        raise Invalid("the range may span at most 400 days")
    return store.Scope(kind, scope_id), start, end


@routes.get("/api/v1/oee")
@requires("viewer")
async def get_oee(request: web.Request) -> web.Response:
    """Availability, performance, quality and OEE of a machine, line or the site, per shift, hour or day."""
    parts, tracker, q = _opened(request, "by")
    by = q.get("by", "shift")
    if by not in BY:
        raise Invalid(f"by must be one of {', '.join(BY)}")
    scope, start, end = scope_and_range(parts, q, time.time())
    hour_start = start - start % 3600.0
    rows = await tracker.totals(scope, hour_start, end, by)
    return web.json_response(oee_answer(scope.kind, scope.id, hour_start, end, by, rows))


@routes.get("/api/v1/downtime")
@requires("viewer")
async def get_downtime(request: web.Request) -> web.Response:
    """The six big losses and the stops of planned time by reason (a Pareto), largest first."""
    parts, tracker, q = _opened(request, "state")
    states = tuple(s for s in q.get("state", ",".join(STOP_STATES)).split(",") if s)
    bad = [s for s in states if s not in STATES or s == "running"]
    if bad or not states:
        raise Invalid(f"state: one or more of {', '.join(s for s in STATES if s != 'running')}")
    scope, start, end = scope_and_range(parts, q, time.time())
    hour_start = start - start % 3600.0

    def read(conn: Any) -> dict[str, Any]:
        rows = store.totals(conn, scope, hour_start, end, "none")
        total = rows[0][1] if rows else Totals()
        return downtime_answer(scope.kind, scope.id, hour_start, end, total,
                               store.pareto(conn, scope, hour_start, end, states),
                               store.minor_stops(conn, scope, hour_start, end, tracker.section.microstop_s))

    return web.json_response(await tracker.query(read))


@routes.get("/api/v1/oee/states")
@requires("viewer")
async def get_states(request: web.Request) -> web.Response:
    """Every tracked machine's state now (or one: `thingId`), with the open event's id and reason."""
    tracker = request.app[PARTS].need_oee()
    known_params(request.query, {"thingId", "line"})
    items = [s.to_json() for s in tracker.status(request.query.get("thingId") or None)]
    if request.query.get("line"):
        items = [s for s in items if s["line"] == request.query["line"]]
    return web.json_response({"items": items})


@routes.get("/api/v1/oee/events")
@requires("viewer")
async def get_events(request: web.Request) -> web.Response:
    """State events overlapping the range, oldest first: the state band of the line page."""
    parts, tracker, q = _opened(request, "state", "limit")
    states = tuple(s for s in q.get("state", "").split(",") if s)
    bad = [s for s in states if s not in STATES]
    if bad:
        raise Invalid(f"state: unknown {', '.join(bad)} (one or more of {', '.join(STATES)})")
    limit = int_param(q.get("limit"), "limit", 5000, 1, 50000)
    scope, start, end = scope_and_range(parts, q, time.time())
    rows = await tracker.query(lambda conn: store.events(conn, scope, start, end, states, limit))
    return web.json_response({"items": [event_json(r) for r in rows], "limit": limit})


def event_json(r: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": r["id"], "thingId": r["thing_id"], "line": r["line"], "state": r["state"],
            "start": iso_utc(r["start"]), "end": iso_utc(r["end"]), "durationS": round(r["end"] - r["start"], 3),
            "plannedS": round(r["planned_s"], 3), "open": bool(r["open"]), "source": r["source"],
            "reason": r["reason"], "note": r["note"], "reasonBy": r["reason_by"],
            "reasonAt": iso_utc(r["reason_at"]) if r["reason_at"] else None}


@routes.get("/api/v1/oee/reasons")
@requires("viewer")
async def get_reasons(request: web.Request) -> web.Response:
    """The site's reason codes (`oee.reasons`)."""
    tracker = request.app[PARTS].need_oee()
    return web.json_response({"reasons": list(tracker.section.reasons)})


@routes.put("/api/v1/oee/events/{id}/reason")
@requires("operator")
async def put_reason(request: web.Request) -> web.Response:
    """Set or correct the reason of a state event (`{"reason", "note"}`); its times never change."""
    parts = request.app[PARTS]
    tracker = parts.need_oee()
    body = await read_object(request, frozenset({"reason", "note"}), "reason and note", texts=TEXTS)
    if "reason" not in body:
        raise Invalid("give a reason")
    row = await tracker.set_reason(request.match_info["id"], body["reason"], body.get("note", ""),
                                   parts.auth.caller(request))
    return web.json_response(event_json(row))


@routes.post("/api/v1/oee/machines/{id}/state")
@requires("operator")
async def post_state(request: web.Request) -> web.Response:
    """An operator starts a planned stop or changeover of a machine, or `auto` hands it back to its rules."""
    parts = request.app[PARTS]
    tracker = parts.need_oee()
    thing = parts.registry.get(request.match_info["id"])
    if thing is None:
        raise NotFound(f"no Thing {request.match_info['id']!r}", thing_id=request.match_info["id"])
    body = await read_object(request, frozenset({"state", "reason", "note"}), "state, reason and note",
                             texts=TEXTS)
    if "state" not in body:
        raise Invalid("give a state: planned_stop, changeover or auto")
    status = tracker.set_operator_state(thing, body["state"], body.get("reason", ""), body.get("note", ""),
                                        parts.auth.caller(request))
    return web.json_response(status.to_json())
