"""`egiz demo`: two sites x two lines on one machine — per line a broker, a gateway and a simulated
fleet, all forwarding to one aggregator; open auth.

Uses Mosquitto when it is installed and an embedded broker otherwise, keeps its files in one data
directory (so a second run shows the restored twin), and stops everything cleanly on Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.broker import BrokerSettings, find_free_port, start_broker
from gateway.config import GatewayConfig, load_config
from gateway.service import GatewayService
from gateway.sim import FleetOptions, SimError, run_fleet
from gateway.sim.equipment import EQUIPMENT_TYPES
from gateway.sim.faults import FaultItem
from gateway.sim.production import DEMO_SHIFTS, oee_rules

log = logging.getLogger(__name__)


SITES = ("izmir-bakery", "ankara-bakery", "bursa-bakery", "konya-bakery")
LINES = ("line-a", "line-b", "line-c", "line-d")
NODES_PER_LINE_STRIDE = 1000  # equipment ids of line k start at k * 1000 + 1, unique within a site


@dataclass(frozen=True)
class DemoOptions:
    data_dir: Path = Path(".egiz-demo")
    http_port: int = 8080  # the first gateway; the others take the next ports (0: any free port)
    mqtt_port: int = 0  # the first line's broker (0: a free port, so a system broker on 1883 is left alone)
    aggregator_port: int = 8090
    sites: int = 2
    lines: int = 2  # per site; every line has its own broker and gateway, as deployed
    nodes: int = 10  # per line
    rate_hz: float = 1.0
    faults: str = "overtemperature:oven-001@60+120,stuck:mixer-002@90+60,dropout:conveyor-003@120+20"
    duration_s: float | None = None

    @property
    def site(self) -> str:
        return SITES[0]

    @property
    def line(self) -> str:
        return LINES[0]


@dataclass(frozen=True)
class DemoLine:
    """One production line of the demo: its broker port, gateway config and simulated fleet."""

    index: int
    site: str
    line: str
    mqtt_port: int
    config: GatewayConfig
    fleet: FleetOptions


def demo_token(site: str, line: str) -> str:
    return f"demo-token-{site}-{line}"


def demo_config(opts: DemoOptions, mqtt_port: int, *, site: str | None = None, line: str | None = None,
                index: int = 0, aggregator_port: int | None = None, http_port: int | None = None) -> GatewayConfig:
    """The gateway config of one demo line: open auth, auto-registration, forwarding to the aggregator."""
    site, line = site or opts.site, line or opts.line
    data = opts.data_dir / "gateway" if index == 0 else opts.data_dir / "gateways" / f"{site}-{line}"
    overrides = {
        "gateway.site": site,
        "gateway.line": line,
        "gateway.id": f"gw-{site}-{line}",
        "gateway.data_dir": str(data),
        "mqtt.host": "127.0.0.1",
        "mqtt.port": mqtt_port,
        "http.host": "127.0.0.1",
        "http.port": http_port if http_port is not None else (opts.http_port + index if opts.http_port else 0),
        "auth.open": True,
        "ingest.auto_register": True,
        "oee.enabled": True,  # the simulated PLCs publish state and counters (FleetOptions.production)
        "oee.types": oee_rules(EQUIPMENT_TYPES),
        "oee.shifts": list(DEMO_SHIFTS),
    }
    if aggregator_port:
        overrides.update({"uplink.url": f"http://127.0.0.1:{aggregator_port}",
                          "uplink.token": demo_token(site, line),
                          "uplink.things_interval_s": 1.0})  # the central 3D view follows within a second
    return load_config(GatewayConfig, None, environ={}, overrides=overrides)


def plan_lines(opts: DemoOptions, faults: tuple[FaultItem, ...], aggregator_port: int) -> list[DemoLine]:
    """Every line of the demo; the fault spec applies to the first line."""
    if not 1 <= opts.sites <= len(SITES) or not 1 <= opts.lines <= len(LINES):
        raise SimError(f"sites: 1-{len(SITES)} and lines: 1-{len(LINES)}")
    out = []
    taken = {aggregator_port}
    for i, (site, line) in enumerate((s, li) for s in SITES[: opts.sites] for li in LINES[: opts.lines]):
        http_port = _pick(opts.http_port + i if opts.http_port else 0, taken, keep=i == 0)
        mqtt_port = _pick(opts.mqtt_port if i == 0 else 0, taken, keep=True)
        config = demo_config(opts, mqtt_port, site=site, line=line, index=i, aggregator_port=aggregator_port,
                             http_port=http_port)
        k = i % opts.lines
        fleet = FleetOptions(site=site, line=line, nodes=opts.nodes, rate_hz=opts.rate_hz, host="127.0.0.1",
                             port=mqtt_port, faults=faults if i == 0 else (), start_index=k * NODES_PER_LINE_STRIDE + 1,
                             truth_path=opts.data_dir / "faults.jsonl" if i == 0 else None,
                             duration_s=opts.duration_s, seed=i, production=True)
        out.append(DemoLine(i, site, line, mqtt_port, config, fleet))
    return out


def _pick(preferred: int, taken: set[int], *, keep: bool) -> int:
    """A port for one demo service: `preferred` when given (and, unless `keep`, still free), else a free
    one; never one another service of this demo already has."""
    port = preferred
    while not port or port in taken or (not keep and not _free(port)):
        port = find_free_port()
    taken.add(port)
    return port


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def aggregator_config(opts: DemoOptions, lines: list[DemoLine], port: int) -> Any:
    from cloud_sync.config import load_aggregator_config

    return load_aggregator_config(None, environ={}, overrides={
        "aggregator.data_dir": str(opts.data_dir / "aggregator"), "http.host": "127.0.0.1", "http.port": port,
        "auth.open": True,
        "auth.gateway_tokens": [{"gateway": f"gw-{li.site}-{li.line}", "token": demo_token(li.site, li.line),
                                 "site": li.site, "line": li.line} for li in lines],
    })


async def run_demo(opts: DemoOptions, *, ready: asyncio.Event | None = None,
                   stop: asyncio.Event | None = None, announce: bool = True) -> None:
    """Run the aggregator, and per line a broker, a gateway and a fleet, until `stop` or SIGINT/SIGTERM."""
    from cloud_sync.aggregator import Aggregator
    from gateway.sim.faults import parse_faults

    # Every option is checked before anything starts: a bad one must not leave a broker running.
    faults = tuple(parse_faults(opts.faults)) if opts.faults else ()
    agg_port = opts.aggregator_port or find_free_port()
    lines = plan_lines(opts, faults, agg_port)
    aggregator = Aggregator(aggregator_config(opts, lines, agg_port))
    services = [GatewayService(li.config) for li in lines]
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as cleanup:  # undone in reverse, each step even if one fails
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
            cleanup.callback(loop.remove_signal_handler, sig)
        await aggregator.start()
        cleanup.push_async_callback(aggregator.stop)
        for li, service in zip(lines, services, strict=True):
            broker = await start_broker(BrokerSettings(host="127.0.0.1", port=li.mqtt_port,
                                                       data_dir=opts.data_dir / "brokers" / f"{li.site}-{li.line}"
                                                       if li.index else opts.data_dir / "broker",
                                                       allow_anonymous=True))
            cleanup.push_async_callback(broker.stop)
            cleanup.push_async_callback(service.stop)
            await service.start()
            await asyncio.wait_for(service.ingest.connected.wait(), 15)
        if announce:
            _announce(opts, lines, services, aggregator.http_port or agg_port)
        async with asyncio.TaskGroup() as tg:
            fleets = [tg.create_task(run_fleet(li.fleet, stop=stop)) for li in lines]
            for task in fleets:
                task.add_done_callback(lambda _: stop.set())  # after --duration the whole demo ends
            if ready is not None:
                ready.set()
            await stop.wait()
            for task in fleets:
                await task


def _announce(opts: DemoOptions, lines: list[DemoLine], services: list[GatewayService], agg_port: int) -> None:
    from rich.console import Console

    c = Console(stderr=True)
    c.print(f"[bold green]OpenEgiz Edge demo[/] — {opts.sites} sites x {opts.lines} lines, "
            f"{opts.nodes} simulated nodes per line at {opts.rate_hz:g} Hz")
    c.print(f"  Aggregator (all sites)  http://127.0.0.1:{agg_port}/api/v1/sites")
    for li, service in zip(lines, services, strict=True):
        base = f"http://127.0.0.1:{service.http_port}"
        c.print(f"  {li.site} / {li.line}: gateway {base}/api/v1/things  (broker mqtt://127.0.0.1:{li.mqtt_port})")
    first = f"http://127.0.0.1:{services[0].http_port}"
    c.print(f"  WebSocket       {first.replace('http', 'ws')}/api/v1/ws")
    c.print(f"  OpenAPI         {first}/api/v1/openapi.json")
    c.print(f"  Health / ready  {first}/health  {first}/ready    Metrics {first}/metrics")
    c.print(f"  Fault ground truth → {opts.data_dir / 'faults.jsonl'}")
    c.print("[yellow]auth is open: anyone on this machine can read and write. Ctrl-C stops the demo.[/]")
