"""Provisioning on one host: a real node registry file, the broker files the gateway writes and the
document a node's provisioning endpoint receives. The topic layout here is a plant's own, with a
`{line}` level, so nothing a node is given may be left as a wildcard."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway.bus import EventBus
from gateway.config import GatewayConfig, load_config
from gateway.provision import Provisioner
from gateway.twin.registry import TwinRegistry
from tests.helpers import serve

SITE, LINE = "izmir-bakery", "line-b"


@pytest.fixture
async def node_endpoint() -> AsyncIterator[tuple[int, list[dict[str, Any]]]]:
    """A node's provisioning endpoint: what it was handed, in order."""
    received: list[dict[str, Any]] = []

    async def provision(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/provision", provision)
    runner, port = await serve(app)
    yield port, received
    await runner.cleanup()


def config(tmp_path: Path) -> GatewayConfig:
    return load_config(GatewayConfig, environ={}, overrides={
        "gateway.id": "gw-b", "gateway.site": SITE, "gateway.line": LINE, "auth.open": True,
        "gateway.data_dir": str(tmp_path),
        "mqtt.username": "egiz-gateway", "mqtt.password": "gateway-password",
        "broker.password_file": str(tmp_path / "passwords"), "broker.acl_file": str(tmp_path / "acl"),
        "ingest.telemetry_topic": "plant/{site}/{line}/{type}/{equipment_id}/{feature}/telemetry",
        "ingest.status_topic": "plant/{site}/{line}/{type}/{equipment_id}/status",
        "ingest.command_topic": "plant/{site}/{line}/{type}/{equipment_id}/cmd",
    })


async def test_an_approved_node_gets_its_own_topics_with_every_level_filled(
        tmp_path: Path, node_endpoint: tuple[int, list[dict[str, Any]]]) -> None:
    port, received = node_endpoint
    cfg = config(tmp_path)
    registry = TwinRegistry(tmp_path / "registry.sqlite", EventBus(), flush_interval_s=60)
    await registry.start()
    prov = Provisioner(cfg, registry)
    await prov.start()
    try:
        await prov.seen("oven-007", "oven", fw="1.2.0", mac="02:00:00:00:00:07", address="127.0.0.1", port=port)
        assert [(n.id, n.state) for n in prov.nodes()] == [("oven-007", "pending")]
        assert received == []  # nothing is handed out before approval
        node = await prov.approve("oven-007")
        assert node.state == "approved" and node.delivered_at > 0 and node.password == ""
        assert registry.get(cfg.thing_id("oven-007")) is not None

        [doc] = received
        prefix = f"plant/{SITE}/{LINE}/oven/oven-007"
        assert doc["topic_prefix"] == prefix
        assert doc["username"] == "node-oven-007" and len(doc["password"]) >= 24
        acl = (tmp_path / "acl").read_text()
        node_part = acl[acl.index("user node-oven-007"):]
        assert f"topic write {prefix}/+/telemetry" in node_part
        assert f"topic write {prefix}/status" in node_part
        assert f"topic write {prefix}/cmd/ack" in node_part
        assert f"topic read {prefix}/cmd" in node_part
        assert "node-oven-007:" in (tmp_path / "passwords").read_text()
        assert doc["password"] not in (tmp_path / "passwords").read_text()  # only its hash is kept

        await prov.reject("oven-007")
        assert "node-oven-007" not in (tmp_path / "passwords").read_text()
        assert "node-oven-007" not in (tmp_path / "acl").read_text()
    finally:
        await prov.stop()
        await registry.stop()
