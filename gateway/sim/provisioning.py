"""Simulated nodes that provision themselves like the firmware does: each advertises `_egiz-node._tcp`
with its id, type, firmware version and MAC, serves `POST /provision` and `GET /info`, and waits until
the gateway's admin approves it and the gateway hands it its own MQTT credentials."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway import __version__
from gateway.discovery import NODE_SERVICE, Zeroconfd, local_addresses, service_info

log = logging.getLogger(__name__)

FIRMWARE = f"sim-{__version__}"


@dataclass(frozen=True)
class Provisioned:
    """What the gateway handed a node: where its broker is and who the node is on it."""

    site: str
    gateway: str
    host: str
    port: int
    username: str
    password: str
    topic_prefix: str

    @classmethod
    def from_json(cls, doc: Any) -> Provisioned:
        """The provisioning document, or ValueError naming what is missing or wrong."""
        if not isinstance(doc, dict) or not isinstance(doc.get("broker"), dict):
            raise ValueError("expected an object with a broker object")
        b = doc["broker"]
        fields = {"site": doc.get("site"), "gateway": doc.get("gateway"), "host": b.get("host"),
                  "port": b.get("port"), "username": doc.get("username"), "password": doc.get("password"),
                  "topic_prefix": doc.get("topic_prefix")}
        bad = [k for k, v in fields.items() if not (isinstance(v, int) and 0 < v < 65536 if k == "port"
                                                     else isinstance(v, str) and v)]
        if bad:
            raise ValueError(f"missing or invalid: {', '.join(bad)}")
        return cls(**fields)


def fake_mac(equipment_id: str) -> str:
    """A stable, locally administered MAC address for a simulated node."""
    digest = hashlib.sha256(equipment_id.encode()).digest()
    return ":".join(f"{b:02x}" for b in (b"\x02" + digest[:5]))


class SimulatedNodes:
    """The provisioning side of a simulated fleet: one endpoint and one advertisement per node."""

    def __init__(self, things: list[tuple[str, str]], *, address: str = "") -> None:
        self.things = things
        self.address = address or local_addresses()[0]
        self.received: dict[str, Provisioned] = {}
        self._all = asyncio.Event()
        self._runners: list[web.AppRunner] = []
        self.zc: Zeroconfd | None = None

    async def start(self) -> None:
        self.zc = Zeroconfd()
        for equipment_id, etype in self.things:
            port = await self._serve(equipment_id, etype)
            txt = {"id": equipment_id, "type": etype, "fw": FIRMWARE, "mac": fake_mac(equipment_id)}
            await self.zc.advertise(service_info(NODE_SERVICE, equipment_id, port, txt, [self.address]))

    async def _serve(self, equipment_id: str, etype: str) -> int:
        info = {"id": equipment_id, "type": etype, "fw": FIRMWARE, "mac": fake_mac(equipment_id)}

        async def provision(request: web.Request) -> web.Response:
            try:
                doc = Provisioned.from_json(await request.json())
            except ValueError as exc:
                return web.json_response({"ok": False, "error": str(exc)}, status=400)
            self.received[equipment_id] = doc
            log.info("simulated node provisioned", extra={"node_id": equipment_id, "broker": f"{doc.host}:{doc.port}",
                                                          "username": doc.username})
            if len(self.received) == len(self.things):
                self._all.set()
            return web.json_response({"ok": True})

        async def get_info(request: web.Request) -> web.Response:
            return web.json_response({**info, "provisioned": equipment_id in self.received})

        app = web.Application(client_max_size=16 * 1024)
        app.router.add_post("/provision", provision)
        app.router.add_get("/info", get_info)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.address, 0)
        await site.start()
        self._runners.append(runner)
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    async def wait(self) -> dict[str, Provisioned]:
        """Until every node has its credentials."""
        await self._all.wait()
        return dict(self.received)

    @property
    def pending(self) -> list[str]:
        return [eid for eid, _ in self.things if eid not in self.received]

    async def stop(self) -> None:
        if self.zc is not None:
            await self.zc.close()
            self.zc = None
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
