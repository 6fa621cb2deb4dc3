"""WebSocket `/api/v1/ws`: subscribe by Thing id, by filter or to everything; StateChanged out.

Each connection is one bus subscription with a bounded queue. A client that cannot keep up is
closed (1013, try again later) instead of slowing ingest or growing memory; it can reconnect and
re-read the current state over REST or with `"snapshot": true`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from gateway.api.parts import PARTS
from gateway.bus import Subscription
from gateway.common.errors import EgizError, Invalid
from gateway.common.http import error_body, parse_json, requires
from gateway.common.timefmt import iso_utc
from gateway.twin.model import validate_thing_id
from gateway.twin.query import ThingFilter

log = logging.getLogger(__name__)
class OpenSockets:
    """The WebSockets this app has open, so shutdown can close each with 1001."""

    def __init__(self) -> None:
        self.items: set[web.WebSocketResponse] = set()

    def __len__(self) -> int:
        return len(self.items)


SOCKETS = web.AppKey("websockets", OpenSockets)
MAX_CLIENT_MESSAGE = 64 * 1024
# What one connection may watch: the bus checks every filter of every connection on each event.
MAX_THING_IDS = 1000
MAX_FILTERS = 32
CLOSE_TIMEOUT_S = 2.0
BURST = 256  # events sent in one write when a client's queue has several waiting
WRITE_HIGH = 1 << 20  # bytes waiting in the socket's buffer above which sending pauses (the queue then fills)


def add_routes(app: web.Application) -> None:
    app[SOCKETS] = OpenSockets()
    app.router.add_get("/api/v1/ws", websocket)
    app.on_shutdown.append(_close_all)


async def _close_all(app: web.Application) -> None:
    """Tell every client the server is going away (1001) before the app stops."""
    for ws in list(app[SOCKETS].items):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"gateway shutting down")


@requires("viewer")
async def websocket(request: web.Request) -> web.StreamResponse:
    parts = request.app[PARTS]
    sockets = request.app[SOCKETS]
    if len(sockets) >= parts.config.ws.max_clients:
        return error_body(503, "too_many_clients", "the WebSocket client limit is reached; retry later")
    ws = web.WebSocketResponse(heartbeat=parts.config.ws.heartbeat_s, max_msg_size=MAX_CLIENT_MESSAGE,
                               timeout=CLOSE_TIMEOUT_S, compress=parts.config.ws.compress)
    await ws.prepare(request)
    sub = parts.bus.subscribe(f"ws:{request.remote}", maxsize=parts.config.ws.queue_size, overflow="disconnect")
    sockets.items.add(ws)
    parts.metrics.ws_clients.set(len(sockets))
    # Both helper tasks are owned here: cancelled and awaited before the handler returns.
    sender = asyncio.create_task(_send_loop(ws, sub, parts.config.ws.heartbeat_s, request), name="ws-send")
    watchdog = asyncio.create_task(_overflow_watch(ws, sub, parts.metrics, request), name="ws-overflow")
    try:
        await _receive_loop(ws, sub, request)
    finally:
        sender.cancel()
        watchdog.cancel()
        for result in await asyncio.gather(sender, watchdog, return_exceptions=True):
            if isinstance(result, Exception) and not isinstance(result, ConnectionError):
                log.warning("WebSocket sender failed", extra={"error": repr(result)})
        sub.close()
        sockets.items.discard(ws)
        parts.metrics.ws_clients.set(len(sockets))
        if not ws.closed:
            await ws.close()
    return ws


async def _send_loop(ws: web.WebSocketResponse, sub: Subscription, heartbeat_s: float,
                     request: web.Request) -> None:
    heartbeat = json.dumps({"event": "Heartbeat"})
    # One timer per heartbeat, not one per wait: a client subscribed to a busy line is woken a few
    # hundred times a second, and a timeout armed and cancelled around every wait was most of what
    # a wake-up cost besides the write.
    loop = asyncio.get_running_loop()
    due = False

    def beat() -> None:
        nonlocal due
        due = True
        sub.nudge()

    timer = loop.call_later(heartbeat_s, beat)
    # Without compression a burst of events goes out as one write of whole frames: one system call
    # for up to BURST events instead of one each. With compression aiohttp frames every event.
    transport = request.transport if not ws.compress else None
    try:
        while not ws.closed:
            event = await sub.next()
            if due:
                due = False
                await ws.send_str(heartbeat[:-1] + f', "timestamp": "{iso_utc(time.time())}"}}')
                timer = loop.call_later(heartbeat_s, beat)
            if event is None:
                continue
            # The broker connection hands over a chunk's messages (a few dozen) in one turn of the
            # event loop, so they are all queued when this runs: no need to wait a turn for them to
            # join the burst — and waiting would let the next chunk pile onto a small queue.
            burst = [event, *sub.drain(BURST - 1)]
            if transport is None:
                for e in burst:
                    await ws.send_str(e.to_json())
                continue
            if ws.closed or transport.is_closing():  # closing: no data frame may follow the close frame
                break
            transport.write(b"".join([_text_frame(e.to_utf8()) for e in burst]))
            while transport.get_write_buffer_size() > WRITE_HIGH and not transport.is_closing():
                await asyncio.sleep(0.01)  # a slow reader: its queue fills meanwhile and overflows
    finally:
        timer.cancel()


def _text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented WebSocket text frame as a server sends it (RFC 6455, 5.2)."""
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", 0x81, n) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


