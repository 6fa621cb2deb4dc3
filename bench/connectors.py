"""PLC connector benchmark: prints one JSON line per figure (see DESIGN.md for the targets).

100 simulated Modbus PLCs (pymodbus's own server, each on its own TCP port, served by a separate
process so the server does not share the gateway's CPU) x 50 float32 tags, read by one gateway
service at 1 s and at 100 ms polls. Figures: tag values/s sustained; requests per cycle against the
number of tags (coalescing); p99 PLC answer → `StateChanged` latency (the server writes the time it
answers into a float64 register, the bench's bus subscriber takes it out of the event); gateway CPU
seconds per 10k tag reads. OPC UA: data-change notifications/s one subscription delivers into the
twin (asyncua's server in its own process rewriting every variable as fast as it can, each value the
time it was written, so the same subscriber also gives server write → `StateChanged` latency).

    python bench/connectors.py [--devices 100] [--tags 50] [--seconds 10] [--quick] [--opcua-items 200]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from harness import emit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gateway.broker import find_free_port
from gateway.config import GatewayConfig, load_config
from gateway.connectors.config import ModbusTag
from gateway.connectors.modbus import plan_blocks
from gateway.service import GatewayService

SITE = "bench"
STAMP_ADDRESS = 200  # float64: when the server answered


# ------------------------------------------------------------------------------------ OPC UA
@contextlib.asynccontextmanager
async def serving(args: list[str], what: str, start_timeout_s: float) -> AsyncIterator[None]:
    """This script again in a process of its own with `args`, serving `what` until the block ends (its stdin
    closes): the servers never share the measured gateway's CPU."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), start_timeout_s)
        if line.strip() != b"ready":
            raise SystemExit(f"{what} did not start: {line!r}")
        yield
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        await asyncio.wait_for(proc.wait(), 30)


async def serve_opcua(port: int, items: int) -> None:
    """asyncua's server with `items` Double variables, each rewritten with the time of writing as fast
    as the server takes it, until stdin closes."""
    import logging

    from asyncua import Server, ua

    logging.disable(logging.WARNING)
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}")
    ns = await server.register_namespace("urn:openegiz:bench")
    nodes = [await server.nodes.objects.add_variable(f"ns={ns};s=V{i}", f"V{i}", 0.0) for i in range(items)]
    await server.start()
    print("ready", flush=True)
    closed = asyncio.ensure_future(asyncio.get_running_loop().run_in_executor(None, sys.stdin.read))
    while not closed.done():
        for node in nodes:
            await server.write_attribute_value(node.nodeid, ua.DataValue(ua.Variant(time.time(),
                                                                                       ua.VariantType.Double)))
        await asyncio.sleep(0.005)
    await server.stop()


