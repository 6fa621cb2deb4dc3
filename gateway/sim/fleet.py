"""Publish a simulated fleet over MQTT exactly as ESP32 nodes do (topics, payloads, seq/boot, Last Will).

Each connection keeps a bounded ring of readings that the broker has not yet confirmed (PUBACK);
after a broker restart it reconnects with capped, jittered backoff and re-sends them in order, so
nothing published is lost — the same behaviour the firmware's ring buffer gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import socket
import time
import typing
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt

from gateway import __version__
from gateway.sim.equipment import EQUIPMENT_TYPES, FAULT_TARGET, ActiveFault, Node
from gateway.sim.faults import KINDS, FaultSpec, RandomFaults, TruthWriter

log = logging.getLogger(__name__)
RING_SIZE = 10_000


@dataclass(frozen=True)
class FleetOptions:
    """What `egiz sim` simulates and where it publishes."""

    site: str
    line: str = "line-a"
    nodes: int = 10
    rate_hz: float = 1.0
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    faults: tuple[FaultSpec | RandomFaults, ...] = ()
    truth_path: Path | None = None
    duration_s: float | None = None
    batch: int = 1
    seed: int | None = None
    shared_connection: bool = False
    types: tuple[str, ...] = EQUIPMENT_TYPES
    start_index: int = 1
    time_scale: float = 1.0
    context_every_s: float = 300.0


@dataclass
class FleetStats:
    """Counts of a run; `confirmed` messages were acknowledged by the broker."""

    confirmed: int = 0
    points: int = 0
    dropped: int = 0
    reconnects: int = 0
    last_seq: dict[str, int] = field(default_factory=dict)


def fleet_things(options: FleetOptions) -> list[tuple[str, str]]:
    """(equipment_id, type) of every node, in order: types cycle, numbers count up."""
    out = []
    for i in range(options.start_index, options.start_index + options.nodes):
        t = options.types[(i - options.start_index) % len(options.types)]
        out.append((f"{t}-{i:03d}", t))
    return out


@dataclass
class _Pending:
    topic: str
    payload: str
    points: int
    retain: bool = False


class _Link:
    """One MQTT connection and its ring of unconfirmed messages."""

    def __init__(self, opts: FleetOptions, client_id: str, stats: FleetStats,
                 will: tuple[str, str] | None, on_command: Callable[[str, bytes], list[_Pending]] | None) -> None:
        self.opts = opts
        self.client_id = client_id
        self.stats = stats
        self.will = will
        self.on_command = on_command
        self.ring: deque[_Pending] = deque()
        self.wake = asyncio.Event()
        self.cmd_topics: list[str] = []
        self.online: list[Callable[[], _Pending]] = []
        self.client: aiomqtt.Client | None = None
        self.paused = False
        self.broken = False
        self.resume = asyncio.Event()

    def put(self, msg: _Pending) -> None:
        if len(self.ring) >= RING_SIZE:
            self.ring.popleft()
            self.stats.dropped += 1
        self.ring.append(msg)
        self.wake.set()

    def sever(self) -> None:
        """Drop the TCP connection without DISCONNECT, so the broker publishes the Last Will."""
        self.paused = True
        self.resume.clear()
        client = self.client
        sock = getattr(getattr(client, "_client", None), "_sock", None)
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def unpause(self) -> None:
        self.paused = False
        self.resume.set()

    async def run(self, stop: asyncio.Event) -> None:
        attempt = 0
        while not stop.is_set():
            if self.paused:
                await _wait_any(self.resume, stop)
                continue
            will = aiomqtt.Will(self.will[0], self.will[1], qos=1, retain=True) if self.will else None
            try:
                async with aiomqtt.Client(self.opts.host, self.opts.port, identifier=self.client_id,
                                          username=self.opts.username, password=self.opts.password,
                                          will=will, keepalive=15, max_inflight_messages=100) as client:
                    self.client = client
                    attempt = 0
                    for topic in self.cmd_topics:
                        await client.subscribe(topic, qos=1)
                    for make in self.online:  # a fresh "online" status with the time of this connect
                        msg = make()
                        await client.publish(msg.topic, msg.payload, qos=1, retain=True)
                        self.stats.confirmed += 1
                    self.broken = False
                    reader = asyncio.create_task(self._commands(client)) if self.cmd_topics else None
                    try:
                        await self._send(client, stop)
                    finally:
                        if reader is not None:
                            reader.cancel()
                            await asyncio.gather(reader, return_exceptions=True)
            except aiomqtt.MqttError as exc:
                self.client = None
                if stop.is_set():
                    break
                if not self.paused:
                    self.stats.reconnects += 1
                    delay = min(10.0, 0.2 * 2 ** min(attempt, 10))
                    attempt += 1
                    log.debug("sim connection lost; retrying", extra={"error": str(exc), "delay": delay})
                    await _sleep_or_stop(random.uniform(delay / 2, delay), stop)
            finally:
                self.client = None

    async def _send(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        while True:
            if self.broken:
                raise aiomqtt.MqttError("connection lost")
            if not self.ring:
                if stop.is_set():
                    return
                self.wake.clear()
                await _wait_any(self.wake, stop)
                continue
            # Up to 64 publishes in flight; each message leaves the ring only once confirmed, in order.
            window = [self.ring[i] for i in range(min(64, len(self.ring)))]
            results = await asyncio.gather(
                *(client.publish(m.topic, m.payload, qos=1, retain=m.retain) for m in window),
                return_exceptions=True)
            for m, res in zip(window, results, strict=True):
                if isinstance(res, BaseException):
                    raise res if isinstance(res, aiomqtt.MqttError) else aiomqtt.MqttError(str(res))
                if self.ring and self.ring[0] is m:
                    self.ring.popleft()
                self.stats.confirmed += 1
                self.stats.points += m.points

    async def _commands(self, client: aiomqtt.Client) -> None:
        """Answer `cmd` messages; when the connection drops, wake the sender so it reconnects."""
        try:
            async for message in client.messages:
                if self.on_command is not None:
                    payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
                    for reply in self.on_command(message.topic.value, payload):
                        self.put(reply)
        except aiomqtt.MqttError:
            self.broken = True
            self.wake.set()


async def _wait_any(event: asyncio.Event, stop: asyncio.Event) -> None:
    waits = [asyncio.create_task(event.wait()), asyncio.create_task(stop.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


async def _sleep_or_stop(seconds: float, stop: asyncio.Event) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def _points(props: dict[str, object]) -> int:
    return sum(len(v) if isinstance(v, list | dict) else 1 for v in props.values())


class _SimNode:
    """A node's publishing state: boot id, seq, batch buffers, and its link."""

    def __init__(self, opts: FleetOptions, model: Node, link: _Link) -> None:
        self.opts = opts
        self.model = model
        self.link = link
        self.boot = uuid.uuid4().hex[:12]
        self.seq = 0
        self.base = f"openegiz/{opts.site}/{model.type}/{model.equipment_id}"
        self.buffers: dict[str, list[dict[str, object]]] = {}
        self.down_until = -1.0

    def status(self, state: str) -> _Pending:
        return _Pending(f"{self.base}/status", json.dumps({"state": state, "fw": f"sim-{__version__}",
                                                           "ts": time.time()}), 0, retain=True)

    def emit(self, feature: str, props: dict[str, object], ts: float) -> None:
        self.seq += 1
        if self.opts.batch <= 1:
            payload = json.dumps({"ts": ts, "seq": self.seq, "boot": self.boot, "properties": props})
            self.link.put(_Pending(f"{self.base}/{feature}/telemetry", payload, _points(props)))
            return
        buf = self.buffers.setdefault(feature, [])
        buf.append({"ts": ts, "seq": self.seq, "properties": props})
        if len(buf) >= self.opts.batch:
            self.flush(feature)

    def flush(self, feature: str) -> None:
        buf = self.buffers.pop(feature, [])
        if buf:
            payload = json.dumps({"boot": self.boot, "samples": buf}, separators=(",", ":"))
            points = sum(_points(typing.cast(dict[str, object], s["properties"])) for s in buf)
            self.link.put(_Pending(f"{self.base}/{feature}/telemetry", payload, points))

    def on_command(self, topic: str, payload: bytes) -> list[_Pending]:
        """Apply `cmd` desired properties the model understands and acknowledge them."""
        try:
            doc = json.loads(payload)
            cmd_id = str(doc["cmdId"])
            desired = doc.get("desiredProperties") or {}
        except (ValueError, KeyError, TypeError):
            return []
        status, detail = "ok", None
        if "setpoint" in desired and isinstance(desired["setpoint"], int | float):
            self.model.setpoint = float(desired["setpoint"])
        elif desired:
            status, detail = "rejected", f"unsupported properties: {sorted(desired)}"
        ack = {"cmdId": cmd_id, "status": status, "ts": time.time()}
        if detail:
            ack["detail"] = detail
        return [_Pending(f"{self.base}/cmd/ack", json.dumps(ack), 0)]


