"""`egiz demo`: a whole line on one machine — a broker, a gateway with open auth, a simulated fleet.

Uses Mosquitto when it is installed and an embedded broker otherwise, keeps its files in one data
directory (so a second run shows the restored twin), and stops everything cleanly on Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

from gateway.broker import BrokerSettings, find_free_port, start_broker
from gateway.config import GatewayConfig, load_config
from gateway.service import GatewayService
from gateway.sim import FleetOptions, run_fleet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoOptions:
    data_dir: Path = Path(".egiz-demo")
    http_port: int = 8080
    mqtt_port: int = 0  # 0: a free port, so a system broker on 1883 is left alone
    site: str = "izmir-bakery"
    line: str = "line-a"
    nodes: int = 10
    rate_hz: float = 1.0
    faults: str = "overtemperature:oven-001@60+120,stuck:mixer-002@90+60,dropout:conveyor-003@120+20"
    duration_s: float | None = None


def demo_config(opts: DemoOptions, mqtt_port: int) -> GatewayConfig:
    """The gateway config of the demo: open auth and auto-registration, everything else default."""
    return load_config(GatewayConfig, None, environ={}, overrides={
        "gateway.site": opts.site,
        "gateway.line": opts.line,
        "gateway.id": f"gw-{opts.site}-{opts.line}",
        "gateway.data_dir": str(opts.data_dir / "gateway"),
        "mqtt.host": "127.0.0.1",
        "mqtt.port": mqtt_port,
        "http.host": "127.0.0.1",
        "http.port": opts.http_port,
        "auth.open": True,
        "ingest.auto_register": True,
    })


async def run_demo(opts: DemoOptions, *, ready: asyncio.Event | None = None,
                   stop: asyncio.Event | None = None, announce: bool = True) -> None:
    """Run broker, gateway and fleet until `stop` is set or SIGINT/SIGTERM arrives."""
    from gateway.sim.faults import parse_faults

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    faults = parse_faults(opts.faults) if opts.faults else ()
    mqtt_port = opts.mqtt_port or find_free_port()
    broker = await start_broker(BrokerSettings(host="127.0.0.1", port=mqtt_port,
                                               data_dir=opts.data_dir / "broker", allow_anonymous=True))
    service = GatewayService(demo_config(opts, mqtt_port))
    try:
        await service.start()
        await asyncio.wait_for(service.ingest.connected.wait(), 15)
        base = f"http://127.0.0.1:{service.http_port}"
        if announce:
            _announce(base, mqtt_port, opts)
        fleet = FleetOptions(site=opts.site, line=opts.line, nodes=opts.nodes, rate_hz=opts.rate_hz,
                             host="127.0.0.1", port=mqtt_port, faults=tuple(faults),
                             truth_path=opts.data_dir / "faults.jsonl", duration_s=opts.duration_s)
        async with asyncio.TaskGroup() as tg:
            fleet_task = tg.create_task(run_fleet(fleet, stop=stop))
            if ready is not None:
                ready.set()
            await stop.wait()
            await fleet_task
    finally:
        await service.stop()
        await broker.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _announce(base: str, mqtt_port: int, opts: DemoOptions) -> None:
    from rich.console import Console

    c = Console(stderr=True)
    c.print(f"[bold green]OpenEgiz Edge demo[/] — site [bold]{opts.site}[/], line [bold]{opts.line}[/], "
            f"{opts.nodes} simulated nodes at {opts.rate_hz:g} Hz")
    c.print(f"  Things (REST)   {base}/api/v1/things")
    c.print(f"  WebSocket       {base.replace('http', 'ws')}/api/v1/ws")
    c.print(f"  OpenAPI         {base}/api/v1/openapi.json")
    c.print(f"  Health / ready  {base}/health  {base}/ready")
    c.print(f"  Metrics         {base}/metrics")
    c.print(f"  MQTT broker     mqtt://127.0.0.1:{mqtt_port} (anonymous, demo only)")
    c.print(f"  Fault ground truth → {opts.data_dir / 'faults.jsonl'}")
    c.print("[yellow]auth is open: anyone on this machine can read and write. Ctrl-C stops the demo.[/]")
