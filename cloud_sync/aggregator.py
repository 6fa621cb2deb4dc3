"""Aggregator: takes batches from every line gateway, stores them once, serves the multi-site API.

`POST /api/v1/ingest/batches` (a gateway's token): each `(gateway_id, batch_seq)` is applied at most
once, in order per gateway, completely or not at all; a gateway writes only its own site and line.
The read API (API keys with roles, as on the gateway): sites with their health, gateways, Things
across sites, history in the gateway's format, the most critical assets, a WebSocket of site
summaries, `/health`, `/ready`, `/metrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

from aiohttp import WSMsgType, web
from prometheus_client import generate_latest

from cloud_sync.config import AggregatorConfig, GatewayToken
from cloud_sync.metrics import AggregatorMetrics
from cloud_sync.oee import CentralOee, foreign_oee
from cloud_sync.oee import routes as oee_routes
from cloud_sync.openapi import SPEC
from cloud_sync.store import AggregatorStore, Refused, StoreError
from gateway import __version__
from gateway.common import signing, systemd, viewer
from gateway.common.alarms import CSV_COLUMNS as GATEWAY_CSV_COLUMNS
from gateway.common.alarms import journal_response, parse_query
from gateway.common.auth import Authenticator, role_allows
from gateway.common.errors import Invalid, NotFound
from gateway.common.history import parse_history_request, run_query
from gateway.common.http import (
    error_body,
    error_middleware,
    int_param,
    parse_json,
    read_anomaly_action,
    read_object,
    requires,
    serve,
)
from gateway.common.tasks import cancel_and_wait
from gateway.common.wire import Action, Batch, WireError, decode, feature_properties
from gateway.detect.models import ModelRegistry, file_sha256

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_LIMIT = 1000
CSV_COLUMNS = ("site", "line", "gatewayId", *GATEWAY_CSV_COLUMNS)  # the journal's export names where each row is from


def make_store(cfg: AggregatorConfig) -> AggregatorStore:
    if cfg.storage.backend == "postgres":
        from cloud_sync.store.pg import PgStore

        return PgStore(cfg.storage.dsn, partition_days=cfg.storage.partition_days,
                       max_partitions=cfg.storage.max_partitions_per_batch)
    from cloud_sync.store.duck import DuckStore

    return DuckStore(Path(cfg.aggregator.data_dir), memory_limit_mb=cfg.storage.memory_limit_mb)


class Aggregator:
    """The central service: store + HTTP/WebSocket API."""

    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config
        self.metrics = AggregatorMetrics()
        self.store = make_store(config)
        self.auth = Authenticator(config.auth.api_keys, open_access=config.auth.open)
        self._tokens = {hashlib.sha256(g.token.encode()).digest(): g for g in config.auth.gateway_tokens}
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="aggregator-writer")
        self._readers = ThreadPoolExecutor(4, thread_name_prefix="aggregator-reader")
        self._ingest_slots = asyncio.Semaphore(config.aggregator.ingest_concurrency)
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._sockets: set[web.WebSocketResponse] = set()
        self._lines: dict[web.WebSocketResponse, set[str]] = {}  # socket -> "site/line" it follows ("*": all)
        self.http_port: int | None = None
        self.started = time.time()
        self.models = ModelRegistry(Path(config.aggregator.data_dir) / "models")  # what gateways fetch
        self.oee = CentralOee(Path(config.aggregator.data_dir) / "oee.sqlite")
        self._signing_key = signing.load_or_create_key(config.model_signing_key_file)
        self.app = self._build_app()

    async def write(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    async def read(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._readers, fn, *args)

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        await self.write(self.store.open)
        await self.oee.open()
        if self.config.auth.open:
            log.warning("auth.open is on: every API request is admin, without a key (demo mode)",
                        extra={"host": self.config.http.host})
        self._runner, self.http_port = await serve(self.app, self.config.http)
        self._tasks = [asyncio.create_task(self._maintenance(), name="aggregator-maintenance"),
                       asyncio.create_task(self._summaries(), name="aggregator-summaries")]
        log.info("aggregator started", extra={"http_port": self.http_port, "backend": self.config.storage.backend})

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)
        for ws in list(self._sockets):
            await ws.close(code=1001, message=b"aggregator shutting down")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.write(self.store.close)
        await self.oee.close()
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        log.info("aggregator stopped")

    async def run_until_signalled(self) -> None:
        """Run until SIGTERM or SIGINT (telling systemd when it serves and that it is alive), then stop."""
        await systemd.run_until_signalled(self, "aggregator")

    async def _maintenance(self) -> None:
        while True:
            await asyncio.sleep(30)
            try:
                await self.write(self.store.maintain, time.time())
            except Exception:
                log.exception("aggregator maintenance failed; retrying next interval")

    async def _summaries(self) -> None:
        while True:
            await asyncio.sleep(self.config.aggregator.summary_interval_s)
            if not self._sockets:
                continue
            try:
                text = json.dumps({"event": "SiteSummaries", "sites": await self.site_summaries(),
                                   "timestamp": time.time()})
            except Exception:
                log.exception("site summary failed")
                continue
            for ws in list(self._sockets):
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await ws.send_str(text)

    # ----------------------------------------------------------------- app
    def _build_app(self) -> web.Application:
        """Routes with the least role each needs; `None`: the handler checks a gateway token itself."""
        mw = error_middleware(self.auth, self.metrics, service="aggregator")
        app = web.Application(middlewares=[mw], client_max_size=int(self.config.aggregator.max_batch_mb * 2**20))
        routes: list[tuple[str, str, Any, str | None]] = [
            ("POST", "/api/v1/ingest/batches", self.ingest, None),
            ("GET", "/api/v1/ingest/actions", self.pending_actions, None),
            ("GET", "/api/v1/sites", self.sites, "viewer"),
            ("GET", "/api/v1/gateways", self.list_gateways, "viewer"),
            ("GET", "/api/v1/things", self.list_things, "viewer"),
            ("GET", "/api/v1/things/{id}", self.get_thing, "viewer"),
            ("GET", "/api/v1/things/{id}/history", self.history, "viewer"),
            ("GET", "/api/v1/critical", self.critical, "viewer"),
            ("GET", "/api/v1/models", self.list_models, "viewer"),
            ("GET", "/api/v1/models/active", self.active_models, None),
            ("GET", "/api/v1/models/{type}/{version}/{file}", self.model_file, None),
            ("GET", "/api/v1/anomalies", self.list_anomalies, "viewer"),
            ("GET", "/api/v1/anomalies/{id}", self.get_anomaly, "viewer"),
            ("POST", "/api/v1/anomalies/{id}/ack", self.anomaly_action, "operator"),
            ("POST", "/api/v1/anomalies/{id}/resolve", self.anomaly_action, "operator"),
            ("GET", "/api/v1/things/{id}/owner", self.get_owner, "viewer"),
            ("PUT", "/api/v1/things/{id}/owner", self.transfer, "admin"),
            ("GET", "/api/v1/ws", self.websocket, "viewer"),
            ("GET", "/health", self.health, None),
            ("GET", "/ready", self.ready, None),
            ("GET", "/metrics", self.prometheus, None),
            ("GET", "/api/v1/openapi.json", self.openapi, None),
            *oee_routes(self.oee),
        ]
        for method, path, handler, role in routes:
            app.router.add_route(method, path, requires(role)(handler))
        viewer.add_routes(app, requires("viewer")(self.layout), mark=requires(None))
        return app

    def _gateway_for(self, request: web.Request) -> GatewayToken | None:
        header = request.headers.get("Authorization", "")
        if header[:7].lower() != "bearer ":
            return None
        return self._tokens.get(hashlib.sha256(header[7:].strip().encode()).digest())

    # ----------------------------------------------------------------- ingest
    async def ingest(self, request: web.Request) -> web.Response:
        """One batch from one gateway: applied once, in order, whole."""
        gw = self._gateway_for(request)
        if gw is None:
            self.metrics.refused(401)
            return error_body(401, "unauthorized", "a valid gateway token is required")
        if self._ingest_slots.locked():
            self.metrics.batches.labels("busy").inc()
            return error_body(503, "busy", "too many batches at once; retry", headers={"Retry-After": "1"})
        async with self._ingest_slots:
            body = await request.read()
            self.metrics.bytes.inc(len(body))
            try:
                batch: Batch = await self.read(decode, body)
            except WireError as exc:
                self.metrics.batches.labels(f"refused_{exc.reason}").inc()
                log.warning("refused a batch", extra={"gateway": gw.gateway, "reason": exc.reason,
                                                      "detail": exc.detail[:300]})
                return error_body(400, exc.reason, exc.detail, thingIds=list(exc.thing_ids), anomalyIds=[])
            problem = _foreign(batch, gw) or foreign_oee(batch)
            if problem:
                self.metrics.batches.labels("refused_forbidden").inc()
                self.metrics.refused(403)
                log.warning("a gateway tried to write what is not its own",
                            extra={"token_of": gw.gateway, "detail": problem})
                return error_body(403, "forbidden", problem)
            strays = _other_site(batch, gw)
            if strays:
                self.metrics.batches.labels("refused_foreign_thing").inc()
                self.metrics.refused(403)
                log.warning("a gateway tried to write another site's Things",
                            extra={"gateway": gw.gateway, "things": strays[:5]})
                return error_body(403, "foreign_thing", f"Thing {strays[0][:80]!r} is not of site {gw.site}; "
                                  "nothing of this batch was applied", thingIds=strays, anomalyIds=[])
            start = time.perf_counter()
            try:
                result = await self.write(self.store.apply, batch, time.time())
            except Refused as exc:
                self.metrics.batches.labels(f"refused_{exc.reason}").inc()
                if exc.status == 403:
                    self.metrics.refused(403)
                log.warning("refused a batch", extra={"gateway": gw.gateway, "reason": exc.reason,
                                                      "detail": exc.detail[:300]})
                return error_body(exc.status, exc.reason, exc.detail, thingIds=list(exc.thing_ids),
                                  anomalyIds=list(exc.anomaly_ids))
            except StoreError as exc:
                self.metrics.batches.labels("store_error").inc()
                log.error("could not store a batch; the gateway will retry", extra={"error": str(exc)[:300]})
                return error_body(503, "store_unavailable", "the batch was not stored; retry",
                              headers={"Retry-After": "2"})
            self.metrics.apply_seconds.observe(time.perf_counter() - start)
        self.metrics.batches.labels(result.status).inc()
        if result.status == "out_of_order":
            return error_body(409, "out_of_order", f"expected batch {result.expected}", expected=result.expected)
        self.metrics.points.inc(result.points)
        if result.status in ("applied", "duplicate"):  # newest-wins records: a repeat is harmless, a retry heals
            await self.oee.apply(batch)
        if result.status == "applied" and (batch.anomalies or batch.things):
            sent = round(time.time() * 1000, 1)  # lets a viewer measure how long an event took to reach it
            placed = {"site": batch.site, "line": batch.line, "gatewayId": batch.gateway_id}
            events = [{"event": "Anomaly", "sentAt": sent, "anomaly": {**a.doc, **placed}} for a in batch.anomalies]
            await self._broadcast(events)
            if batch.things:
                await self._broadcast([{"event": "Things", "sentAt": sent, "site": batch.site, "line": batch.line,
                                        "things": [{**t.doc, "site": batch.site, "line": batch.line}
                                                   for t in batch.things]}], line=f"{batch.site}/{batch.line}")
        actions = await self.write(self.store.actions_for, gw.gateway)
        return web.json_response({"status": result.status, "batch_seq": batch.batch_seq, "points": result.points,
                                  "actions": [a.to_json() for a in actions]})

    async def pending_actions(self, request: web.Request) -> web.Response:
        """Operators' actions waiting for the calling gateway (gateway token), for a gateway with nothing to send."""
        gw = self._gateway_for(request)
        if gw is None:
            self.metrics.refused(401)
            return error_body(401, "unauthorized", "a valid gateway token is required")
        actions = await self.write(self.store.actions_for, gw.gateway)
        return web.json_response({"actions": [a.to_json() for a in actions]})

    async def _broadcast(self, events: list[dict[str, Any]], line: str | None = None) -> None:
        """To every socket; with `line` ("site/line"), only to those that subscribed to that line."""
        for text in (json.dumps(e) for e in events):
            for ws in list(self._sockets):
                if line is not None and not ({line, "*"} & self._lines.get(ws, set())):
                    continue
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await ws.send_str(text)

    # ----------------------------------------------------------------- reads
    async def site_summaries(self) -> list[dict[str, Any]]:
        gateways = await self.read(self.store.gateways)
        self.metrics.gateways.set(len(gateways))
        now = time.time()
        sites: dict[str, dict[str, Any]] = {}
        things, _total = await self.read(lambda: self.store.things(site=None, line=None, type_=None,
                                                                    limit=100_000, offset=0))
        for g in gateways:
            s = sites.setdefault(g.site, {"site": g.site, "lines": {}, "nodes": {"online": 0, "offline": 0},
                                          "anomalies": {"open": 0, "bySeverity": {}}, "uplinkLagS": 0.0})
            online = now - g.last_seen <= self.config.aggregator.offline_after_s
            s["lines"][g.line] = {"line": g.line, "gatewayId": g.gateway_id, "online": online,
                                  "lastSeen": g.last_seen, "backlog": g.backlog, "lagS": round(g.lag_s, 3),
                                  "clockOffsetS": round(g.clock_offset_s, 3), "points": g.points}
            s["uplinkLagS"] = max(s["uplinkLagS"], round(g.lag_s + (now - g.last_seen if not online else 0), 3))
        for t in things:
            summary = sites.get(t["site"])
            if summary is None:
                continue
            s = summary
            state = feature_properties(t, "connectivity").get("state")
            if state in ("online", "offline"):
                s["nodes"][state] += 1
            status = feature_properties(t, "status")
            if status.get("anomaly"):
                s["anomalies"]["open"] += 1
                sev = str(status.get("severity", "unknown"))
                s["anomalies"]["bySeverity"][sev] = s["anomalies"]["bySeverity"].get(sev, 0) + 1
        return [{**s, "lines": sorted(s["lines"].values(), key=lambda li: li["line"])}
                for s in sorted(sites.values(), key=lambda s: s["site"])]

    async def sites(self, request: web.Request) -> web.Response:
        """Every site with its lines and health: nodes online, open anomalies by severity, uplink lag."""
        return web.json_response({"items": await self.site_summaries()})

    async def list_gateways(self, request: web.Request) -> web.Response:
        rows = await self.read(self.store.gateways)
        return web.json_response({"items": [
            {"gatewayId": g.gateway_id, "site": g.site, "line": g.line, "lastSeq": g.last_seq,
             "lastSeen": g.last_seen, "points": g.points, "backlog": g.backlog, "lagS": g.lag_s,
             "clockOffsetS": g.clock_offset_s} for g in rows]})

    async def list_things(self, request: web.Request) -> web.Response:
        q = request.query
        limit = int_param(q.get("limit"), "limit", 100, 1, MAX_LIMIT)
        offset = int_param(q.get("offset"), "offset", 0, 0, 10**9)
        items, total = await self.read(lambda: self.store.things(site=q.get("site"), line=q.get("line"),
                                                                  type_=q.get("type"), limit=limit, offset=offset))
        return web.json_response({"items": items, "total": total, "limit": limit, "offset": offset,
                                  "nextOffset": offset + limit if offset + limit < total else None})

    async def get_thing(self, request: web.Request) -> web.Response:
        doc = await self.read(self.store.thing, request.match_info["id"])
        if doc is None:
            raise NotFound(f"no Thing {request.match_info['id']!r}")
        return web.json_response(doc)

    async def history(self, request: web.Request) -> web.Response:
        """History across sites, in the gateway's format (docs/api.md, 'History')."""
        thing_id = request.match_info["id"]
        params, now = dict(request.query), time.time()

        def answer() -> tuple[str, str]:  # on a reader thread: every store call blocks
            store = self.store
            series = store.series_of(thing_id)
            if not series:
                raise NotFound(f"no history for {thing_id!r}", thing_id=thing_id)
            # context filters: the text properties this Thing has (the gateways' buffer.context_keys)
            context_keys = {store.series_keys[s][0].path for s in series if s not in store.numeric_series}
            return run_query(store, store, parse_history_request(thing_id, params, context_keys, now))

        body, content_type = await self.read(answer)
        return web.Response(text=body, content_type=content_type)

    async def critical(self, request: web.Request) -> web.Response:
        """The ten most critical assets across sites: open anomalies by score, then offline nodes."""
        things, _ = await self.read(lambda: self.store.things(site=request.query.get("site"), line=None,
                                                               type_=None, limit=100_000, offset=0))
        ranked = []
        for t in things:
            status = feature_properties(t, "status")
            offline = feature_properties(t, "connectivity").get("state") == "offline"
            score = _number(status.get("anomaly_score")) if status.get("anomaly") else 0.0
            if score or offline:
                ranked.append((score, offline, t))
        ranked.sort(key=lambda r: (-r[0], not r[1], r[2]["id"]))
        return web.json_response({"items": [
            {"thingId": t["id"], "site": t["site"], "line": t["line"], "type": t.get("type"), "score": score,
             "offline": offline, "topFeatures": feature_properties(t, "status").get("top_features", [])}
            for score, offline, t in ranked[:10]]})

    # ----------------------------------------------------------------- models from the centre
    def _gateway_or_viewer(self, request: web.Request) -> bool:
        if self._gateway_for(request) is not None:
            return True
        role = self.auth.role_for(request)
        return role is not None and role_allows(role, "viewer")

    async def list_models(self, request: web.Request) -> web.Response:
        """The aggregator's model registry: every version per type, the published (active) one marked."""
        reg = self.models
        return web.json_response({"types": [
            {"type": tt, "active": reg.active_version(tt), "versions": [v.__dict__ for v in reg.versions(tt)]}
            for tt in reg.types()]})

    async def active_models(self, request: web.Request) -> web.Response:
        """What gateways fetch: the active version of each type, each file's SHA-256 and the
        aggregator's signature over both (checked by the gateway before it downloads a file)."""
        if not self._gateway_or_viewer(request):
            return error_body(401, "unauthorized", "a gateway token or an API key is required")
        out: dict[str, Any] = {}
        for tt in self.models.types():
            version = self.models.active_version(tt)
            if version is None:
                continue
            d = self.models.root / tt / version
            try:
                files = {name: await asyncio.to_thread(file_sha256, d / name) for name in MODEL_FILES}
            except OSError:
                log.warning("an active model version is missing files", extra={"type": tt, "version": version})
                continue
            out[tt] = {"version": version, "files": files,
                       "signature": signing.sign(self._signing_key, tt, version, files)}
        return web.json_response({"models": out})

    async def model_file(self, request: web.Request) -> web.StreamResponse:
        if not self._gateway_or_viewer(request):
            return error_body(401, "unauthorized", "a gateway token or an API key is required")
        m = request.match_info
        if not (_SAFE_NAME.fullmatch(m["type"]) and _SAFE_NAME.fullmatch(m["version"]) and m["file"] in MODEL_FILES):
            raise NotFound("no such model file")
        path = self.models.root / m["type"] / m["version"] / m["file"]
        if not path.is_file():
            raise NotFound("no such model file")
        return web.FileResponse(path)

    async def layout(self, request: web.Request) -> web.Response:
        """Floor layouts of every line (`layout.json` in the data directory), or an empty one."""
        return web.json_response(await asyncio.to_thread(viewer.read_layout, Path(self.config.aggregator.data_dir)))

    async def list_anomalies(self, request: web.Request) -> web.Response:
        """The alarm journal across sites, newest first, with the gateway's filters, paging and CSV export;
        `state=active` means open or acknowledged."""
        q = parse_query(request.query)
        now = time.time()
        items, total = await self.read(lambda: self.store.anomalies(q, now))
        return journal_response(items, total, q, CSV_COLUMNS)

    async def get_anomaly(self, request: web.Request) -> web.Response:
        doc = await self.read(self.store.anomaly, request.match_info["id"], time.time())
        if doc is None:
            raise NotFound(f"no anomaly {request.match_info['id']!r}")
        return web.json_response(doc)

    async def anomaly_action(self, request: web.Request) -> web.Response:
        """Acknowledge or resolve centrally: queued for the anomaly's gateway, which owns it and applies it
        with its next batch (202); the anomaly shows the action as `pending` until then."""
        anomaly_id = request.match_info["id"]
        action: Literal["ack", "resolve"] = "ack" if request.path.endswith("/ack") else "resolve"
        note, false_positive = await read_anomaly_action(request)
        doc = await self.read(self.store.anomaly, anomaly_id, time.time())
        if doc is None:
            raise NotFound(f"no anomaly {anomaly_id!r}")
        if doc["state"] == "resolved":
            return error_body(409, "anomaly_state", f"anomaly {anomaly_id} is already resolved")
        await self.write(self.store.add_action, doc["gatewayId"], Action(
            anomaly_id, action, self.auth.caller(request), note, false_positive))
        return web.json_response({**doc, "pending": sorted({*doc.get("pending", []), action})}, status=202)

    async def get_owner(self, request: web.Request) -> web.Response:
        """The gateway that owns a Thing: the first that wrote it, or the one an admin gave it to."""
        thing_id = request.match_info["id"]
        owner = await self.read(self.store.owner, thing_id)
        if owner is None:
            raise NotFound(f"no gateway has written Thing {thing_id!r}", thing_id=thing_id)
        return web.json_response({"thingId": thing_id, "gatewayId": owner})

    async def transfer(self, request: web.Request) -> web.Response:
        """Give a Thing to another gateway of its site (the machine moved lines): body `{"gateway": id}`.
        From then on only that gateway may write the Thing; its next document replaces the stored one."""
        thing_id = request.match_info["id"]
        target = (await read_object(request, frozenset({"gateway"}), '"gateway"')).get("gateway")
        if not isinstance(target, str):
            raise Invalid('send {"gateway": "<gateway id>"}')
        token = next((g for g in self.config.auth.gateway_tokens if g.gateway == target), None)
        if token is None:
            raise Invalid(f"gateway {target[:80]!r} is not one of auth.gateway_tokens")
        if not thing_id.startswith(f"{token.site}:"):
            raise Invalid(f"gateway {target} serves site {token.site}; Thing {thing_id[:80]!r} is of another site")
        former = await self.write(self.store.transfer, thing_id, target, token.line)
        if former is None:
            raise NotFound(f"no gateway has written Thing {thing_id!r}", thing_id=thing_id)
        log.warning("a Thing changed owner", extra={"thing": thing_id, "from": former, "to": target,
                                                    "by": self.auth.caller(request)})
        return web.json_response({"thingId": thing_id, "gatewayId": target, "formerGatewayId": former})

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        """Site summaries every `aggregator.summary_interval_s` (the first right away), every anomaly
        change as it arrives (`{"event": "Anomaly", "anomaly": {...}}`), and the Thing documents of the
        lines a client follows (`{"action": "subscribe", "lines": ["site/line", ...]}`, `"*"` for all) as
        each batch brings them (`{"event": "Things", ...}`)."""
        if len(self._sockets) >= self.config.aggregator.ws_max_clients:
            self.metrics.ws_refused.inc()
            return error_body(503, "too_many_clients", f"{self.config.aggregator.ws_max_clients} WebSocket clients "
                              "are connected (aggregator.ws_max_clients); retry later", headers={"Retry-After": "5"})
        ws = web.WebSocketResponse(heartbeat=30, max_msg_size=64 * 1024)
        self._sockets.add(ws)  # counted before the handshake's await, so concurrent upgrades respect the cap
        try:
            await ws.prepare(request)
        except BaseException:
            self._sockets.discard(ws)
            raise
        try:
            await ws.send_str(json.dumps({"event": "SiteSummaries", "sites": await self.site_summaries(),
                                          "timestamp": time.time()}))
            async for msg in ws:
                if msg.type == WSMsgType.ERROR:
                    break
                if msg.type == WSMsgType.TEXT:
                    await self._ws_command(ws, msg.data)
        finally:
            self._sockets.discard(ws)
            self._lines.pop(ws, None)
        return ws

    async def _ws_command(self, ws: web.WebSocketResponse, text: str) -> None:
        try:
            cmd = parse_json(text, "the message")
        except Invalid:
            cmd = None
        lines = cmd.get("lines") if isinstance(cmd, dict) else None
        if not (isinstance(cmd, dict) and cmd.get("action") in ("subscribe", "unsubscribe") and isinstance(lines, list)
                and len(lines) <= 1000 and all(isinstance(li, str) and len(li) <= 200 for li in lines)):
            await ws.send_str(json.dumps({"event": "Error", "error": "invalid", "detail":
                                          'send {"action": "subscribe"|"unsubscribe", "lines": ["site/line", ...]}'}))
            return
        mine = self._lines.setdefault(ws, set())
        if cmd["action"] == "subscribe":
            mine.update(lines)
        else:
            mine.difference_update(lines)
        await ws.send_str(json.dumps({"event": "Subscribed", "lines": sorted(mine)}))

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "version": __version__,
                                  "uptime_s": round(time.time() - self.started, 3)})

    async def ready(self, request: web.Request) -> web.Response:
        try:
            await self.read(self.store.point_count)
        except Exception as exc:
            return web.json_response({"ready": False, "checks": {"store": str(exc)[:200]}}, status=503)
        warnings = []
        if self.config.auth.open:
            warnings.append("auth.open is on: every API request is admin, without a key (demo mode)")
        return web.json_response({"ready": True, "checks": {"store": "ok"}, "warnings": warnings,
                                  "backend": self.config.storage.backend})

    async def openapi(self, request: web.Request) -> web.Response:
        """The OpenAPI document of this API."""
        return web.json_response(SPEC)

    async def prometheus(self, request: web.Request) -> web.Response:
        self.metrics.ws_clients.set(len(self._sockets))
        return web.Response(body=generate_latest(self.metrics.registry), content_type="text/plain", charset="utf-8")


MODEL_FILES = ("model.json", "autoencoder.onnx", "isolation_forest.onnx")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def _number(value: Any) -> float:
    """A score from a gateway's document: a finite number, else 0 (documents are the gateways' own)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    try:
        number = float(value)
    except OverflowError:
        return 0.0
    return number if math.isfinite(number) else 0.0


def _foreign(batch: Batch, gw: GatewayToken) -> str:
    """Why a batch is not this gateway's to write at all, or "" when it is (its Things are checked by
    `_other_site` and the store)."""
    if batch.gateway_id != gw.gateway:
        return f"this token belongs to gateway {gw.gateway}, not {batch.gateway_id}"
    if (batch.site, batch.line) != (gw.site, gw.line):
        return f"gateway {gw.gateway} writes {gw.site}/{gw.line} only"
    return ""


def _other_site(batch: Batch, gw: GatewayToken) -> list[str]:
    """The Things of another site the batch touches (never this gateway's to write)."""
    prefix = f"{gw.site}:"
    ids = {k[0] for k in batch.series} | {d.id for d in batch.things} | set(batch.deleted) \
        | {a.thing_id for a in batch.anomalies}
    return sorted(i for i in ids if not i.startswith(prefix))




