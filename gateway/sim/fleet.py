"""Publish a simulated fleet over MQTT the way ESP32 nodes do: topics, payloads, seq/boot, status and Last Will.

Every node keeps a bounded ring of the messages the broker has not yet confirmed (PUBACK), like the
firmware does. A connection sends from its rings in order with many publishes in flight; when the
broker goes away it reconnects with capped, jittered backoff and re-sends what was not confirmed, in
order, so a broker restart loses nothing. Only a full ring drops messages (the oldest first), and
every drop is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import re
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
from aiomqtt.exceptions import MqttConnectError

from gateway import __version__
from gateway.common.backoff import full_jitter
from gateway.sim.clock import RunClock
from gateway.sim.equipment import BUSINESS_CONTEXT, EQUIPMENT_TYPES, ActiveFault, Properties, make_model
from gateway.sim.faults import FaultItem, FaultSchedule, SimError, TruthRecord, TruthWriter, check_faults
from gateway.sim.production import ProductionModel, ProductionTruth

log = logging.getLogger(__name__)
PRODUCTION = "production"  # the feature of the PLC's production state and counters

FIRMWARE = f"sim-{__version__}"
PER_NODE_WINDOW = 16  # publishes in flight per connection: enough to hide the round trip
SHARED_WINDOW = 32  # larger windows cost more than they gain: paho and aiomqtt scan in-flight lists per message
BACKOFF_BASE_S = 0.25
BACKOFF_CAP_S = 10.0
PROGRESS_EVERY_S = 0.25
MAX_BATCH = 1000  # the gateway's default limit of samples per message
_AUTH_REFUSED = frozenset({4, 5, 134, 135})  # CONNACK: bad user name or password / not authorised (3.1.1, 5)
_TOPIC_LEVEL = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_encode = json.JSONEncoder(separators=(",", ":")).encode


@dataclass(frozen=True)
class FleetOptions:
    """What `egiz sim` simulates and where it publishes; invalid values raise SimError (a ValueError)."""

    site: str
    line: str = "line-a"
    nodes: int = 10
    rate_hz: float = 1.0  # every node publishes every feature once per 1/rate_hz seconds
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    faults: tuple[FaultItem, ...] = ()
    truth_path: Path | None = None
    duration_s: float | None = None  # None: until `stop` is set
    batch: int = 1  # samples per message per feature; > 1 publishes the batched payload shape
    seed: int | None = None
    shared_connection: bool = False  # one connection for all nodes (scale tests) instead of one each
    types: tuple[str, ...] = EQUIPMENT_TYPES
    start_index: int = 1
    time_scale: float = 1.0  # simulated seconds per real second, for the daily cycle and fault times
    context_every_s: float = 300.0  # simulated seconds between production batches (business_context)
    ring_size: int = 1000  # unconfirmed messages each node keeps; the oldest is dropped when full
    clock_start: float | None = None  # epoch of the simulated clock at start; None: now
    production: bool = False  # also publish the `production` feature: PLC state, unit counters, recipe
    drain_timeout_s: float = 10.0  # at stop, how long to keep trying to deliver what is unconfirmed
    # equipment id -> (user name, password) each node was given when provisioned; others use username/password
    credentials: Mapping[str, tuple[str, str]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        problems = []
        if not _TOPIC_LEVEL.fullmatch(self.site):
            problems.append("site: 1-64 characters of A-Z a-z 0-9 _ - . (it is a topic level)")
        if self.nodes < 1:
            problems.append("nodes: must be at least 1")
        if not (math.isfinite(self.rate_hz) and self.rate_hz > 0):
            problems.append("rate_hz: must be a number > 0")
        if not 1 <= self.port <= 65535:
            problems.append("port: must be 1-65535")
        if not 1 <= self.batch <= MAX_BATCH:
            problems.append(f"batch: must be 1-{MAX_BATCH}")
        if self.duration_s is not None and not (math.isfinite(self.duration_s) and self.duration_s > 0):
            problems.append("duration_s: must be a number > 0")
        unknown = [t for t in self.types if t not in EQUIPMENT_TYPES]
        if unknown or not self.types:
            problems.append(f"types: unknown {unknown}; known: {', '.join(EQUIPMENT_TYPES)}")
        if self.start_index < 0:
            problems.append("start_index: must be >= 0")
        for name in ("time_scale", "context_every_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                problems.append(f"{name}: must be a number > 0")
        if self.ring_size < 1:
            problems.append("ring_size: must be at least 1")
        if not (math.isfinite(self.drain_timeout_s) and self.drain_timeout_s >= 0):
            problems.append("drain_timeout_s: must be a number >= 0")
        if problems:
            raise SimError("invalid simulator options: " + "; ".join(problems), problems=problems)
        check_faults(self.faults, fleet_things(self))


@dataclass
class FleetStats:
    """Counts of a run. Every message produced ends up confirmed, dropped, lost in a dropout or unconfirmed."""

    published: int = 0  # messages produced (telemetry, statuses, command acks), each counted once
    confirmed: int = 0  # of those, acknowledged by the broker (PUBACK)
    points: int = 0  # flattened property values in confirmed telemetry
    resent: int = 0  # publishes repeated after a reconnect
    dropped: int = 0  # evicted from a full ring before the broker confirmed them
    lost_in_dropout: int = 0  # unconfirmed when a dropout fault "rebooted" the node
    unconfirmed: int = 0  # still waiting when the run ended (the broker was gone at stop)
    reconnects: int = 0  # connections lost to the broker or never made (dropout faults not counted)
    faults: int = 0  # fault instances finished and written to the ground truth
    late_ticks: int = 0  # sampling rounds skipped because the process could not keep up
    elapsed_s: float = 0.0
    last_seq: dict[str, int] = field(default_factory=dict)  # equipment id -> last seq of its current boot
    boots: dict[str, str] = field(default_factory=dict)  # equipment id -> current boot id
    production: dict[str, ProductionTruth] = field(default_factory=dict)  # equipment id -> what it really made


def fleet_things(options: FleetOptions) -> list[tuple[str, str]]:
    """(equipment_id, type) of every node in order; the type follows the index, so split fleets agree."""
    types = options.types
    return [(f"{types[(i - 1) % len(types)]}-{i:03d}", types[(i - 1) % len(types)])
            for i in range(options.start_index, options.start_index + options.nodes)]


# ------------------------------------------------------------------------------------------ rings
_QUEUED, _IN_FLIGHT, _CONFIRMED, _DROPPED, _LOST = range(5)


class _Outgoing:
    """One message on its way: kept until the broker confirms it."""

    __slots__ = ("attempts", "payload", "points", "retain", "ring", "state", "topic")

    def __init__(self, ring: _Ring, topic: str, payload: str, points: int, retain: bool) -> None:
        self.ring = ring
        self.topic = topic
        self.payload = payload
        self.points = points
        self.retain = retain
        self.state = _QUEUED
        self.attempts = 0


class _Ring:
    """A node's bounded FIFO of unconfirmed messages; `sent` marks how far the connection has read."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: deque[_Outgoing] = deque()
        self.sent = 0
        self.scheduled = False  # queued in its link's round-robin

    def put(self, entry: _Outgoing) -> _Outgoing | None:
        """Append; when full, evict and return the oldest (the firmware's drop-oldest policy)."""
        evicted = None
        if len(self.entries) >= self.capacity:
            evicted = self.entries.popleft()
            self.sent = max(0, self.sent - 1)
        self.entries.append(entry)
        return evicted

    def take(self) -> _Outgoing | None:
        while self.sent < len(self.entries):
            entry = self.entries[self.sent]
            self.sent += 1
            if entry.state == _QUEUED:
                entry.state = _IN_FLIGHT
                return entry
        return None

    def has_unsent(self) -> bool:
        return self.sent < len(self.entries)

    def pop_confirmed(self) -> None:
        while self.entries and self.entries[0].state == _CONFIRMED:
            self.entries.popleft()
            self.sent = max(0, self.sent - 1)

    def rewind(self) -> None:
        """After a lost connection everything unconfirmed is sent again, from the oldest."""
        for entry in self.entries:
            if entry.state == _IN_FLIGHT:
                entry.state = _QUEUED
        self.sent = 0

    def clear(self) -> list[_Outgoing]:
        gone = [e for e in self.entries if e.state in (_QUEUED, _IN_FLIGHT)]
        self.entries.clear()
        self.sent = 0
        return gone


