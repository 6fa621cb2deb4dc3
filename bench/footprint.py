"""Gateway footprint benchmark: CPU per message, publish → WebSocket latency under load, peak memory.

Prints one JSON line per figure (see DESIGN.md for the targets). Everything runs as on a line: a
private Mosquitto with the shipped settings (docs/broker.md), the gateway as its own process
(`egiz gateway run`), paho publishers in separate processes at fixed rates (single-sample QoS 1
messages), and one WebSocket client subscribed to everything. CPU is the gateway process's own CPU
time (user + system, from /proc/<pid>/stat) over the measured window, divided by the messages it
applied in that window; memory is its peak RSS (VmHWM from /proc/<pid>/status).

Figures, each for every gateway given with `--gateway`, run alternately under the same load:
  cpu_s_per_1k_msgs        at 1k and 2k msg/s, 200 devices        target <= 0.10
  idle_cpu_share           200 Things known, no messages: cores used (what every second costs regardless of the rate)
  ws_p99_5k                publish → WebSocket p99 at 5k msg/s     target <= 50 ms, flat per 10 s window
  peak_rss_200_things      at 1k msg/s                             target <= 120 MiB
  peak_rss_10k_things      10k Things with 3 features each          target <= 200 MiB
Each line also carries `lost` (acknowledged to the publisher, not applied by the gateway within two
minutes of the end), `duplicates_dropped` (redeliveries the gateway recognised and dropped),
`ws_missed` / `ws_doubled` (StateChanged events the WebSocket client missed / saw twice).

    python bench/footprint.py [--seconds 30] [--gateway main=/path/to/egiz --gateway new=egiz] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing as mp
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import aiomqtt
from harness import ACCEPTED, metric, metric_sum

from gateway.broker import BrokerProcess, BrokerSettings, find_free_port

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.helpers import EGIZ, gateway_toml, wait_ready

KEY = "bench-admin-key-0123456789abcdef"
SITE = "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
WARMUP_S = 3.0  # registration of new Things and the first commits are not the steady state


def emit(figure: str, value: float, unit: str, target: str, **extra: Any) -> None:
    print(json.dumps({"figure": figure, "value": round(value, 4), "unit": unit, "target": target, **extra}),
          flush=True)


# --------------------------------------------------------------------- the gateway process
def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (not its children), from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14 and 15)


def memory_kib(pid: int, key: str) -> int:
    """A line of /proc/<pid>/status in KiB (VmRSS: now, VmHWM: peak)."""
    m = re.search(rf"^{key}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(m.group(1)) if m else 0


@dataclass
class Gateway:
    label: str
    url: str
    pid: int
    ready_rss_mib: float = 0.0


@asynccontextmanager
async def gateway(egiz: str, label: str, tmp: Path, broker_port: int, name: str,
                  **more: dict[str, Any]) -> AsyncIterator[Gateway]:
    """`egiz gateway run` on a free port until the block ends; `more` adds to (or replaces keys of) its sections."""
    http_port = find_free_port()
    data = tmp / f"data-{label}-{name}"
    sections: dict[str, dict[str, Any]] = {
        "gateway": {"id": f"gw-{label}-{name}", "data_dir": data}, "mqtt": {"port": broker_port},
        "http": {"port": http_port}, "ingest": {"auto_register": True}, "log": {"level": "warning"}}
    for section, table in more.items():
        sections[section] = {**sections.get(section, {}), **table}
    cfg = gateway_toml(tmp / f"gateway-{label}-{name}.toml", SITE, key=KEY, **sections)
    log = (tmp / f"gateway-{label}-{name}.log").open("ab")
    proc = await asyncio.create_subprocess_exec(egiz, "gateway", "run", "--config", str(cfg), stdout=log, stderr=log)
    url = f"http://127.0.0.1:{http_port}"
    try:
        await wait_ready(url, proc=proc, timeout=120, interval=0.02)
        yield Gateway(label, url, proc.pid, memory_kib(proc.pid, "VmRSS") / 1024)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
        log.close()
        await forget_session(broker_port, sections["mqtt"].get("client_id") or f"egiz-{sections['gateway']['id']}")


async def forget_session(port: int, client_id: str) -> None:
    """End a gateway's persistent session on the shared broker once its run is over. Left in place, the
    broker queues every later message of the same topics for it: by the fourth run at 2k msg/s the broker
    stored each message for three gateways that had gone, spent about twice the CPU per run and saved a
    database of 17 MB every `autosave_interval`, work that the gateway being measured shared the cores
    (and the broker's one thread) with. Each run now starts from the same broker state."""
    async with aiomqtt.Client("127.0.0.1", port, identifier=client_id, clean_session=True):
        pass


async def accepted(http: aiohttp.ClientSession, url: str) -> float:
    return await metric(http, url, ACCEPTED)


async def gc_collections(http: aiohttp.ClientSession, url: str) -> float:
    """Runs of Python's cycle collector so far, all generations."""
    return await metric_sum(http, url, "python_gc_collections_total")


async def duplicates(http: aiohttp.ClientSession, url: str) -> float:
    return await metric(http, url, "egiz_ingest_duplicate_samples_total")


# --------------------------------------------------------------------- publishers (own processes)
@dataclass(frozen=True)
class Load:
    """Messages at a fixed rate, round robin over devices (and over features for each device)."""

    rate: float
    seconds: float
    devices: int
    features: tuple[str, ...] = ("main",)
    kind: str = "proofer"
    processes: int = 2
    timed: bool = False  # stop after `seconds` even when behind (a soak); else publish every message

    @property
    def messages(self) -> int:
        return int(self.rate * self.seconds)

    def messages_to(self, device: int, sent: int | None = None) -> int:
        """How many of the first `sent` messages (default: all) go to `device` (round robin from device 0)."""
        n = self.messages if sent is None else sent
        return n // self.devices + (1 if device < n % self.devices else 0)

    def process_of(self, device: int) -> int:
        return device % self.processes

    def thing_id(self, device: int) -> str:
        return f"{SITE}:{self.kind}-{device:05d}"


def _publisher(port: int, load: Load, part: int, boot: str, start_at: float, out: Any) -> None:
    """One publisher process: its share of the devices, paced to its share of the rate, QoS 1."""
    import paho.mqtt.client as paho

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{boot}-{part}",
                         protocol=paho.MQTTv311)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    # Each device belongs to one process, so its sequence numbers rise one by one as a node's do.
    mine = [d for d in range(load.devices) if d % load.processes == part]
    share = (i for i in range(load.messages) if (i % load.devices) % load.processes == part)
    seqs: dict[tuple[int, int], int] = {}
    pending: collections.deque[Any] = collections.deque()
    published = 0
    rate = load.rate * sum(load.messages_to(d) for d in mine) / load.messages
    while time.time() < start_at:
        time.sleep(0.001)
    t0 = time.perf_counter()
    stop_at = t0 + load.seconds if load.timed else float("inf")
    reached = load.messages  # the index of the first message not published
    for k, i in enumerate(share):
        if time.perf_counter() >= stop_at:
            reached = i
            break
        due = t0 + k / rate
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        dev = i % load.devices
        feat = (i // load.devices) % len(load.features)
        seq = seqs[(dev, feat)] = seqs.get((dev, feat), 0) + 1
        topic = f"openegiz/{SITE}/{load.kind}/{load.kind}-{dev:05d}/{load.features[feat]}/telemetry"
        now = time.time()
        body = {"ts": now, "seq": seq, "boot": f"{boot}-{feat}",
                "properties": {"temperature": 20.5 + seq % 7, "humidity": 41.0, "t_pub": now}}
        while len(pending) >= MAX_UNACKED:  # message ids are 16 bits: never more in flight than that
            published += _settle(pending.popleft())
        pending.append(client.publish(topic, json.dumps(body, separators=(",", ":")), qos=1))
    while pending:
        published += _settle(pending.popleft())
    client.loop_stop()
    client.disconnect()
    out.put((part, published, time.perf_counter() - t0, reached))


MAX_UNACKED = 30_000


def _settle(info: Any) -> int:
    info.wait_for_publish(60)
    return 1 if info.is_published() else 0


class Publishers:
    def __init__(self, port: int, load: Load, boot: str) -> None:
        ctx = mp.get_context("spawn")
        self.queue: Any = ctx.Queue()
        self.start_at = time.time() + 1.5  # every process connected before the first message
        self.procs = [ctx.Process(target=_publisher, args=(port, load, p, boot, self.start_at, self.queue))
                      for p in range(load.processes)]
        for p in self.procs:
            p.start()
        self.reached: dict[int, int] = {}  # per process: the index of the first message it did not publish

    async def wait(self) -> tuple[int, float]:
        """(messages acknowledged by the broker, longest publishing time)."""
        results = []
        for _ in self.procs:
            results.append(await asyncio.to_thread(self.queue.get, True, 600))
        for p in self.procs:
            await asyncio.to_thread(p.join)
        self.reached = {r[0]: r[3] for r in results}
        return sum(r[1] for r in results), max(r[2] for r in results)

    def stop(self) -> None:
        """End the publishers that still run (the run was interrupted)."""
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(10)


# --------------------------------------------------------------------- the WebSocket client
def published(ev: dict[str, Any]) -> tuple[str, float] | None:
    """("thing/feature", publish time) of a StateChanged event the publishers stamped, else None."""
    if ev.get("event") != "StateChanged":
        return None
    t_pub = ev.get("properties", {}).get("t_pub")
    return None if t_pub is None else (ev["thingId"] + "/" + ev["feature"], t_pub)


@dataclass
class Watcher:
    """Subscribed to everything: publish → receive delays, and each message's (thing, t_pub) once."""

    delays: list[tuple[float, float]] = field(default_factory=list)  # (receive time, delay)
    seen: set[tuple[str, float]] = field(default_factory=set)
    doubled: int = 0

    def on_event(self, ev: dict[str, Any]) -> None:
        key = published(ev)
        if key is None:
            return
        now = time.time()
        t_pub = key[1]
        if key in self.seen:
            self.doubled += 1
        self.seen.add(key)
        self.delays.append((now, now - t_pub))


class EventSink(Protocol):
    def on_event(self, ev: dict[str, Any]) -> None: ...


@asynccontextmanager
async def websocket(url: str, watcher: EventSink, subscribe: dict[str, Any] | None = None) -> AsyncIterator[None]:
    """A WebSocket client handing every event to `watcher`; subscribed to everything unless `subscribe` says
    otherwise (the fields of a subscribe message)."""
    async with aiohttp.ClientSession() as http, http.ws_connect(
            url + "/api/v1/ws", headers={"Authorization": f"Bearer {KEY}"}, max_msg_size=0) as ws:
        await ws.send_json({"action": "subscribe", **(subscribe or {})})
        await ws.receive_json()

        async def read() -> None:
            async for msg in ws:
                watcher.on_event(json.loads(msg.data))

        reader = asyncio.create_task(read())
        try:
            yield
        finally:
            reader.cancel()


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


# --------------------------------------------------------------------- one run under load
@dataclass
class Run:
    sent: int
    applied: float
    duplicates_dropped: float
    ws_received: int
    ws_doubled: int
    cpu_s: float
    cpu_msgs: float
    peak_rss_mib: float
    delays: list[tuple[float, float]]
    started: float
    ws_closed_slow: int
    window_s: float
    gc_collections: float  # the cycle collector's runs in the CPU window, every generation

    @property
    def lost(self) -> int:
        return int(self.sent - self.applied)


async def run_load(gw: Gateway, port: int, load: Load, boot: str, *, ws: bool = True) -> Run:
    watcher = Watcher()
    async with aiohttp.ClientSession() as http:
        before = await accepted(http, gw.url)
        dup_before = await duplicates(http, gw.url)
        cm = websocket(gw.url, watcher) if ws else _nothing()
        async with cm:
            pubs = Publishers(port, load, boot)
            # The CPU window starts after the warm-up, so start-up and the registration of new Things
            # are not counted.
            await asyncio.sleep(max(0.0, pubs.start_at - time.time()) + min(WARMUP_S, load.seconds / 4))
            cpu0, n0, w0 = cpu_seconds(gw.pid), await accepted(http, gw.url), time.monotonic()
            gc0 = await gc_collections(http, gw.url)
            published_by = pubs.start_at + load.seconds
            spy = await profile(gw, boot, published_by - time.time())
            await asyncio.sleep(max(0.0, published_by - time.time()))
            sent, _ = await pubs.wait()
            if spy is not None:
                await spy.wait()
            deadline = time.monotonic() + 120
            while await accepted(http, gw.url) - before < sent and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            # ... until every message is applied: on a busy machine the gateway may lag behind the
            # publishers, and the messages it applies after they stop cost CPU as well.
            cpu1, n1, w1 = cpu_seconds(gw.pid), await accepted(http, gw.url), time.monotonic()
            gc1 = await gc_collections(http, gw.url)
            if ws:
                deadline = time.monotonic() + 10
                while len(watcher.seen) < sent and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
        applied = await accepted(http, gw.url) - before
        dup = await duplicates(http, gw.url) - dup_before
        slow = await metric(http, gw.url, "egiz_ws_slow_disconnects_total")
    return Run(sent, applied, dup, len(watcher.seen), watcher.doubled, cpu1 - cpu0, n1 - n0,
               memory_kib(gw.pid, "VmHWM") / 1024, watcher.delays, pubs.start_at, int(slow), w1 - w0, gc1 - gc0)


PROFILE_DIR: Path | None = None


async def profile(gw: Gateway, name: str, seconds: float) -> asyncio.subprocess.Process | None:
    """With --profile: py-spy samples the gateway over the measured window (raw stacks, for flame graphs
    and for the top frames in docs/performance.md)."""
    if PROFILE_DIR is None or seconds < 1:
        return None
    out = PROFILE_DIR / f"{gw.label}-{name}.txt"
    return await asyncio.create_subprocess_exec(
        "py-spy", "record", "--pid", str(gw.pid), "--duration", str(int(seconds)), "--rate", "200",
        "--format", "raw", "--output", str(out), "--nonblocking",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)


@asynccontextmanager
async def _nothing() -> AsyncIterator[None]:
    yield


def counts(run: Run) -> dict[str, Any]:
    return {"lost": run.lost, "duplicates_dropped": int(run.duplicates_dropped),
            "ws_missed": run.sent - run.ws_received, "ws_doubled": run.ws_doubled,
            "ws_closed_slow": run.ws_closed_slow, "sent": run.sent}


# --------------------------------------------------------------------- scenarios
async def cpu_figures(label: str, egiz: str, tmp: Path, port: int, rate: int, seconds: float) -> None:
    async with gateway(egiz, label, tmp, port, f"cpu{rate}") as gw:
        run = await run_load(gw, port, Load(rate, seconds, 200), f"c{rate}")
        emit("cpu_s_per_1k_msgs", run.cpu_s / max(run.cpu_msgs, 1) * 1000, "core-s", "<= 0.10", gateway=label,
             rate=rate, devices=200, cpu_share=round(run.cpu_s / run.window_s, 3),
             gc_per_1k_msgs=round(run.gc_collections / max(run.cpu_msgs, 1) * 1000, 1), **counts(run))
        emit("publish_to_ws_p99", pct([d for _, d in run.delays], 99) * 1000, "ms", "reference", gateway=label,
             rate=rate)
        if rate == 1000:
            emit("peak_rss_200_things", run.peak_rss_mib, "MiB", "<= 120", gateway=label, rate=rate,
                 rss_at_ready_mib=round(gw.ready_rss_mib, 1))


async def idle_figures(label: str, egiz: str, tmp: Path, port: int, seconds: float) -> None:
    """200 Things known (one message each), a WebSocket client subscribed to everything, then no messages:
    the CPU the gateway spends per second of wall time when there is nothing to do."""
    async with gateway(egiz, label, tmp, port, "idle") as gw:
        load = Load(400, 1.0, 200)  # two messages per device: every Thing registered and applied
        async with aiohttp.ClientSession() as http:
            before = await accepted(http, gw.url)
            async with websocket(gw.url, Watcher()):
                pubs = Publishers(port, load, "idle")
                sent, _ = await pubs.wait()
                deadline = time.monotonic() + 60
                while await accepted(http, gw.url) - before < sent and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                await asyncio.sleep(WARMUP_S)  # the last commit, twin flush and detector tick
                cpu0, w0 = cpu_seconds(gw.pid), time.monotonic()
                spy = await profile(gw, "idle", seconds)
                await asyncio.sleep(seconds)
                cpu1, w1 = cpu_seconds(gw.pid), time.monotonic()
                if spy is not None:
                    await spy.wait()
        emit("idle_cpu_share", (cpu1 - cpu0) / (w1 - w0), "core-s/s", "reference", gateway=label, things=200,
             seconds=round(w1 - w0, 1), sent=sent)


async def latency_figures(label: str, egiz: str, tmp: Path, port: int, seconds: float) -> None:
    async with gateway(egiz, label, tmp, port, "lat5k") as gw:
        run = await run_load(gw, port, Load(5000, seconds, 200, processes=3), "l5k")
        windows = []
        for w in range(int(seconds // 10) + 1):
            lo, hi = run.started + 10 * w, run.started + 10 * (w + 1)
            part = [d for t, d in run.delays if lo <= t < hi]
            if part:
                windows.append({"window_s": 10 * w, "p50_ms": round(pct(part, 50) * 1000, 1),
                                "p99_ms": round(pct(part, 99) * 1000, 1), "n": len(part)})
        delays = [d for _, d in run.delays]
        emit("ws_p99_5k", pct(delays, 99) * 1000, "ms", "<= 50, flat", gateway=label,
             p50_ms=round(pct(delays, 50) * 1000, 1), windows=windows,
             cpu_s_per_1k_msgs=round(run.cpu_s / max(run.cpu_msgs, 1) * 1000, 4), **counts(run))


async def rss_10k(label: str, egiz: str, tmp: Path, port: int, things: int) -> None:
    async with gateway(egiz, label, tmp, port, "rss10k") as gw:
        load = Load(3000, things * 3 / 3000, things, features=("thermal", "electrical", "business_context"),
                    kind="oven", processes=2)
        run = await run_load(gw, port, load, "r10k", ws=False)
        emit("peak_rss_10k_things", run.peak_rss_mib, "MiB", "<= 200", gateway=label, things=things,
             rss_now_mib=round(memory_kib(gw.pid, "VmRSS") / 1024, 1), rss_at_ready_mib=round(gw.ready_rss_mib, 1),
             lost=run.lost,
             duplicates_dropped=int(run.duplicates_dropped))


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30.0, help="length of each CPU run")
    ap.add_argument("--rate", type=int, action="append", metavar="MSG_PER_S",
                    help="rates of the CPU runs (repeatable; default 1000 and 2000)")
    ap.add_argument("--latency-seconds", type=float, default=60.0, help="length of the 5k msg/s run")
    ap.add_argument("--things", type=int, default=10_000, help="Things for the memory figure")
    ap.add_argument("--gateway", action="append", default=[], metavar="LABEL=EGIZ",
                    help="a gateway to measure (repeatable; run alternately); default: this checkout's egiz")
    ap.add_argument("--only", choices=("idle", "cpu", "latency", "rss"), action="append",
                    help="run only some figures (repeatable)")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="record each measured window with py-spy (raw stacks) into DIR")
    ap.add_argument("--quick", action="store_true", help="short runs to check the benchmark itself")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.latency_seconds, args.things = 10.0, 20.0, 1000
    global PROFILE_DIR
    PROFILE_DIR = args.profile
    if PROFILE_DIR is not None:
        PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    gateways = [tuple(g.split("=", 1)) for g in args.gateway] or [("this", EGIZ)]
    only = set(args.only or ("idle", "cpu", "latency", "rss"))
    with tempfile.TemporaryDirectory(prefix="egiz-footprint-") as d:
        tmp = Path(d)
        broker = BrokerProcess(BrokerSettings(port=find_free_port(), data_dir=tmp / "broker", allow_anonymous=True))
        await broker.start()
        try:
            if "idle" in only:
                for label, egiz in gateways:
                    await idle_figures(label, egiz, tmp, broker.port, args.seconds)
            if "cpu" in only:
                for rate in args.rate or (1000, 2000):
                    for label, egiz in gateways:
                        await cpu_figures(label, egiz, tmp, broker.port, rate, args.seconds)
            if "latency" in only:
                for label, egiz in gateways:
                    await latency_figures(label, egiz, tmp, broker.port, args.latency_seconds)
            if "rss" in only:
                for label, egiz in gateways:
                    await rss_10k(label, egiz, tmp, broker.port, args.things)
        finally:
            await broker.stop()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main())
