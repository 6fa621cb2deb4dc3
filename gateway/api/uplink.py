"""The uplink's quarantine over REST: what the aggregator refused and the forwarder holds back, and an
admin's decision for each (send it again, or give it up). See docs/sync.md, "Quarantine"."""

from __future__ import annotations

from aiohttp import web

from gateway.api.parts import PARTS
from gateway.common.errors import NotFound
from gateway.common.http import requires

routes = web.RouteTableDef()


@routes.get("/api/v1/uplink/quarantine")
@requires("viewer")
async def list_held(request: web.Request) -> web.Response:
    """Things and anomalies held back: why, since when, points waiting, and whether they are being re-sent."""
    items = [h.to_json() for h in request.app[PARTS].need_quarantine().held.values()]
    return web.json_response({"items": items, "total": len(items)})


@routes.post("/api/v1/uplink/quarantine/{id}/resend")
@requires("admin")
async def resend(request: web.Request) -> web.Response:
    """Send a held Thing's points again (e.g. after an admin transferred it at the aggregator); a held
    anomaly goes up again with its next change. Refused again, it returns to the quarantine."""
    ident = request.match_info["id"]
    held = await request.app[PARTS].need_quarantine().resend(ident)
    if held is None:
        raise NotFound(f"{ident[:80]!r} is not in the quarantine")
    return web.json_response({**held.to_json(), "state": "resend"}, status=202)


@routes.delete("/api/v1/uplink/quarantine/{id}")
@requires("admin")
async def drop(request: web.Request) -> web.Response:
    """Give up what is held: it is never sent (the gateway's own history keeps the points)."""
    ident = request.match_info["id"]
    held = await request.app[PARTS].need_quarantine().drop(ident)
    if held is None:
        raise NotFound(f"{ident[:80]!r} is not in the quarantine")
    return web.json_response({**held.to_json(), "state": "dropped"})
