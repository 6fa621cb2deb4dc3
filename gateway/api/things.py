"""REST for Things, features, queries and dead letters (`/api/v1/...`)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.api.parts import PARTS
from gateway.common.errors import Invalid
from gateway.common.http import error_body, int_param, parse_json, read_json, read_object, requires
from gateway.ingest.mqtt import CommandNotSent
from gateway.twin.model import Thing, check_name
from gateway.twin.query import ThingFilter

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/v1/things", list_things)
    r.add_post("/api/v1/things", create_thing)
    r.add_get("/api/v1/things/{id}", get_thing)
    r.add_put("/api/v1/things/{id}", replace_thing)
    r.add_delete("/api/v1/things/{id}", delete_thing)
    r.add_get("/api/v1/things/{id}/features/{feature}", get_feature)
    r.add_put("/api/v1/things/{id}/features/{feature}", put_feature)
    r.add_post("/api/v1/query", query)
    r.add_get("/api/v1/deadletters", dead_letters)


def _expected_version(request: web.Request, body: Any = None) -> int | None:
    """The version a write is based on: `If-Match: "7"` header or `"version": 7` in the body."""
    header = request.headers.get("If-Match")
    if header is not None:
        tag = header.strip().removeprefix("W/").strip('"')
        if tag == "*":
            return None
        try:
            return int(tag)
        except ValueError:
            raise Invalid('If-Match must be a Thing version, e.g. If-Match: "7"') from None
    if isinstance(body, dict) and "version" in body:
        v = body["version"]
        if isinstance(v, bool) or not isinstance(v, int):
            raise Invalid("version must be an integer")
        return v
    return None


def _thing_response(thing: Thing, status: int = 200) -> web.Response:
    return web.json_response(thing.to_document(), status=status, headers={"ETag": f'"{thing.version}"'})


def _page(request: web.Request, flt: ThingFilter, limit: int, offset: int) -> dict[str, Any]:
    items, total = request.app[PARTS].registry.query(flt, limit=limit, offset=offset)
    return {"items": [t.to_document() for t in items], "total": total, "limit": limit, "offset": offset,
            "nextOffset": offset + limit if offset + limit < total else None}


@requires("viewer")
async def list_things(request: web.Request) -> web.Response:
    """Things, paginated; `type=`, `metadata.<k>=` shortcuts and `filter=<JSON>` narrow the list."""
    q = request.query
    limit = int_param(q.get("limit"), "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    offset = int_param(q.get("offset"), "offset", 0, 0, 10**9)
    doc: dict[str, Any] = {}
    if "filter" in q:
        doc = parse_json(q["filter"], "filter")
        if not isinstance(doc, dict):
            raise Invalid("filter must be a JSON object")
    for key, value in q.items():
        if key == "type" or key.startswith("metadata."):
            doc[key] = value
        elif key not in ("limit", "offset", "filter"):
            raise Invalid(f"unknown query parameter {key!r}")
    return web.json_response(_page(request, ThingFilter.parse(doc), limit, offset))


@requires("viewer")
async def query(request: web.Request) -> web.Response:
    """`{"filter": {...}, "limit": 50, "offset": 0}` → the same page shape as GET /things."""
    body = await read_object(request, frozenset({"filter", "limit", "offset"}), "filter, limit, offset")
    limit = body.get("limit", DEFAULT_LIMIT)
    offset = body.get("offset", 0)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise Invalid(f"limit must be an integer 1..{MAX_LIMIT}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise Invalid("offset must be a non-negative integer")
    return web.json_response(_page(request, ThingFilter.parse(body.get("filter")), limit, offset))


@requires("admin")
async def create_thing(request: web.Request) -> web.Response:
    thing = await request.app[PARTS].registry.create(await read_json(request))
    resp = _thing_response(thing, 201)
    resp.headers["Location"] = f"/api/v1/things/{thing.id}"
    return resp


@requires("viewer")
async def get_thing(request: web.Request) -> web.Response:
    return _thing_response(request.app[PARTS].registry.require(request.match_info["id"]))


@requires("admin")
async def replace_thing(request: web.Request) -> web.Response:
    body = await read_json(request)
    expected = _expected_version(request, body)
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in ("version", "lastUpdated")}
    thing = await request.app[PARTS].registry.replace(request.match_info["id"], body, expected_version=expected)
    return _thing_response(thing)


@requires("admin")
async def delete_thing(request: web.Request) -> web.Response:
    await request.app[PARTS].registry.delete(request.match_info["id"], expected_version=_expected_version(request))
    return web.Response(status=204)


@requires("viewer")
async def get_feature(request: web.Request) -> web.Response:
    thing = request.app[PARTS].registry.require(request.match_info["id"])
    name = request.match_info["feature"]
    feature = thing.features.get(name)
    if feature is None:
        return error_body(404, "not_found", f"{thing.id} has no feature {name!r}")
    return web.json_response(feature.to_document(), headers={"ETag": f'"{thing.version}"'})


@requires("operator")
async def put_feature(request: web.Request) -> web.Response:
    """Partial merge (RFC 7386) of properties and/or desiredProperties; desired ones become a command."""
    parts = request.app[PARTS]
    body = await read_object(request, frozenset({"properties", "desiredProperties", "version"}),
                             "properties and/or desiredProperties")
    props = body.get("properties")
    desired = body.get("desiredProperties")
    for name, value in (("properties", props), ("desiredProperties", desired)):
        if value is not None and not isinstance(value, dict):
            raise Invalid(f"{name} must be an object")
    if not props and not desired:
        raise Invalid("give properties and/or desiredProperties")
    thing_id, feature = request.match_info["id"], check_name(request.match_info["feature"], "feature")
    expected = _expected_version(request, body)
    registry = parts.registry
    thing = registry.require(thing_id)
    if desired and not parts.ingest.connected.is_set():
        return error_body(503, "broker_unavailable",
                          "the MQTT broker is not connected, so the command cannot be sent; nothing changed")
    thing = registry.merge_feature(thing_id, feature, properties=props, desired=desired,
                                   expected_version=expected)
    result: dict[str, Any] = {"thingId": thing.id, "feature": feature,
                              **thing.features[feature].to_document(), "version": thing.version}
    if desired:
        cmd = registry.register_command(thing, feature, desired)
        try:
            topic = await parts.ingest.send_command(thing, feature, desired, cmd.cmd_id)
        except CommandNotSent as exc:
            return error_body(503, "command_not_sent",
                              f"desired properties are stored (version {thing.version}) but {exc}",
                              version=thing.version)
        result["command"] = {"cmdId": cmd.cmd_id, "topic": topic}
    return web.json_response(result, headers={"ETag": f'"{thing.version}"'})


@requires("viewer")
async def dead_letters(request: web.Request) -> web.Response:
    """The newest rejected MQTT messages with their reasons (for diagnosing a misbehaving node)."""
    limit = int_param(request.query.get("limit"), "limit", 100, 1, 1000)
    rows = await request.app[PARTS].dead_letters.recent(limit, request.query.get("reason"))
    return web.json_response({"items": rows, "total": request.app[PARTS].dead_letters.total})
