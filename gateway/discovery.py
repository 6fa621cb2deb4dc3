"""Zeroconf (mDNS/DNS-SD) on the line network: the gateway advertises its broker (`_mqtt._tcp`) and
itself (`_egiz-gw._tcp`), and browses for nodes (`_egiz-node._tcp`), which it lists as pending until an
admin approves them. Nodes (and simulated nodes) advertise themselves the same way."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from gateway import __version__

log = logging.getLogger(__name__)

GATEWAY_SERVICE = "_egiz-gw._tcp.local."
NODE_SERVICE = "_egiz-node._tcp.local."
MQTT_SERVICE = "_mqtt._tcp.local."
RESOLVE_TIMEOUT_MS = 3000


@dataclass(frozen=True)
class Announcement:
    """One resolved service: its instance name, addresses, port and TXT record as text."""

    service: str
    name: str
    addresses: tuple[str, ...]
    port: int
    txt: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return self.addresses[0] if self.addresses else ""

    def to_json(self) -> dict[str, Any]:
        return {"service": self.service.removesuffix(".local."), "name": self.name.split(".")[0],
                "addresses": list(self.addresses), "port": self.port, **self.txt}


def local_addresses() -> list[str]:
    """This host's IPv4 addresses, loopback last (advertised only when nothing else exists)."""
    import ifaddr

    found = [ip.ip for a in ifaddr.get_adapters() for ip in a.ips if isinstance(ip.ip, str)]
    outside = [a for a in found if not ipaddress.ip_address(a).is_loopback]
    return outside or [a for a in found if ipaddress.ip_address(a).is_loopback] or ["127.0.0.1"]


def service_info(service: str, instance: str, port: int, txt: dict[str, str],
                 addresses: Iterable[str] | None = None) -> AsyncServiceInfo:
    # The host name is the instance's own, not the machine's: two instances on one host, or hosts
    # cloned from one image, must not merge their addresses under one name.
    return AsyncServiceInfo(service, f"{instance}.{service}", port=port, properties=txt,
                            addresses=[socket.inet_aton(a) for a in (addresses or local_addresses())],
                            server=f"{instance}.local.")


def _txt(info: AsyncServiceInfo) -> dict[str, str]:
    out = {}
    for k, v in (info.properties or {}).items():
        try:
            out[k.decode()] = (v or b"").decode()
        except (UnicodeDecodeError, AttributeError):
            continue
    return out


class Zeroconfd:
    """One mDNS responder per process: services it advertises and browsers it runs, closed together."""

    def __init__(self) -> None:
        self.azc = AsyncZeroconf(ip_version=IPVersion.V4Only)
        self._browsers: list[AsyncServiceBrowser] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def advertise(self, info: AsyncServiceInfo) -> None:
        await self.azc.async_register_service(info, allow_name_change=True)
        log.info("advertising on the network", extra={"service": info.type, "service_name": info.name,
                                                      "port": info.port})

    def browse(self, service: str, on_found: Callable[[Announcement], Awaitable[None]],
               on_gone: Callable[[str], None] | None = None) -> None:
        """Call `on_found` for every instance that appears or changes, `on_gone` with its name when it leaves."""

        def handler(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
            if state_change is ServiceStateChange.Removed:
                if on_gone is not None:
                    on_gone(name)
                return
            task = asyncio.get_running_loop().create_task(self._resolve(service_type, name, on_found))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self._browsers.append(AsyncServiceBrowser(self.azc.zeroconf, [service], handlers=[handler]))

    async def _resolve(self, service: str, name: str, on_found: Callable[[Announcement], Awaitable[None]]) -> None:
        info = AsyncServiceInfo(service, name)
        if not await info.async_request(self.azc.zeroconf, RESOLVE_TIMEOUT_MS):
            log.debug("a service did not answer", extra={"service_name": name})
            return
        try:
            await on_found(Announcement(service, name, tuple(info.parsed_addresses(IPVersion.V4Only)),
                                        info.port or 0, _txt(info)))
        except Exception:
            log.exception("handling a discovered service failed", extra={"service_name": name})

    async def close(self) -> None:
        for b in self._browsers:
            await b.async_cancel()
        for t in list(self._tasks):
            t.cancel()
        await self.azc.async_unregister_all_services()
        await self.azc.async_close()


class GatewayDiscovery:
    """The gateway's part: advertise the broker and the gateway; hand every node seen to the provisioner."""

    def __init__(self, config: Any, provisioner: Any, http_port: int) -> None:
        self.config = config
        self.provisioner = provisioner
        self.http_port = http_port
        self.zc: Zeroconfd | None = None
        self._expiry: asyncio.Task[None] | None = None

    async def start(self) -> None:
        cfg = self.config
        d, g = cfg.discovery, cfg.gateway
        addresses = [d.address] if d.address else None
        self.zc = Zeroconfd()
        txt = {"site": g.site, "line": g.line, "gateway": g.id, "version": __version__}
        await self.zc.advertise(service_info(MQTT_SERVICE, g.id, self.provisioner.broker_port, txt, addresses))
        await self.zc.advertise(service_info(GATEWAY_SERVICE, g.id, self.http_port, txt, addresses))
        self.zc.browse(NODE_SERVICE, self._node)
        self._expiry = asyncio.create_task(self._expire_loop())

    async def _node(self, a: Announcement) -> None:
        await self.provisioner.seen(a.txt.get("id", ""), a.txt.get("type", ""), fw=a.txt.get("fw", ""),
                                    mac=a.txt.get("mac", ""), address=a.address, port=a.port)

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(60)
            self.provisioner.expire()

    async def stop(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        if self.zc is not None:
            await self.zc.close()
            self.zc = None


async def discover(seconds: float) -> dict[str, list[Announcement]]:
    """Everything OpenEgiz on the network within `seconds`: gateways, their brokers, and nodes."""
    found: dict[str, dict[str, Announcement]] = {GATEWAY_SERVICE: {}, MQTT_SERVICE: {}, NODE_SERVICE: {}}
    zc = Zeroconfd()
    try:
        for service, seen in found.items():
            async def keep(a: Announcement, seen: dict[str, Announcement] = seen) -> None:
                seen[a.name] = a

            zc.browse(service, keep)
        await asyncio.sleep(seconds)
    finally:
        await zc.close()
    return {"gateways": sorted(found[GATEWAY_SERVICE].values(), key=lambda a: a.name),
            "brokers": sorted(found[MQTT_SERVICE].values(), key=lambda a: a.name),
            "nodes": sorted(found[NODE_SERVICE].values(), key=lambda a: a.name)}
