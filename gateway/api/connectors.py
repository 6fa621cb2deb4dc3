"""REST for the PLC connector devices (`/api/v1/connectors/devices`): operators read them and their
health, admins add, change and remove them (persisted, applied at once, other devices untouched)
and import a Modbus register map from CSV."""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web

from gateway.api.parts import PARTS
from gateway.common.errors import Conflict, Invalid, NotFound
from gateway.common.http import read_json, requires
from gateway.connectors.config import ModbusDevice
from gateway.connectors.manager import ConnectorManager, DeviceEntry, device_document, parse_device
from gateway.connectors.register_map import RegisterMapError, parse_register_map

MAX_CSV = 256 * 1024


routes = web.RouteTableDef()


HIDDEN = "***"
SECRET_KEYS = ("password",)


def entry_document(entry: DeviceEntry, site: str) -> dict[str, Any]:
    """The device as the API shows it: secrets replaced by `***` (sent back unchanged, they are kept)."""
    doc = device_document(entry.device)
    for key in SECRET_KEYS:
        if doc.get(key):
            doc[key] = HIDDEN
    doc["source"] = entry.source
    doc["thingId"] = f"{site}:{entry.device.thing}"
    doc["health"] = (entry.health.properties(entry.device.name, entry.device.protocol)
                     if entry.health is not None else None)
    return doc


@routes.get("/api/v1/connectors/devices")
@requires("operator")
async def list_devices(request: web.Request) -> web.Response:
    """Every device (configured and added over the API) with its health."""
    site = request.app[PARTS].config.gateway.site
    items = [entry_document(e, site) for e in request.app[PARTS].need_connectors().entries()]
    return web.json_response({"items": items, "total": len(items)})


@routes.get("/api/v1/connectors/devices/{name}")
@requires("operator")
async def get_device(request: web.Request) -> web.Response:
    entry = request.app[PARTS].need_connectors().entry(request.match_info["name"])
    return web.json_response(entry_document(entry, request.app[PARTS].config.gateway.site))


@routes.post("/api/v1/connectors/devices")
@requires("admin")
async def create_device(request: web.Request) -> web.Response:
    manager = request.app[PARTS].need_connectors()
    device = parse_device(await read_json(request))
    if any(e.device.name == device.name for e in manager.entries()):
        raise Conflict(f"device {device.name!r} exists; PUT /api/v1/connectors/devices/{device.name} changes it")
    await manager.put(device)
    return _saved(request, manager, device.name, 201)


@routes.put("/api/v1/connectors/devices/{name}")
@requires("admin")
async def put_device(request: web.Request) -> web.Response:
    """Add or replace one device; only its own connection restarts."""
    manager = request.app[PARTS].need_connectors()
    name = request.match_info["name"]
    body = await read_json(request)
    if isinstance(body, dict):
        body.setdefault("name", name)
        if body["name"] != name:
            raise Invalid(f"the body names device {body['name']!r}, the path {name!r}")
    if isinstance(body, dict):
        _keep_secrets(manager, name, body)
    device = parse_device(body)
    created = await manager.put(device)
    return _saved(request, manager, name, 201 if created else 200)


def _keep_secrets(manager: ConnectorManager, name: str, body: dict[str, Any]) -> None:
    """A secret sent back as `***` (as GET shows it) keeps the stored value."""
    for key in SECRET_KEYS:
        if body.get(key) == HIDDEN:
            try:
                body[key] = getattr(manager.entry(name).device, key, "")
            except NotFound:
                raise Invalid(f"{key}: give the value (*** stands for a stored one)") from None


def _saved(request: web.Request, manager: ConnectorManager, name: str, status: int) -> web.Response:
    doc = entry_document(manager.entry(name), request.app[PARTS].config.gateway.site)
    resp = web.json_response(doc, status=status)
    if status == 201:
        resp.headers["Location"] = f"/api/v1/connectors/devices/{name}"
    return resp


@routes.delete("/api/v1/connectors/devices/{name}")
@requires("admin")
async def delete_device(request: web.Request) -> web.Response:
    await request.app[PARTS].need_connectors().delete(request.match_info["name"])
    return web.Response(status=204)


@routes.post("/api/v1/connectors/devices/{name}/register-map")
@requires("admin")
async def import_register_map(request: web.Request) -> web.Response:
    """A register-map CSV (address,name,type,scale,unit,...) into a Modbus device's tags: a tag of the
    same feature and property is replaced, the others are added. `?replace=true` drops the old tags."""
    manager = request.app[PARTS].need_connectors()
    name = request.match_info["name"]
    entry = manager.entry(name)
    if not isinstance(entry.device, ModbusDevice):
        raise Invalid(f"{name} is not a Modbus device; register maps are for Modbus")
    if entry.source != "api":
        raise Conflict(f"{name!r} is defined in the configuration file; set its register_map there")
    if request.content_length is not None and request.content_length > MAX_CSV:
        raise Invalid(f"a register map is at most {MAX_CSV} bytes")
    try:
        text = (await request.read()).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise Invalid("the register map is not UTF-8") from None
    try:
        tags = parse_register_map(text, source="register map")
    except RegisterMapError as exc:
        raise Invalid(str(exc)[:2000]) from None
    replace = request.query.get("replace", "false").lower() in ("1", "true", "yes")
    new_keys = {t.key for t in tags}
    kept = () if replace else tuple(t for t in entry.device.tags if t.key not in new_keys)
    device = parse_device(device_document(dataclasses.replace(entry.device, tags=kept + tags)))
    await manager.put(device)
    return _saved(request, manager, name, 200)
