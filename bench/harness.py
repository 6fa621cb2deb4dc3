"""What the benchmarks that drive a real gateway share: their figures as JSON lines, a private Mosquitto,
the gateway as its own process (as deployed), its `/metrics`, and C publishers (`mosquitto_pub -l`) so the
publisher is not the bottleneck. Not a benchmark itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from gateway.broker import BrokerProcess, BrokerSettings, find_free_port

# The gateway is started and awaited as the tests start it (tests/helpers), from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.helpers import EGIZ, gateway_toml, wait_ready

KEY = "bench-admin-key-0123456789abcdef"
QUIET = logging.getLogger("bench.mqtt")  # aiomqtt warns about many pending publishes, which we want here
QUIET.setLevel(logging.ERROR)
SITE = "bench"
ACCEPTED = "egiz_ingest_accepted_messages_total"


def emit(figure: str, value: float, unit: str, target: str, **extra: Any) -> None:
    print(json.dumps({"figure": figure, "value": round(value, 3), "unit": unit, "target": target, **extra}),
          flush=True)


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a benchmark's `main` on a new event loop, its lines unbuffered."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main())


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def options(doc: str | None, quick: dict[str, int], *, builds: bool = False, **defaults: int) -> argparse.Namespace:
    """A benchmark's command line: its docstring as help, `--name N` for each of `defaults`, and `--quick`, a
    small run to check the benchmark itself, which takes the `quick` values instead. With `builds`,
    `--gateway LABEL=EGIZ` (repeatable) names the gateway builds to compare, as `args.gateway`, a list of
    (label, egiz); this checkout's `egiz`, labelled `this`, when none is given."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in defaults.items():
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=default, help=f"default {default}")
    ap.add_argument("--quick", action="store_true", help="small run to check the benchmark itself: "
                    + ", ".join(f"{k} {v}" for k, v in quick.items()))
    if builds:
        ap.add_argument("--gateway", action="append", default=[], metavar="LABEL=EGIZ",
                        help="a gateway build to measure (repeatable; measured alternately); default: this checkout's")
    args = ap.parse_args()
    if args.quick:
        for name, value in quick.items():
            setattr(args, name, value)
    if builds:
        if any("=" not in g for g in args.gateway):
            ap.error("--gateway takes LABEL=EGIZ")
        args.gateway = [tuple(g.split("=", 1)) for g in args.gateway] or [("this", EGIZ)]
    return args


@asynccontextmanager
async def private_broker(tmp: Path) -> AsyncIterator[int]:
    """A Mosquitto of its own with the shipped settings, on a free port (yielded), stopped afterwards."""
    broker = BrokerProcess(BrokerSettings(port=find_free_port(), data_dir=tmp / "broker", allow_anonymous=True))
    await broker.start()
    try:
        yield broker.port
    finally:
        await broker.stop()


@dataclass(frozen=True)
class GatewayProcess:
    """A gateway running as its own process: its HTTP address, the process, and how long it took to be ready."""

    url: str
    process: psutil.Process
    ready_s: float


@asynccontextmanager
async def gateway(tmp: Path, broker_port: int, data: Path, *, egiz: str = EGIZ,
                  **sections: dict[str, Any]) -> AsyncIterator[GatewayProcess]:
    """`egiz gateway run` on `data`, registering Things as they publish; `sections` add to or replace the
    config's sections; `egiz` another build to run. Stopped with SIGTERM, as systemd stops it."""
    http_port = find_free_port()
    base: dict[str, dict[str, Any]] = {
        "gateway": {"id": "gw-bench", "data_dir": data}, "mqtt": {"port": broker_port}, "http": {"port": http_port},
        "ingest": {"auto_register": True}, "log": {"level": "warning"}}
    cfg = gateway_toml(tmp / f"{data.name}.toml", SITE, key=KEY, **{**base, **sections})
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(egiz, "gateway", "run", "--config", str(cfg))
    url = f"http://127.0.0.1:{http_port}"
    await wait_ready(url, proc=proc, timeout=600, interval=0.01)
    ready_s = time.perf_counter() - t0
    try:
        yield GatewayProcess(url, psutil.Process(proc.pid), ready_s)
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()


async def metric(http: aiohttp.ClientSession, url: str, name: str) -> float:
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def metric_sum(http: aiohttp.ClientSession, url: str, name: str, key: str | None = None) -> float:
    """A metric summed over its labels (every series of `name`), read with API key `key` when given."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with http.get(url + "/metrics", headers=headers) as r:
        text = await r.text()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith((name + " ", name + "{")))


async def wait_metric(http: aiohttp.ClientSession, url: str, name: str, target: float, timeout: float,
                      what: str, interval: float = 0.05) -> float:
    """Wait until the gateway's counter `name` reaches `target`, asking every `interval` seconds (each
    asking costs the gateway CPU time); returns when it did."""
    deadline = time.perf_counter() + timeout
    while True:
        got = await metric(http, url, name)
        if got >= target:
            return time.perf_counter()
        if time.perf_counter() > deadline:
            raise SystemExit(f"gateway {what} {got:.0f} of {target:.0f} in {timeout} s")
        await asyncio.sleep(interval)


async def wait_accepted(http: aiohttp.ClientSession, url: str, target: float, timeout: float,
                        interval: float = 0.05) -> float:
    """Wait until the gateway has applied `target` messages; returns when it did."""
    return await wait_metric(http, url, ACCEPTED, target, timeout, "applied messages:", interval)


async def publish_files(port: int, files: list[tuple[str, Path]]) -> float:
    """Run one `mosquitto_pub -l -q 1` per topic in parallel; returns when all have finished."""
    procs = []
    t0 = time.perf_counter()
    for topic, path in files:
        with path.open("rb") as stdin:
            procs.append(await asyncio.create_subprocess_exec(
                "mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-l", "-t", topic,
                "-i", f"pub-{abs(hash(topic)) % 10**8}", stdin=stdin))
    for p in procs:
        assert await p.wait() == 0, "mosquitto_pub failed"
    return time.perf_counter() - t0