async def opcua_subscription_updates(items: int, seconds: float, publishing_ms: float, data: Path) -> None:
    """Data-change notifications/s of one OPC UA subscription (`items` monitored items, sampling 0: every
    change) that reach the twin through the gateway, and the server write → StateChanged latency."""
    port = find_free_port()
    async with serving(["--serve-opcua", str(port), "--opcua-items", str(items)], "the OPC UA server", 120):
        tags = [{"feature": "bench", "property": f"v{i}", "node": f"ns=2;s=V{i}", "sampling_ms": 0, "queue_size": 10}
                for i in range(items)]
        cfg = load_config(GatewayConfig, None, environ={}, overrides={
            "gateway.site": SITE, "gateway.line": "line-a", "gateway.id": "gw-bench", "gateway.data_dir": str(data),
            "http.host": "127.0.0.1", "http.port": 0, "auth.open": True, "detect.enabled": False,
            "connectors.opcua": [{"name": "opcua-bench", "url": f"opc.tcp://127.0.0.1:{port}", "thing": "opcua-1",
                                  "type": "proofer", "poll_s": 1.0, "timeout_s": 5.0,
                                  "publishing_ms": publishing_ms, "tags": tags}]})
        service = GatewayService(cfg)
        await service.start()
        sub = service.bus.subscribe("bench-opcua", maxsize=1_000_000)
        sub.watch(everything=True)
        counted = 0
        latencies: list[float] = []

        async def consume() -> None:
            nonlocal counted
            while True:
                event = await sub.get()
                if getattr(event, "feature", None) != "bench":
                    continue
                now = time.time()
                for value in getattr(event, "properties", {}).values():
                    if isinstance(value, float):
                        counted += 1
                        latencies.append(now - value)

        consumer = asyncio.create_task(consume())
        try:
            await asyncio.sleep(3.0)  # connected, subscribed, the initial values in
            counted = 0
            latencies.clear()
            cpu0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.monotonic()
            await asyncio.sleep(seconds)
            elapsed, got = time.monotonic() - t0, counted
            cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        finally:
            consumer.cancel()
            await service.stop()
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    emit("opcua_subscription_updates_per_s", got / elapsed, "updates/s", "-", monitored_items=items,
         publishing_ms=publishing_ms, seconds=round(elapsed, 1),
         gateway_cpu_s_per_10k_updates=round(cpu / max(got, 1) * 10_000, 3))
    if latencies:
        latencies.sort()
        emit("opcua_write_to_statechanged_p99_ms", latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
             * 1000, "ms", "-", p50_ms=round(latencies[len(latencies) // 2] * 1000, 3),
             publishing_ms=publishing_ms, samples=len(latencies))


# ------------------------------------------------------------------------------------ the PLC side
async def serve(ports: list[int], tags: int) -> None:
    """Run one PLC per port until stdin closes; each answers with a moving value and its answer time."""
    import struct

    from gateway.sim.modbus_plc import ModbusPlcServer, RegisterMemory

    servers = []
    for port in ports:
        mem = RegisterMemory(size=256)
        for i in range(tags):
            words = struct.unpack(">HH", struct.pack(">f", 20.0 + i))
            mem.tables["holding"][2 * i : 2 * i + 2] = list(words)
        server = ModbusPlcServer({1: mem}, port=port)

        def stamp(memory: RegisterMemory = mem) -> None:
            words = struct.unpack(">HHHH", struct.pack(">d", time.time()))
            memory.tables["holding"][STAMP_ADDRESS : STAMP_ADDRESS + 4] = list(words)

        server.before_answer = stamp
        await server.start()
        servers.append(server)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for s in servers:
        await s.stop()


# ------------------------------------------------------------------------------------ the gateway side
def devices(ports: list[int], tags: int, poll_s: float) -> list[dict[str, Any]]:
    tag_list: list[dict[str, Any]] = [{"feature": "zones", "property": f"t{i}", "address": 2 * i,
                                       "datatype": "float32"} for i in range(tags)]
    tag_list.append({"feature": "clock", "property": "served_at", "address": STAMP_ADDRESS, "datatype": "float64"})
    return [{"name": f"plc-{i:03d}", "url": f"tcp://127.0.0.1:{port}", "thing": f"oven-{i:03d}", "type": "oven",
             "poll_s": poll_s, "timeout_s": 2.0, "tags": tag_list} for i, port in enumerate(ports)]


async def measure(ports: list[int], tags: int, poll_s: float, seconds: float, data: Path) -> None:
    cfg = load_config(GatewayConfig, None, environ={}, overrides={
        "gateway.site": SITE, "gateway.line": "line-a", "gateway.id": "gw-bench", "gateway.data_dir": str(data),
        "http.host": "127.0.0.1", "http.port": 0, "auth.open": True, "detect.enabled": False,
        "connectors.modbus": devices(ports, tags, poll_s)})
    service = GatewayService(cfg)
    await service.start()
    latencies: list[float] = []
    sub = service.bus.subscribe("bench", maxsize=1_000_000)
    sub.watch(everything=True)

    async def consume() -> None:
        while True:
            event = await sub.get()
            served = getattr(event, "properties", {}).get("served_at")
            if isinstance(served, float):
                latencies.append(time.time() - served)

    consumer = asyncio.create_task(consume())
    try:
        await asyncio.sleep(max(2.0, poll_s * 3))  # connected, staggered, steady
        runners = [service.connectors.runner(f"plc-{i:03d}") for i in range(len(ports))]
        c0 = sum(r.cycles for r in runners if r is not None)
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        latencies.clear()
        t0 = time.monotonic()
        await asyncio.sleep(seconds)
        elapsed = time.monotonic() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        cycles = sum(r.cycles for r in runners if r is not None) - c0
    finally:
        consumer.cancel()
        await service.stop()
    values = cycles * (tags + 1)
    rate = values / elapsed
    nominal = len(ports) * (tags + 1) / poll_s
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    label = f"{len(ports)} devices x {tags + 1} tags at {poll_s:g} s"
    emit("connector_tag_values_per_s", rate, "values/s", ">= 20000 (at 100 ms)", poll_s=poll_s,
         nominal=round(nominal), devices=len(ports), tags=tags + 1)
    if latencies:
        latencies.sort()
        p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000
        p50 = latencies[len(latencies) // 2] * 1000
        emit("connector_poll_to_statechanged_p99_ms", p99, "ms", "<= 50", p50_ms=round(p50, 3), poll_s=poll_s,
             samples=len(latencies), setup=label)
    emit("connector_cpu_s_per_10k_tag_reads", cpu / max(values, 1) * 10_000, "cpu-s", "as low as possible",
         poll_s=poll_s, setup=label)


def coalescing() -> None:
    for n in (10, 50, 125, 500, 2000):
        tags = [ModbusTag(feature="f", property=f"t{i}", address=2 * i, datatype="float32") for i in range(n)]
        blocks = plan_blocks(tags, max_gap=8, max_gap_bits=64, max_registers=125, max_bits=2000)
        emit("connector_requests_per_cycle", len(blocks), "requests", "<= 3 for 50 tags", tags=n,
             layout="contiguous float32")
        spread = [ModbusTag(feature="f", property=f"t{i}", address=5 * i, datatype="float32") for i in range(n)]
        blocks = plan_blocks(spread, max_gap=8, max_gap_bits=64, max_registers=125, max_bits=2000)
        emit("connector_requests_per_cycle", len(blocks), "requests", "<= 3 for 50 tags", tags=n,
             layout="float32 every 5 registers")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--tags", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--quick", action="store_true", help="20 devices, 4 s per run")
    ap.add_argument("--serve", default="", help=argparse.SUPPRESS)
    ap.add_argument("--opcua-items", type=int, default=200, help="monitored items of the OPC UA subscription")
    ap.add_argument("--opcua-publishing-ms", type=float, default=100.0)
    ap.add_argument("--serve-opcua", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_opcua:
        await serve_opcua(args.serve_opcua, args.opcua_items)
        return
    if args.serve:
        await serve([int(p) for p in args.serve.split(",")], args.tags)
        return
    if args.quick:
        args.devices, args.seconds = 20, 4.0
    coalescing()
    ports: list[int] = []
    while len(ports) < args.devices:  # distinct: a port just handed out may be handed out again
        port = find_free_port()
        if port not in ports:
            ports.append(port)
    async with serving(["--serve", ",".join(map(str, ports)), "--tags", str(args.tags)], "the PLC servers", 60):
        for poll_s in (1.0, 0.1):
            with tempfile.TemporaryDirectory() as tmp:
                await measure(ports, args.tags, poll_s, args.seconds, Path(tmp))
    with tempfile.TemporaryDirectory() as tmp:
        await opcua_subscription_updates(args.opcua_items, args.seconds, args.opcua_publishing_ms, Path(tmp))


if __name__ == "__main__":
    asyncio.run(main())
