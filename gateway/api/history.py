"""`GET /api/v1/things/{id}/history`: stored points of one Thing, raw or bucketed, JSON or CSV."""

from __future__ import annotations

import time

from aiohttp import web

from gateway.api.parts import PARTS
from gateway.common.errors import NotFound
from gateway.common.history import parse_history_request, run_query
from gateway.common.http import requires

routes = web.RouteTableDef()


@routes.get("/api/v1/things/{id}/history")
@requires("viewer")
async def history(request: web.Request) -> web.Response:
    """Raw points or min/max/avg/count/last buckets; `resolution=auto` keeps answers small."""
    parts = request.app[PARTS]
    thing_id = request.match_info["id"]
    buffer = parts.buffer
    if parts.registry.get(thing_id) is None and not buffer.series_of(thing_id):
        raise NotFound(f"no Thing {thing_id!r} and no history for it", thing_id=thing_id)
    query = parse_history_request(thing_id, request.query, parts.config.buffer.context_keys, time.time())
    body, content_type = await buffer.read(lambda: run_query(buffer, buffer.store, query))
    headers = {}
    if query.format == "csv":
        safe = thing_id.replace(":", "_")
        headers["Content-Disposition"] = f'attachment; filename="{safe}-history.csv"'
    return web.Response(text=body, content_type=content_type, headers=headers)
