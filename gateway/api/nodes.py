"""Node provisioning over REST (admin): the nodes discovery has seen, and approving or rejecting them."""

from __future__ import annotations

from aiohttp import web

from gateway.api.parts import PARTS
from gateway.common.http import requires
from gateway.provision import check_node_id

routes = web.RouteTableDef()


@routes.get("/api/v1/nodes")
@requires("admin")
async def list_nodes(request: web.Request) -> web.Response:
    """Every node seen: pending (waiting for approval), approved or rejected."""
    parts = request.app[PARTS]
    prov = parts.need_provisioner()
    state = request.query.get("state", "")
    items = [n.to_json(parts.config.gateway.site) for n in prov.nodes() if not state or n.state == state]
    return web.json_response({"items": items, "total": len(items)})


@routes.post("/api/v1/nodes/{id}/approve")
@requires("admin")
async def approve(request: web.Request) -> web.Response:
    """Create the node's Thing and MQTT user, update the broker, hand the credentials to the node."""
    return await _decide(request, approve=True)


@routes.post("/api/v1/nodes/{id}/reject")
@requires("admin")
async def reject(request: web.Request) -> web.Response:
    """Refuse the node: no MQTT user (any it had is removed); it stays listed as rejected."""
    return await _decide(request, approve=False)


async def _decide(request: web.Request, *, approve: bool) -> web.Response:
    """An admin's decision on the node the path names; the node as it stands after it."""
    parts = request.app[PARTS]
    prov = parts.need_provisioner()
    node_id = check_node_id(request.match_info["id"])
    node = await (prov.approve(node_id) if approve else prov.reject(node_id))
    return web.json_response(node.to_json(parts.config.gateway.site))