async def _overflow_watch(ws: web.WebSocketResponse, sub: Subscription, metrics: Any,
                          request: web.Request) -> None:
    await sub.overflowed.wait()
    metrics.ws_disconnected_slow.inc()
    log.warning("closing a WebSocket client that cannot keep up", extra={"client": sub.name})
    try:
        await asyncio.wait_for(
            ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"too slow: event queue overflowed"), CLOSE_TIMEOUT_S
        )
    except TimeoutError:  # it does not even read the close frame: drop the connection
        if request.transport is not None:
            request.transport.abort()


async def _receive_loop(ws: web.WebSocketResponse, sub: Subscription, request: web.Request) -> None:
    registry = request.app[PARTS].registry
    async for msg in ws:
        if msg.type != WSMsgType.TEXT:
            if msg.type == WSMsgType.BINARY:
                await ws.send_json({"event": "Error", "detail": "send JSON text frames"})
            continue
        try:
            reply = _command(sub, msg.data, registry)
        except EgizError as exc:
            reply = [{"event": "Error", "detail": exc.detail}]
        for r in reply:
            await ws.send_str(json.dumps(r, separators=(",", ":")))


def _command(sub: Subscription, text: str, registry: Any) -> list[dict[str, Any]]:
    """Apply one client message; returns the replies (an ack, and snapshots when asked for)."""
    try:
        doc = parse_json(text, "the message")
    except Invalid as exc:
        return [{"event": "Error", "detail": exc.detail}]
    if not isinstance(doc, dict) or doc.get("action") not in ("subscribe", "unsubscribe"):
        return [{"event": "Error", "detail": 'action must be "subscribe" or "unsubscribe"'}]
    action = doc["action"]
    ids: list[str] = []
    if "thingId" in doc:
        ids.append(validate_thing_id(doc["thingId"]))
    if "thingIds" in doc:
        if not isinstance(doc["thingIds"], list) or len(doc["thingIds"]) > MAX_THING_IDS:
            return [{"event": "Error", "detail": f"thingIds must be an array of at most {MAX_THING_IDS} ids"}]
        ids.extend(validate_thing_id(t) for t in doc["thingIds"])
    ids = list(dict.fromkeys(ids))
    flt = ThingFilter.parse(doc["filter"]) if "filter" in doc else None
    everything = not ids and flt is None
    ack: dict[str, Any] = {"event": "Subscribed" if action == "subscribe" else "Unsubscribed"}
    if ids:
        ack["thingIds"] = ids
    if flt is not None:
        ack["filter"] = flt.source
    if everything:
        ack["all"] = True
    if action == "unsubscribe":
        sub.unwatch(thing_ids=ids, predicates=flt is not None or everything, everything=everything)
        return [ack]
    over = _over_limits(sub, ids, flt)
    if over:
        return [{"event": "Error", "detail": f"{over}; nothing was subscribed (unsubscribe something first)"}]
    # The same filter twice would only cost a second check per event.
    known = flt is not None and any(getattr(f, "source", None) == flt.source for f in sub.filters)
    sub.watch(thing_ids=ids, predicate=None if known else flt, everything=everything)
    out = [ack]
    if doc.get("snapshot") is True:
        things = [registry.get(t) for t in ids] if ids else registry.query(
            flt or ThingFilter.parse({}), limit=10_000, offset=0)[0]
        out.extend({"event": "Snapshot", "thingId": t.id, "thing": t.to_document()} for t in things if t)
    return out


def _over_limits(sub: Subscription, ids: list[str], flt: ThingFilter | None) -> str | None:
    """Why this subscribe would take the connection over its limits, or None."""
    n_ids = len(sub.thing_ids.union(ids))
    if n_ids > MAX_THING_IDS:
        return f"a connection can watch at most {MAX_THING_IDS} Thing ids; this would make {n_ids}"
    if flt is not None and len(sub.filters) >= MAX_FILTERS and all(
            getattr(f, "source", None) != flt.source for f in sub.filters):
        return f"a connection can watch at most {MAX_FILTERS} filters"
    return None
