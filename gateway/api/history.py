"""`GET /api/v1/things/{id}/history`: stored points of one Thing, raw or bucketed, JSON or CSV."""

from __future__ import annotations

import time

from aiohttp import web

from gateway.api.app import PARTS, requires
from gateway.buffer.history import HistoryQuery, parse_resolution, parse_time, run_query
from gateway.errors import Invalid, NotFound

DEFAULT_SPAN_S = 3600.0
KNOWN = {"from", "to", "feature", "property", "resolution", "format"}


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/things/{id}/history", history)


@requires("viewer")
async def history(request: web.Request) -> web.Response:
    """Raw points or min/max/avg/count/last buckets; `resolution=auto` keeps answers small."""
    parts = request.app[PARTS]
    thing_id = request.match_info["id"]
    buffer = parts.buffer
    if parts.registry.get(thing_id) is None and not buffer.series_of(thing_id):
        raise NotFound(f"no Thing {thing_id!r} and no history for it", thing_id=thing_id)
    q = request.query
    context_keys = set(parts.config.buffer.context_keys)
    unknown = sorted(set(q) - KNOWN - context_keys)
    if unknown:
        raise Invalid(f"unknown parameter(s) {', '.join(unknown)}; context filters: "
                      f"{', '.join(sorted(context_keys)) or 'none configured (buffer.context_keys)'}")
    end = parse_time(q["to"], "to") if q.get("to") else time.time()
    start = parse_time(q["from"], "from") if q.get("from") else end - DEFAULT_SPAN_S
    if not start < end:
        raise Invalid("from must be before to")
    fmt = q.get("format", "json")
    if fmt not in ("json", "csv"):
        raise Invalid("format must be json or csv")
    query = HistoryQuery(
        thing_id=thing_id, start=start, end=end, feature=q.get("feature") or None, prop=q.get("property") or None,
        resolution=parse_resolution(q.get("resolution", "auto")),
        context=tuple(sorted((k, q[k]) for k in context_keys if k in q)), format=fmt,
    )
    body, content_type = await buffer.read(lambda: run_query(buffer, query))
    headers = {}
    if fmt == "csv":
        safe = thing_id.replace(":", "_")
        headers["Content-Disposition"] = f'attachment; filename="{safe}-history.csv"'
    return web.Response(text=body, content_type=content_type, headers=headers)
