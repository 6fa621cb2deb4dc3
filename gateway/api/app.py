"""The gateway's aiohttp application: the routes of the api modules behind the shared middleware
(`gateway.common.http`), plus `/health`, `/ready` and `/metrics`."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from gateway import __version__
from gateway.api import anomalies, connectors, history, nodes, oee, openapi, things, uplink, ws
from gateway.api.parts import PARTS, Parts
from gateway.common import viewer
from gateway.common.errors import EgizError
from gateway.common.http import error_middleware, requires
from gateway.connectors.base import DeviceError, WriteRefused
from gateway.detect.models import ModelError
from gateway.provision import ProvisionError

MAX_BODY = 256 * 1024
WAL_WARN = 4  # /ready warns when the buffer's WAL is this many times its checkpoint threshold
STATUS_OF: dict[type[EgizError], int] = {ModelError: 422, ProvisionError: 503, WriteRefused: 422, DeviceError: 503}


def build_app(parts: Parts) -> web.Application:
    """The app factory: routes from the api modules, one middleware, WebSocket cleanup on shutdown."""
    mw = error_middleware(parts.auth, parts.metrics, service="gateway", status_of=STATUS_OF)
    app = web.Application(middlewares=[mw], client_max_size=MAX_BODY)
    app[PARTS] = parts
    for module in (things, history, anomalies, nodes, connectors, oee, uplink):
        app.router.add_routes(module.routes)
    ws.add_routes(app)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/v1/openapi.json", openapi.handler)
    viewer.add_routes(app, layout, mark=requires(None))
    return app


@requires("viewer")
async def layout(request: web.Request) -> web.Response:
    """The floor layout of this gateway's line (`layout.json` in the data directory, or an empty one),
    with the site and line it serves, so the viewer knows where it is."""
    gw = request.app[PARTS].config.gateway
    doc = await asyncio.to_thread(viewer.read_layout, gw.data_dir)
    return web.json_response({**doc, "site": gw.site, "line": gw.line, "gatewayId": gw.id})


@requires(None)
async def health(request: web.Request) -> web.Response:
    """Liveness: the process serves requests."""
    parts = request.app[PARTS]
    return web.json_response({"status": "ok", "version": __version__,
                              "uptime_s": round(time.time() - parts.started, 3)})


@requires(None)
async def ready(request: web.Request) -> web.Response:
    """Readiness: the twin's registry file answers and the broker session is up."""
    parts = request.app[PARTS]
    checks = {
        "registry": await parts.registry.check(),
        "mqtt": "ok" if parts.ingest.connected.is_set() else "disconnected",
    }
    warnings = []
    if parts.config.auth.open:
        warnings.append("auth.open is on: anyone can read and write (demo mode)")
    if parts.registry.flush_errors:
        warnings.append(f"{parts.registry.flush_errors} twin flushes to disk failed")
    buf = parts.buffer
    if buf.commit_failing:
        warnings.append(f"buffer commits are failing ({buf.last_error}); messages are kept unacknowledged")
    if buf.wal_bytes > WAL_WARN * parts.config.buffer.checkpoint_mb * 2**20:
        warnings.append(f"the buffer's WAL is {buf.wal_bytes} bytes, {WAL_WARN}x past buffer.checkpoint_mb: "
                        "checkpoints are being postponed and DuckDB's memory grows with it")
    if buf.refusing:
        warnings.append(f"disk budget used up ({buf.used_bytes} bytes): new points are not stored")
    held = parts.quarantine.held if parts.quarantine is not None else {}
    if held:
        warnings.append(f"{len(held)} Things or anomalies the aggregator refused are held in the uplink "
                        "quarantine (GET /api/v1/uplink/quarantine)")
    ok = all(v == "ok" for v in checks.values())
    return web.json_response({"ready": ok, "checks": checks, "warnings": warnings,
                              "things": len(parts.registry)}, status=200 if ok else 503)


@requires(None)
async def metrics(request: web.Request) -> web.Response:
    parts = request.app[PARTS]
    parts.metrics.things.set(len(parts.registry))
    parts.metrics.twin_flush_errors.set(parts.registry.flush_errors)
    parts.metrics.buffer_pending.set(parts.buffer.pending_points)
    if parts.quarantine is not None:
        held = parts.quarantine.held.values()
        parts.metrics.uplink_quarantine_things.set(sum(h.kind == "thing" for h in held))
        parts.metrics.uplink_quarantine_points.set(parts.quarantine.points)
    return web.Response(body=parts.metrics.render(), content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})