# ------------------------------------------------------------------------------------------ links
class _Link:
    """One MQTT connection, sending from the rings of the nodes that use it."""

    def __init__(self, options: FleetOptions, stats: FleetStats, client_id: str, window: int, rng: random.Random,
                 *, will: aiomqtt.Will | None = None, subscriptions: tuple[str, ...] = (),
                 on_connect: Callable[[], list[tuple[str, str]]] | None = None,
                 on_message: Callable[[str, bytes], None] | None = None,
                 credentials: tuple[str, str] | None = None) -> None:
        self.options = options
        self.credentials = credentials
        self.stats = stats
        self.client_id = client_id
        self.window = window
        self.rng = rng
        self.will = will
        self.subscriptions = subscriptions
        self.on_connect = on_connect
        self.on_message = on_message
        self.rings: list[_Ring] = []
        self._ready: deque[_Ring] = deque()
        self._work = asyncio.Event()  # something to send, or the drain is complete
        self._changed = asyncio.Event()  # closing, severed or resumed
        self._client: aiomqtt.Client | None = None
        self._timeout: asyncio.Timeout | None = None
        self._attempt = 0
        self._down = False
        self._closing = False
        self._deadline = math.inf
        self._outage_logged = False

    # -- called by the producer (synchronously, on the event loop)
    def put(self, ring: _Ring, entry: _Outgoing) -> None:
        self.stats.published += 1
        evicted = ring.put(entry)
        if evicted is not None:
            evicted.state = _DROPPED
            self.stats.dropped += 1
        if not ring.scheduled:
            ring.scheduled = True
            self._ready.append(ring)
        self._work.set()

    def lose(self, ring: _Ring) -> None:
        """The node rebooted: what it had not delivered is gone."""
        for entry in ring.clear():
            entry.state = _LOST
            self.stats.lost_in_dropout += 1

    def sever(self) -> None:
        """Die without DISCONNECT, so the broker publishes the Last Will; stay down until `resume`."""
        self._down = True
        self._changed.set()
        if self._client is not None:
            _kill_connection(self._client)

    def resume(self) -> None:
        self._down = False
        self._changed.set()

    def close(self, deadline: float) -> None:
        """Deliver what is left, then disconnect cleanly; give up at `deadline` (event-loop time)."""
        self._closing = True
        self._deadline = deadline
        if self._timeout is not None:
            self._timeout.reschedule(deadline)
        self._changed.set()
        self._work.set()

    def drained(self) -> bool:
        return not any(ring.entries for ring in self.rings)

    # -- the connection's life
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._changed.clear()
            if self._closing and (self._down or self.drained() or loop.time() >= self._deadline):
                return
            if self._down:
                await self._changed.wait()
                continue
            try:
                await self._connect_and_send()
                return
            except MqttConnectError as exc:
                if _code(exc) in _AUTH_REFUSED:
                    raise SimError(f"the broker at {self.options.host}:{self.options.port} refused the "
                                   f"simulator: {exc}", host=self.options.host, port=self.options.port) from None
                failure: Exception = exc
            except (aiomqtt.MqttError, TimeoutError) as exc:
                failure = exc
            finally:
                self._client = None
                for ring in self.rings:
                    ring.rewind()
                    if ring.entries and not ring.scheduled:
                        ring.scheduled = True
                        self._ready.append(ring)
            if self._down:
                continue  # a dropout fault, not a broker problem
            if self._closing and loop.time() >= self._deadline:
                return
            self.stats.reconnects += 1
            delay = full_jitter(self._attempt, BACKOFF_BASE_S, BACKOFF_CAP_S, self.rng)  # a fleet not in step
            self._attempt += 1
            level = logging.DEBUG if self._outage_logged or self.window == PER_NODE_WINDOW else logging.WARNING
            self._outage_logged = True
            log.log(level, "simulator lost the broker; reconnecting",
                    extra={"client_id": self.client_id, "error": str(failure), "retry_in_s": round(delay, 2)})
            await _wait(self._changed, min(delay, max(0.0, self._deadline - loop.time())))

    async def _connect_and_send(self) -> None:
        o = self.options
        username, password = self.credentials or (o.username, o.password)
        client = aiomqtt.Client(o.host, o.port, username=username, password=password,
                                identifier=self.client_id, will=self.will, keepalive=15, timeout=10,
                                max_inflight_messages=self.window, max_queued_incoming_messages=1000)
        client.pending_calls_threshold = self.window + 16  # our window is deliberate, not a leak
        async with client:
            self._client = client
            self._attempt = 0
            if self._outage_logged:
                log.info("simulator connected to the broker again", extra={"client_id": self.client_id})
                self._outage_logged = False
            if self._down:  # a dropout began while we were connecting
                _kill_connection(client)
            await self._session(client)

    async def _session(self, client: aiomqtt.Client) -> None:
        """Send until closing and drained; any lost connection ends the session with MqttError."""
        try:
            async with asyncio.timeout(self._deadline if self._closing else None) as self._timeout:
                async with asyncio.TaskGroup() as tg:
                    # Watching first: a connection that dies during the setup must not wait out a timeout.
                    watcher = tg.create_task(self._watch(client))
                    await self._setup(client)
                    workers = [tg.create_task(self._worker(client)) for _ in range(self.window)]
                    await asyncio.wait(workers)
                    watcher.cancel()
        except* aiomqtt.MqttError as group:
            raise group.exceptions[0] from None
        finally:
            self._timeout = None

    async def _setup(self, client: aiomqtt.Client) -> None:
        """Subscribe to commands and announce the node, before anything from the ring."""
        for topic in self.subscriptions:
            await client.subscribe(topic, qos=1)
            _raise_if_cancelled()
        for topic, payload in self.on_connect() if self.on_connect else ():
            await client.publish(topic, payload, qos=1, retain=True)
            self.stats.published += 1
            self.stats.confirmed += 1
            _raise_if_cancelled()

    async def _watch(self, client: aiomqtt.Client) -> None:
        """Hand commands to their node; the message stream is also how a dead connection shows itself."""
        async for message in client.messages:
            if self.on_message is not None:
                raw = message.payload
                self.on_message(message.topic.value, raw if isinstance(raw, bytes) else str(raw).encode())
        raise aiomqtt.MqttError("the broker's message stream ended")

    async def _worker(self, client: aiomqtt.Client) -> None:
        """One publish in flight at a time; `window` workers share the connection."""
        while True:
            entry = self._take()
            if entry is None:
                if self._closing and self.drained():
                    return
                self._work.clear()
                await self._work.wait()
                continue
            if entry.attempts:
                self.stats.resent += 1
            entry.attempts += 1
            # paho writes the packet before this first await, so publishes go out in the order taken.
            await client.publish(entry.topic, entry.payload, qos=1, retain=entry.retain)
            self._confirmed(entry)
            _raise_if_cancelled()

    def _take(self) -> _Outgoing | None:
        while self._ready:
            ring = self._ready[0]
            entry = ring.take()
            if entry is None or not ring.has_unsent():
                self._ready.popleft()
                ring.scheduled = False
            else:
                self._ready.rotate(-1)  # round-robin between the nodes sharing this connection
            if entry is not None:
                return entry
        return None

    def _confirmed(self, entry: _Outgoing) -> None:
        if entry.state == _DROPPED:  # evicted while in flight, yet it arrived
            self.stats.dropped -= 1
        elif entry.state == _LOST:
            self.stats.lost_in_dropout -= 1
        entry.state = _CONFIRMED
        self.stats.confirmed += 1
        self.stats.points += entry.points
        entry.ring.pop_confirmed()
        if self._closing and self.drained():
            self._work.set()


