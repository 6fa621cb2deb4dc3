"""The gateway's aiohttp application: one error middleware, auth by route, metrics, shutdown hygiene."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway import __version__
from gateway.api.auth import Authenticator, role_allows
from gateway.buffer.buffer import TelemetryBuffer
from gateway.bus import EventBus
from gateway.config import GatewayConfig
from gateway.detect.detector import AnomalyDetector
from gateway.detect.models import ModelError
from gateway.errors import Conflict, EgizError, Invalid, NotFound
from gateway.ingest.deadletter import DeadLetterLog
from gateway.ingest.mqtt import MqttIngest
from gateway.ingest.payload import loads_strict
from gateway.metrics import GatewayMetrics
from gateway.provision import Provisioner, ProvisionError
from gateway.twin.registry import TwinRegistry

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY = 256 * 1024


@dataclass
class Parts:
    """Typed runtime data the handlers need, built by the service (the composition root)."""

    config: GatewayConfig
    registry: TwinRegistry
    bus: EventBus
    ingest: MqttIngest
    dead_letters: DeadLetterLog
    metrics: GatewayMetrics
    auth: Authenticator
    started: float
    buffer: TelemetryBuffer
    detector: AnomalyDetector | None = None
    provisioner: Provisioner | None = None


PARTS = web.AppKey("parts", Parts)


def requires(role: str | None) -> Callable[[Handler], Handler]:
    """Declare the least role a handler needs; `None` means public."""

    def mark(fn: Handler) -> Handler:
        fn.egiz_role = role  # type: ignore[attr-defined]
        return fn

    return mark


def error_body(status: int, error: str, detail: str, **extra: Any) -> web.Response:
    return web.json_response({"error": error, "detail": detail, **extra}, status=status)


STATUS_OF: dict[type[EgizError], int] = {NotFound: 404, Conflict: 409, Invalid: 400, ModelError: 422,
                                          ProvisionError: 503}  # first match


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Auth by declared role, JSON errors for everything, request metrics."""
    parts = request.app[PARTS]
    start = time.perf_counter()
    status = 500
    try:
        routing_error = getattr(request.match_info, "http_exception", None)
        if routing_error is not None:
            raise routing_error  # 404/405 need no key: they reveal nothing
        need = getattr(request.match_info.handler, "egiz_role", "admin")  # undeclared: strictest
        if need is not None:
            role = parts.auth.role_for(request, allow_query_token=request.path == "/api/v1/ws")
            if role is None:
                parts.metrics.auth_failures.labels("401").inc()
                raise web.HTTPUnauthorized(
                    text=json.dumps({"error": "unauthorized", "detail": "a valid Bearer API key is required"}),
                    content_type="application/json", headers={"WWW-Authenticate": 'Bearer realm="egiz"'},
                )
            if not role_allows(role, need):
                parts.metrics.auth_failures.labels("403").inc()
                raise web.HTTPForbidden(
                    text=json.dumps(
                        {"error": "forbidden", "detail": f"this needs the {need} role; the key has {role}"}
                    ),
                    content_type="application/json",
                )
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as exc:
        status = exc.status
        if exc.status >= 400 and exc.content_type != "application/json":
            resp = error_body(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)
            if "Allow" in exc.headers:
                resp.headers["Allow"] = exc.headers["Allow"]
            return resp
        raise
    except EgizError as exc:
        status = next((s for cls, s in STATUS_OF.items() if isinstance(exc, cls)), 500)
        extra = {k: v for k, v in exc.fields.items() if k in ("version", "thing_id")}
        return error_body(status, exc.code, exc.detail, **extra)
    except Exception:
        log.exception("unhandled error", extra={"path": request.path, "method": request.method})
        return error_body(500, "internal", "the gateway hit an unexpected error; it is logged")
    finally:
        parts.metrics.http_requests.labels(request.method, str(status)).inc()
        parts.metrics.http_latency.observe(time.perf_counter() - start)


def int_param(value: str | None, name: str, default: int, lo: int, hi: int) -> int:
    """An integer query parameter within [lo, hi]; absent or empty gives `default`, anything else a 400."""
    if value is None or value == "":
        return default
    try:
        n = int(value)
    except ValueError:
        raise Invalid(f"{name} must be an integer") from None
    if not lo <= n <= hi:
        raise Invalid(f"{name} must be between {lo} and {hi}")
    return n


async def read_json(request: web.Request) -> Any:
    """The request body as JSON, or a 400 that says what is wrong."""
    try:
        text = await request.text()
    except UnicodeDecodeError:
        raise Invalid("the body is not UTF-8") from None
    return parse_json(text, "the body")


def parse_json(text: str, what: str) -> Any:
    """JSON from a client, strictly: NaN, Infinity and deep nesting are an Invalid (400), never a 500."""
    try:
        return loads_strict(text)
    except RecursionError:
        raise Invalid(f"{what} is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, a non-finite number, an integer of thousands of digits
        raise Invalid(f"{what} is not valid JSON: {str(exc)[:200]}") from None


def build_app(parts: Parts) -> web.Application:
    """The app factory: routes from the api modules, one middleware, WebSocket cleanup on shutdown."""
    from gateway.api import anomalies, history, nodes, openapi, things, viewer, ws

    app = web.Application(middlewares=[middleware], client_max_size=MAX_BODY)
    app[PARTS] = parts
    things.add_routes(app)
    history.add_routes(app)
    anomalies.add_routes(app)
    nodes.add_routes(app)
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
    from gateway.api.viewer import read_layout

    gw = request.app[PARTS].config.gateway
    doc = await asyncio.to_thread(read_layout, gw.data_dir)
    return web.json_response({**doc, "site": gw.site, "line": gw.line, "gatewayId": gw.id})


@requires(None)
async def health(request: web.Request) -> web.Response:
    """Liveness: the process serves requests."""
    parts = request.app[PARTS]
    return web.json_response({"status": "ok", "version": __version__,
                              "uptime_s": round(time.time() - parts.started, 3)})


@requires(None)
async def ready(request: web.Request) -> web.Response:
    """Readiness: the twin is loaded and the broker session is up."""
    parts = request.app[PARTS]
    checks = {
        "registry": "ok",
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
    if buf.refusing:
        warnings.append(f"disk budget used up ({buf.used_bytes} bytes): new points are not stored")
    ok = all(v == "ok" for v in checks.values())
    return web.json_response({"ready": ok, "checks": checks, "warnings": warnings,
                              "things": len(parts.registry)}, status=200 if ok else 503)


@requires(None)
async def metrics(request: web.Request) -> web.Response:
    parts = request.app[PARTS]
    parts.metrics.things.set(len(parts.registry))
    parts.metrics.twin_flush_errors.set(parts.registry.flush_errors)
    parts.metrics.buffer_pending.set(parts.buffer.pending_points)
    return web.Response(body=parts.metrics.render(), content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})