async def run_fleet(options: FleetOptions, *, stop: asyncio.Event | None = None,
                    on_progress: Callable[[FleetStats], None] | None = None) -> FleetStats:
    """Run the fleet until `duration_s` has passed or `stop` is set; returns the counts."""
    stop = stop or asyncio.Event()
    rng = random.Random(options.seed)
    stats = FleetStats()
    truth = TruthWriter(options.truth_path)
    nodes: list[_SimNode] = []
    links: list[_Link] = []
    shared = _Link(options, f"sim-{options.site}-{uuid.uuid4().hex[:6]}", stats, None, None) \
        if options.shared_connection else None
    if shared:
        links.append(shared)
    for eid, etype in fleet_things(options):
        model = Node(eid, etype, random.Random(rng.random()))
        if shared is not None:
            node = _SimNode(options, model, shared)
        else:
            link = _Link(options, f"sim-{options.site}-{eid}", stats, None, None)
            node = _SimNode(options, model, link)
            link.will = (f"{node.base}/status", json.dumps({"state": "offline", "fw": f"sim-{__version__}"}))
            link.on_command = node.on_command
            link.cmd_topics = [f"{node.base}/cmd"]
            link.online = [functools.partial(node.status, "online")]
            links.append(link)
        nodes.append(node)
    by_id = {n.model.equipment_id: n for n in nodes}
    scheduled = [f for f in options.faults if isinstance(f, FaultSpec)]
    random_rate = sum(f.per_hour for f in options.faults if isinstance(f, RandomFaults))
    for f in scheduled:
        if f.equipment_id not in by_id:
            raise ValueError(f"fault {f.kind}:{f.equipment_id}: no such node in this fleet")
    open_faults: list[tuple[_SimNode, ActiveFault, float]] = []
    start_wall = time.time()
    t0 = time.monotonic()
    if shared is not None:
        for n in nodes:
            shared.put(n.status("online"))

    async def produce() -> None:
        period = 1.0 / options.rate_hz
        tick = 0
        while not stop.is_set():
            elapsed_real = time.monotonic() - t0
            if options.duration_s is not None and elapsed_real >= options.duration_s:
                break
            elapsed = elapsed_real * options.time_scale
            now = time.time()
            sim_ts = start_wall + elapsed
            for f in scheduled:  # start due faults
                if f.start_s <= elapsed and not any(af.start == f.start_s and n.model.equipment_id == f.equipment_id
                                                    and af.kind == f.kind for n, af, _ in open_faults) \
                        and (f, "started") not in started:
                    started.add((f, "started"))
                    n = by_id[f.equipment_id]
                    _start_fault(n, f.kind, f.start_s, f.end_s, open_faults, now)
            if random_rate and rng.random() < random_rate / 3600 * period * options.time_scale:
                n = rng.choice(nodes)
                kind = rng.choice([k for k in KINDS if k != "phase_imbalance" or n.model.type == "oven"])
                _start_fault(n, kind, elapsed, elapsed + rng.uniform(30, 300), open_faults, now)
            for entry in list(open_faults):  # end faults that are over
                n, af, wall_start = entry
                if elapsed >= af.end:
                    open_faults.remove(entry)
                    _end_fault(n, af, wall_start, now, truth, options.site)
            for n in nodes:
                if n.down_until > elapsed:
                    continue
                if n.down_until > 0:  # back from a dropout: a new boot, a new session
                    n.down_until = -1.0
                    n.boot, n.seq = uuid.uuid4().hex[:12], 0
                    n.link.unpause()
                readings = n.model.read(sim_ts, elapsed)
                for feature, props in readings.items():
                    n.emit(feature, props, now)
                ctx = n.model.business_context(elapsed, options.context_every_s)
                if ctx is not None:
                    n.emit("business_context", ctx, now)
                stats.last_seq[n.model.equipment_id] = n.seq
            if on_progress is not None:
                on_progress(stats)
            tick += 1
            await _sleep_or_stop(max(0.0, t0 + tick * period / 1 - time.monotonic()), stop)
        for n in nodes:
            for feature in list(n.buffers):
                n.flush(feature)

    def _start_fault(n: _SimNode, kind: str, start: float, end: float,
                     sink: list[tuple[_SimNode, ActiveFault, float]], now: float) -> None:
        af = ActiveFault(kind, start, end)
        n.model.faults.append(af)
        sink.append((n, af, now))
        if kind == "dropout":
            n.down_until = end
            if n.link is not shared:
                n.link.sever()
        log.info("fault started", extra={"thing": f"{options.site}:{n.model.equipment_id}", "fault": kind})

    started: set[tuple[FaultSpec, str]] = set()
    produce_done = asyncio.Event()
    try:
        async with asyncio.TaskGroup() as tg:
            link_stop = asyncio.Event()
            for link in links:
                tg.create_task(link.run(link_stop))

            async def producer() -> None:
                try:
                    await produce()
                finally:
                    produce_done.set()
                    for n in nodes:  # a clean stop says offline, retained, like a node powering down
                        if n.link is shared or not n.link.paused:
                            n.link.put(n.status("offline"))
                    deadline = time.monotonic() + 10
                    while any(link.ring for link in links) and time.monotonic() < deadline:
                        await asyncio.sleep(0.05)
                    link_stop.set()
                    for link in links:
                        link.wake.set()
                        link.unpause()

            tg.create_task(producer())
    finally:
        now = time.time()
        for n, af, wall_start in open_faults:
            _end_fault(n, af, wall_start, now, truth, options.site)
        truth.close()
    return stats


def _end_fault(n: _SimNode, af: ActiveFault, wall_start: float, now: float, truth: TruthWriter, site: str) -> None:
    feature, prop = FAULT_TARGET[n.model.type]
    if af.kind == "phase_imbalance":
        feature, prop = "electrical", "voltage.c"
    elif af.kind == "dropout":
        feature, prop = "connectivity", "state"
    truth.write(f"{site}:{n.model.equipment_id}", af.kind, wall_start, now, feature, prop)
    with contextlib.suppress(ValueError):
        n.model.faults.remove(af)