def _raise_if_cancelled() -> None:
    """Restore a cancellation that Python 3.11's `asyncio.wait_for` (inside aiomqtt) swallowed.

    When the awaited PUBACK/SUBACK and the cancellation arrive in the same loop iteration, 3.11's
    wait_for returns the result and drops the CancelledError; the task would then go on waiting for
    work forever and its TaskGroup would never finish.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _code(exc: aiomqtt.MqttCodeError) -> int | None:
    rc = exc.rc
    return rc if isinstance(rc, int) or rc is None else int(rc.value)


def _kill_connection(client: aiomqtt.Client) -> None:
    """Drop the TCP connection without DISCONNECT, so the broker publishes the Last Will."""
    # aiomqtt offers no unclean disconnect; paho's socket() is public on the client it wraps.
    sock = client._client.socket()
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or less if `event` is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


# ------------------------------------------------------------------------------------------ nodes
def _points(props: Properties) -> int:
    return sum(len(v) if isinstance(v, list | dict) else 1 for v in props.values())


def _new_boot() -> str:
    # Always fresh, even with a seed: a repeated boot id would make the gateway drop the run as duplicates.
    return uuid.uuid4().hex[:12]


class _Node:
    """One simulated ESP32: its signal model, boot id and seq, batch buffers and ring."""

    def __init__(self, options: FleetOptions, stats: FleetStats, equipment_id: str, etype: str,
                 rng: random.Random) -> None:
        self.options = options
        self.stats = stats
        self.equipment_id = equipment_id
        self.type = etype
        self.model = make_model(etype, equipment_id, rng, options.line)
        self.base = f"openegiz/{options.site}/{etype}/{equipment_id}"
        self.ring = _Ring(options.ring_size)
        self.link: _Link | None = None
        self.boot = _new_boot()
        self.seq = 0
        self.down = False
        self._buffers: dict[str, list[tuple[float, Properties]]] = {}
        self.production = ProductionModel(etype, _seeded(options.seed, f"{equipment_id}:production")) \
            if options.production else None
        if self.production is not None:
            stats.production[equipment_id] = self.production.truth
        stats.boots[equipment_id] = self.boot
        stats.last_seq[equipment_id] = 0

    def attach(self, link: _Link) -> None:
        self.link = link
        link.rings.append(self.ring)

    def _put(self, topic: str, payload: str, points: int = 0, retain: bool = False) -> None:
        assert self.link is not None
        self.link.put(self.ring, _Outgoing(self.ring, topic, payload, points, retain))

    def status(self, state: str, *, with_ts: bool = True) -> tuple[str, str]:
        doc: dict[str, object] = {"state": state, "fw": FIRMWARE}
        if with_ts:
            doc["ts"] = round(time.time(), 3)
        return f"{self.base}/status", _encode(doc)

    def put_status(self, state: str) -> None:
        topic, payload = self.status(state)
        self._put(topic, payload, retain=True)

    def sample(self, ts: float, hour: float, elapsed_s: float, dt_s: float) -> None:
        """Read every feature now and publish (or buffer) it."""
        readings = self.model.read(hour, elapsed_s, dt_s)
        if self.production is not None:
            readings[PRODUCTION] = dict(self.production.step(elapsed_s, dt_s))
        for feature, props in readings.items():
            if self.options.batch <= 1:
                self._single(feature, props, ts)
                continue
            buf = self._buffers.setdefault(feature, [])
            buf.append((ts, props))
            if len(buf) >= self.options.batch:
                self._flush(feature)
        context = self.model.business_context(elapsed_s, self.options.context_every_s)
        if context is not None:  # rare and wanted at once, so never batched
            self._single(BUSINESS_CONTEXT, context, ts)

    def _single(self, feature: str, props: Properties, ts: float) -> None:
        self.seq += 1
        self.stats.last_seq[self.equipment_id] = self.seq
        payload = _encode({"ts": round(ts, 3), "seq": self.seq, "boot": self.boot, "properties": props})
        self._put(f"{self.base}/{feature}/telemetry", payload, _points(props))

    def _flush(self, feature: str) -> None:
        # seq is given at flush time, so a node's seq rises in the order its messages leave.
        buf = self._buffers.pop(feature, [])
        if not buf:
            return
        samples = []
        for ts, props in buf:
            self.seq += 1
            samples.append({"ts": round(ts, 3), "seq": self.seq, "properties": props})
        self.stats.last_seq[self.equipment_id] = self.seq
        self._put(f"{self.base}/{feature}/telemetry", _encode({"boot": self.boot, "samples": samples}),
                  sum(_points(p) for _, p in buf))

    def flush_all(self) -> None:
        for feature in list(self._buffers):
            self._flush(feature)

    def go_down(self, shared: bool) -> None:
        """A dropout: the node dies, its unsent data with it; the broker announces it offline."""
        assert self.link is not None
        self.down = True
        self._buffers.clear()
        self.link.lose(self.ring)
        if shared:  # the shared connection stays up, so say what the broker's Last Will would have said
            self.put_status("offline")
        else:
            self.link.sever()

    def silence(self, silent: bool) -> None:
        """A dropout begins (`silent`) or the node's last one ends."""
        if silent and not self.down:
            self.go_down(self.options.shared_connection)
        elif not silent and self.down:
            self.come_back(self.options.shared_connection)

    def come_back(self, shared: bool) -> None:
        """Back from a dropout: a new boot, seq from the start, online again."""
        assert self.link is not None
        self.down = False
        self.boot = _new_boot()
        self.seq = 0
        self.stats.boots[self.equipment_id] = self.boot
        self.stats.last_seq[self.equipment_id] = 0
        if shared:
            self.put_status("online")
        else:
            self.link.resume()

    def on_connect(self) -> list[tuple[str, str]]:
        """What its own connection publishes (retained) right after connecting."""
        return [self.status("online")]

    def on_message(self, topic: str, payload: bytes) -> None:
        self.on_command(payload)

    def on_command(self, payload: bytes) -> None:
        """Apply a `cmd` the machine supports and acknowledge it on `cmd/ack` either way."""
        try:
            doc = json.loads(payload)
        except ValueError:
            log.debug("ignored a command that is not JSON", extra={"thing": self.equipment_id})
            return
        if not isinstance(doc, dict) or not isinstance(doc.get("cmdId"), str):
            log.debug("ignored a command without cmdId", extra={"thing": self.equipment_id})
            return
        outcome = self.model.command(str(doc.get("feature", "")), doc.get("desiredProperties"))
        ack: dict[str, object] = {"cmdId": doc["cmdId"], "status": outcome.status}
        if outcome.status == "ok":
            ack["properties"] = outcome.properties
        if outcome.detail:
            ack["detail"] = outcome.detail
        self._put(f"{self.base}/cmd/ack", _encode(ack))


# ------------------------------------------------------------------------------------------ fleet
def _seeded(seed: int | None, name: str) -> random.Random:
    # One stream per name, so a node's signals do not change when the fleet around it does.
    return random.Random(f"{seed}:{name}") if seed is not None else random.Random()


class _Fleet:
    """The nodes, their connections and the fault schedule of one run."""

    def __init__(self, options: FleetOptions) -> None:
        self.options = options
        self.stats = FleetStats()
        things = fleet_things(options)
        self.nodes = [_Node(options, self.stats, eid, etype, _seeded(options.seed, eid)) for eid, etype in things]
        self.by_id = {n.equipment_id: n for n in self.nodes}
        self.schedule = FaultSchedule(options.faults, things, _seeded(options.seed, "faults"))
        self.links: list[_Link] = []
        jitter = _seeded(options.seed, "backoff")
        if options.shared_connection:
            link = _Link(options, self.stats, f"sim-{options.site}-{uuid.uuid4().hex[:8]}", SHARED_WINDOW, jitter,
                         subscriptions=(f"openegiz/{options.site}/+/+/cmd",), on_message=self._route_command)
            self.links.append(link)
            for node in self.nodes:
                node.attach(link)
                node.put_status("online")
            return
        for node in self.nodes:
            will_topic, will_payload = node.status("offline", with_ts=False)  # fires later: ts would be stale
            link = _Link(options, self.stats, f"sim-{options.site}-{node.equipment_id}", PER_NODE_WINDOW, jitter,
                         will=aiomqtt.Will(will_topic, will_payload, qos=1, retain=True),
                         subscriptions=(f"{node.base}/cmd",),
                         on_connect=node.on_connect, on_message=node.on_message,
                         credentials=options.credentials.get(node.equipment_id))
            node.attach(link)
            self.links.append(link)

    def _route_command(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        node = self.by_id.get(parts[3]) if len(parts) == 5 else None
        if node is not None and not node.down:
            node.on_command(payload)

    async def produce(self, stop: asyncio.Event, truth: TruthWriter,
                      on_progress: Callable[[FleetStats], None] | None) -> None:
        """Sample every node on a fixed schedule until the duration is over or `stop` is set."""
        o = self.options
        loop = asyncio.get_running_loop()
        clock = RunClock.start(o.rate_hz, o.time_scale, o.duration_s, o.clock_start)
        tick = 0
        next_progress = clock.t0
        try:
            while not stop.is_set():
                now = loop.time()
                if now >= clock.end:
                    break
                due = clock.t0 + tick * clock.period
                if now < due:
                    await _wait(stop, min(due, clock.end) - now)
                    continue
                behind = int((now - due) / clock.period)
                if behind:  # like a node whose loop overran: the missed samples are simply not taken
                    tick += behind
                    self.stats.late_ticks += behind
                elapsed_s = tick * clock.dt_s
                self._tick(elapsed_s, clock.dt_s, clock.hour(elapsed_s), truth)
                tick += 1
                self.stats.elapsed_s = now - clock.t0
                if on_progress is not None and now >= next_progress:
                    next_progress = now + PROGRESS_EVERY_S
                    on_progress(self.stats)
        finally:
            self.stats.elapsed_s = loop.time() - clock.t0
            self._finish(truth, loop.time() + o.drain_timeout_s)

    def _tick(self, elapsed_s: float, dt_s: float, hour: float, truth: TruthWriter) -> None:
        now = time.time()
        started, ended = self.schedule.update(elapsed_s, now)
        for fault in ended:
            self._end(fault, now, truth)
        for fault in started:
            self._start(fault)
        for node in self.nodes:
            if not node.down:
                node.sample(now, hour, elapsed_s, dt_s)

    def _start(self, fault: ActiveFault) -> None:
        node = self.by_id[fault.equipment_id]
        self.schedule.begin(fault, node.model.faults, node.silence)
        log.info("fault started", extra={"thing": f"{self.options.site}:{node.equipment_id}", "fault": fault.kind})

    def _end(self, fault: ActiveFault, now: float, truth: TruthWriter) -> None:
        node = self.by_id[fault.equipment_id]
        self.schedule.finish(fault, node.model.faults, node.silence)
        self._record(fault, now, truth)
        log.info("fault ended", extra={"thing": f"{self.options.site}:{node.equipment_id}", "fault": fault.kind})

    def _record(self, fault: ActiveFault, end: float, truth: TruthWriter) -> None:
        truth.write(TruthRecord(f"{self.options.site}:{fault.equipment_id}", fault.kind, round(fault.started_at, 3),
                                round(end, 3), fault.target.feature, fault.target.property))
        self.stats.faults += 1

    def _finish(self, truth: TruthWriter, deadline: float) -> None:
        """A clean stop: faults end now, buffered samples go out, nodes say offline, links drain and close."""
        now = time.time()
        for fault in self.schedule.active:
            self._record(fault, now, truth)
        self.schedule.active.clear()
        for node in self.nodes:
            if not node.down:
                node.flush_all()
                node.put_status("offline")
        for link in self.links:
            link.close(deadline)


async def run_fleet(options: FleetOptions, *, stop: asyncio.Event | None = None,
                    on_progress: Callable[[FleetStats], None] | None = None) -> FleetStats:
    """Run the fleet until `options.duration_s` has passed or `stop` is set; returns the counts.

    `on_progress` is called with the live counts after a sampling round (at most four times a
    second) and once at the end.
    Raises SimError (a ValueError) when the broker refuses the simulator's credentials.
    """
    stop = stop if stop is not None else asyncio.Event()
    fleet = _Fleet(options)
    with TruthWriter(options.truth_path) as truth:
        try:
            async with asyncio.TaskGroup() as tg:
                for link in fleet.links:
                    tg.create_task(link.run(), name=f"sim link {link.client_id}")
                tg.create_task(fleet.produce(stop, truth, on_progress), name="sim producer")
        except BaseExceptionGroup as group:
            refused = group.subgroup(SimError)
            if refused is not None:
                raise refused.exceptions[0] from None
            raise
    stats = fleet.stats
    stats.unconfirmed = sum(1 for n in fleet.nodes for e in n.ring.entries if e.state != _CONFIRMED)
    if on_progress is not None:
        on_progress(stats)
    return stats
