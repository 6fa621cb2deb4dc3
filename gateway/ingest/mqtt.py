"""MqttIngest: the gateway's MQTT session — telemetry and status in, commands out.

It subscribes with QoS 1 on a persistent session and acknowledges each message to the broker only
after the message has been applied (manual PUBACK), so the broker keeps, and redelivers after a
reconnect, everything the gateway has not finished. Messages go from the MQTT client's receive
callback straight into `handle()` on the event loop: no intermediate queue, no task per message.
Every rejection is dead-lettered with a reason and never disturbs good traffic.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiomqtt
import paho.mqtt.client as paho

from gateway.buffer.buffer import TelemetryBuffer
from gateway.common.backoff import full_jitter
from gateway.common.errors import RejectedMessage
from gateway.common.names import THING_ID_RE, TYPE_RE
from gateway.common.readings import Sample, count_points
from gateway.common.tasks import cancel_and_wait
from gateway.config import GatewayConfig
from gateway.ingest.deadletter import DeadLetterLog
from gateway.ingest.payload import decode_json, parse_status, parse_telemetry
from gateway.ingest.sequence import SequenceTracker
from gateway.ingest.topics import TopicPattern
from gateway.metrics import GatewayMetrics
from gateway.twin.model import Feature, Thing
from gateway.twin.registry import TwinRegistry

log = logging.getLogger(__name__)


class CommandNotSent(Exception):
    """The broker is not reachable, so a command could not be published."""


@dataclass(frozen=True, slots=True)
class Identity:
    thing_id: str
    equipment_id: str
    type: str | None


MAX_ROUTES = 50_000  # topics whose pattern match is remembered (a line has one per device and feature)


class Route:
    """What a topic is, remembered per topic: its kind and captured levels, and for telemetry, once
    its Thing was named without refusal, the identity, feature and device the messages need. The
    captured levels are then dropped: with 10,000 Things of three features, 30,000 topics, a dict of
    levels and an identity per topic took about 8 MiB more than this one object."""

    __slots__ = ("device", "feature", "fields", "ident", "kind")

    def __init__(self, kind: str, fields: dict[str, str]) -> None:
        self.kind = kind
        self.fields: dict[str, str] | None = fields
        self.ident: Identity | None = None
        self.feature: str | None = None
        self.device: str | None = None


class BrokerAcks:
    """Acknowledges received messages on one broker connection, many in one write.

    paho's `ack()` queues one PUBACK packet per call, and each costs a wake-up of the event loop's
    writer and a system call. The PUBACKs of one commit are one run of 4-byte packets, so they are
    queued to paho as one write (MQTT 3.1.1 and 5 alike: a PUBACK without a reason code is
    `0x40 0x02 <mid>`). QoS 2 messages take paho's own path.
    """

    def __init__(self, client: paho.Client) -> None:
        self._client = client

    def is_connected(self) -> bool:
        return bool(self._client.is_connected())

    def ack_many(self, acks: Sequence[tuple[int, int]]) -> None:
        pubacks = b"".join([_PUBACK.pack(0x40, 2, mid) for mid, qos in acks if qos == 1])
        if pubacks:
            self._client._packet_queue(paho.PUBACK, pubacks, 0, 0)
        for mid, qos in acks:
            if qos == 2:
                self._client.ack(mid, qos)


_PUBACK = struct.Struct("!BBH")


class _Closed(Exception):
    """The broker closed the connection (a read of ours returned no bytes)."""


PublishHandler = Callable[[bytes, bytes, int, int], None]
"""Takes a PUBLISH parsed from the chunk: its topic (raw bytes), payload, QoS (0 or 1) and packet id."""


class ReadAhead:
    """Reads a broker connection in chunks and parses several packets per wake-up.

    paho reads a packet in at least three `recv()` calls (its type byte, each byte of its length,
    the rest) and one packet per call of `loop_read()`, so every message costs the event loop a
    wake-up and several system calls. Here the connection is read in `recv()`s of up to `CHUNK`
    bytes, and one wake-up parses what that chunk holds — at most `PER_TURN` packets, so a full
    chunk cannot flood the event bus before WebSocket senders and the commit loop run; the rest is
    parsed in the next turn of the event loop (the socket may not signal again, as its bytes are
    already read).

    A PUBLISH of QoS 0 or 1 is parsed here and handed to `on_publish` as its topic, payload, QoS
    and packet id: no `MQTTMessage`, no per-packet state, no log call. One that the chunk holds only
    the start of is completed from the next `recv()`. Everything else — CONNACK, SUBACK, PINGRESP,
    QoS 2 and its PUBREL, a PUBLISH larger than a chunk, a packet paho would refuse, and every
    packet of an MQTT 5 connection — is left to paho, whose reads are served from the same chunk; so
    a malformed packet closes the connection as paho closes it, and acknowledgements stay where
    they were (the caller's, after the commit).

    After a chunk the socket is not watched for a few milliseconds: at a line's steady rate messages
    arrive one by one, a millisecond apart, and each would wake the event loop, the ingest and every
    WebSocket sender on its own. Reading a few milliseconds' worth at once makes one wake-up, one
    read and one WebSocket write of several messages; it delays a message by at most the pause.
    Each read costs two `epoll_ctl` calls, a timer, a WebSocket write and a wake-up of every
    consumer whatever it holds, so at 1,000 msg/s the pause sets much of what a second costs
    besides the messages. The pause is `PAUSE_S` after reads that brought fewer than `PER_TURN`
    messages (a line at a few thousand messages a second or less) and `BUSY_PAUSE_S` after larger
    ones: when the gateway is behind, a longer pause would only slow the backlog's draining.
    Both stay well below `buffer.commit_idle_ms`, or the gap between two reads would look like a
    pause in the inflow and end a commit window early.
    """

    CHUNK = 32 * 1024
    PER_TURN = 32
    PAUSE_S = 0.008
    BUSY_PAUSE_S = 0.004

    def __init__(self, client: aiomqtt.Client, paho_client: paho.Client,
                 on_publish: PublishHandler | None = None) -> None:
        self._aio = client
        self._paho = paho_client
        self._recv = paho_client._sock_recv
        self._loop_read = paho_client.loop_read
        self._on_publish = on_publish if paho_client._protocol != paho.MQTTv5 else None
        self._buf = b""
        self._pos = 0
        self._sock: object = None
        self._failed: BaseException | None = None  # how a read of ours ended, for paho to handle
        self._later: asyncio.Handle | None = None
        self._paused = False
        self._taken = 0  # PUBLISH packets parsed here in this call of loop_read
        self._since_pause = 0  # ... and since the socket was last left unwatched
        self._short = False  # the chunk ends with the start of a PUBLISH, and nothing more is waiting
        # paho looks both up on the instance: its reads and aiomqtt's reader callback come here.
        paho_client._sock_recv = self._sock_recv  # type: ignore[method-assign]
        paho_client.loop_read = self.loop_read  # type: ignore[method-assign]

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def _same_connection(self) -> None:
        sock = self._paho._sock
        if sock is not self._sock:  # a new connection: nothing read from the old one carries over
            self._sock, self._buf, self._pos, self._failed = sock, b"", 0, None

    def _sock_recv(self, bufsize: int) -> bytes:
        self._same_connection()
        if self._pos >= len(self._buf):
            failed, self._failed = self._failed, None
            if failed is not None:  # our read ended the connection: paho sees it as its own read would
                if isinstance(failed, _Closed):
                    return b""
                raise failed
            data = self._recv(max(bufsize, self.CHUNK))  # BlockingIOError when nothing is waiting
            if len(data) <= bufsize:
                return data
            self._buf, self._pos = data, 0
        start = self._pos
        self._pos = min(start + bufsize, len(self._buf))
        return self._buf[start:self._pos]

    def loop_read(self, max_packets: int = 1) -> paho.MQTTErrorCode:
        """Parse the packets of one chunk, at most `PER_TURN`; schedule the rest for the next turn."""
        if self._later is not None:  # the rest of a chunk is due this turn: that call reads on, not this one
            return paho.MQTT_ERR_SUCCESS
        self._taken = 0
        self._short = False
        rc = self._read_packet(first=True)
        turns = 1
        while rc == paho.MQTT_ERR_SUCCESS and self.buffered and not self._short and self._paho._sock is not None:
            if turns >= self.PER_TURN:
                if self._later is None:
                    self._later = asyncio.get_running_loop().call_soon(self._continue)
                break
            rc = self._read_packet()
            turns += 1
        self._since_pause += self._taken
        if self._taken:  # paho's keepalive counts from the last bytes received
            with self._paho._msgtime_mutex:
                self._paho._last_bytes_received = paho.time_func()
        if rc == paho.MQTT_ERR_SUCCESS and self._later is None:
            self._pause()
        return rc

    def _read_packet(self, *, first: bool = False) -> paho.MQTTErrorCode:
        """One packet: a whole PUBLISH of QoS 0 or 1 parsed here, anything else by paho."""
        p = self._paho
        if self._on_publish is None or p._in_packet["command"] != 0 or p._sock is None:
            return self._loop_read()  # not ours, or paho is in the middle of a packet
        self._same_connection()
        if self._pos >= len(self._buf):
            if not first or self._failed is not None:
                return self._loop_read()
            try:
                data = self._recv(self.CHUNK)
            except BlockingIOError:
                return paho.MQTT_ERR_SUCCESS  # nothing waiting, as paho's read would find
            except Exception as exc:  # handed to paho, which decides as for its own read
                self._failed = exc
                return self._loop_read()
            if not data:
                self._failed = _Closed()
                return self._loop_read()
            self._buf, self._pos = data, 0
        while True:
            took = self._take_publish()
            if took is not None:
                return paho.MQTT_ERR_SUCCESS if took else self._loop_read()
            # A PUBLISH cut at the end of the chunk (the broker's writes need not end with a packet):
            # what is read of it goes in front of the next chunk.
            try:
                data = self._recv(self.CHUNK)
            except BlockingIOError:
                self._short = True  # the rest comes with a later wake-up
                return paho.MQTT_ERR_SUCCESS
            except Exception as exc:  # paho reads what there is of the packet, then meets this
                self._failed = exc
                return self._loop_read()
            if not data:
                self._failed = _Closed()
                return self._loop_read()
            self._buf, self._pos = self._buf[self._pos:] + data, 0

    def _take_publish(self) -> bool | None:
        """Hand on the PUBLISH at the read position if it is QoS 0 or 1, whole in the chunk and well
        formed (what paho would accept). False leaves the packet to paho; None: a PUBLISH of at most
        `CHUNK` bytes that the chunk holds only the start of."""
        buf, pos = self._buf, self._pos
        header = buf[pos]
        if header & 0xF4 != 0x30:  # not a PUBLISH, or QoS 2 (or the invalid 3)
            return False
        end = len(buf)
        i = pos + 1
        length = shift = 0
        while True:  # the remaining length: 1 to 4 bytes of 7 bits, least significant first
            if i >= end:
                return None
            byte = buf[i]
            i += 1
            length |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
            if shift > 21:  # a fifth length byte: paho refuses the packet
                return False
        packet_end = i + length
        if packet_end > end:  # the rest is not read yet; paho reads on a packet larger than a chunk
            return None if packet_end - pos <= self.CHUNK else False
        if length < 2:  # too short to hold a topic
            return False
        topic_end = i + 2 + ((buf[i] << 8) | buf[i + 1])
        qos = (header >> 1) & 1
        start = topic_end + 2 * qos
        if topic_end == i + 2 or start > packet_end:  # an empty topic, or no room for it and its packet id
            return False
        mid = (buf[topic_end] << 8) | buf[topic_end + 1] if qos else 0
        self._pos = packet_end
        self._taken += 1
        self._on_publish(buf[i + 2:topic_end], buf[start:packet_end], qos, mid)  # type: ignore[misc]
        return True

    def _pause(self) -> None:
        """Stop watching the socket for `PAUSE_S`, or `BUSY_PAUSE_S` after a large read (what arrives
        meanwhile waits in its buffer)."""
        sock = self._paho._sock
        taken, self._since_pause = self._since_pause, 0
        pause = self.PAUSE_S if taken < self.PER_TURN else self.BUSY_PAUSE_S
        if sock is None or self._paused or pause <= 0:
            return
        loop = asyncio.get_running_loop()
        fd = sock.fileno()
        if loop.remove_reader(fd):
            self._paused = True
            loop.call_later(pause, self._watch, sock, fd)

    def _watch(self, sock: object, fd: int) -> None:
        self._paused = False
        if self._paho._sock is sock:  # not closed (nor replaced) meanwhile
            asyncio.get_running_loop().add_reader(fd, self._readable)

    def _continue(self) -> None:
        """The rest of a chunk, one turn later."""
        self._later = None
        self._readable()

    def _readable(self) -> None:
        """Read, as aiomqtt's reader does: TLS may hold decrypted bytes the socket does not
        signal, and an error ends the session."""
        try:
            self.loop_read()
            sock = self._paho._sock
            while sock is not None and hasattr(sock, "pending") and sock.pending() > 0:
                self.loop_read()
                sock = self._paho._sock
        except Exception as exc:
            disconnected = self._aio._disconnected
            if not disconnected.done():
                disconnected.set_exception(exc)


_CONTAINERS = (list, dict)


def _known_plain(feature: Feature | None, properties: dict[str, Any]) -> bool:
    """Whether every property is one the feature already has, with a plain (not list or dict) value;
    a loop, not a generator: it runs for every message."""
    if feature is None:
        return False
    have = feature.properties
    for k, v in properties.items():  # noqa: SIM110 (a loop: no generator per message)
        if k not in have or isinstance(v, _CONTAINERS):
            return False
    return True


class MqttIngest:
    """Owns the broker connection; parses, validates, de-duplicates and applies telemetry."""

    def __init__(self, config: GatewayConfig, registry: TwinRegistry, dead_letters: DeadLetterLog,
                 metrics: GatewayMetrics, buffer: TelemetryBuffer, sequences: SequenceTracker) -> None:
        self._cfg = config
        self._buffer = buffer
        self._seq = sequences
        self._ing = config.ingest
        self._site = config.gateway.site
        self._registry = registry
        self._dead = dead_letters
        self._m = metrics
        self.telemetry_pattern = TopicPattern.parse(self._ing.telemetry_topic, required={"equipment_id"})
        self.status_pattern = TopicPattern.parse(self._ing.status_topic, required={"equipment_id"})
        self.command_pattern = TopicPattern.parse(self._ing.command_topic, required={"equipment_id"})
        self.ack_pattern = TopicPattern.parse(self._ing.command_topic + "/ack", required={"equipment_id"})
        self._device_of_thing = {m.thing: dev for dev, m in self._ing.devices.items()}
        self._client: aiomqtt.Client | None = None
        self._paho: paho.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.connected = asyncio.Event()
        self._counts = metrics.ingest
        self._routes: dict[str, Route] = {}

    @property
    def accepted_messages(self) -> int:
        """Telemetry messages applied since start."""
        return self._counts.accepted

    @property
    def accepted_points(self) -> int:
        """Telemetry points applied since start."""
        return self._counts.points

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="mqtt-ingest")

    async def stop(self) -> None:
        """Stop taking messages, commit and acknowledge what was taken, then disconnect."""
        self._stopping = True  # later messages stay unacknowledged: the broker keeps them
        try:
            await self._buffer.flush()
        except Exception:
            log.exception("could not commit the last messages; the broker will redeliver them")
        await cancel_and_wait(self._task)
        self._task = None

    @property
    def subscriptions(self) -> list[tuple[str, int]]:
        own = {"site": self._site, "line": self._cfg.gateway.line}
        return [(p.subscription_for(**own), 1) for p in (self.telemetry_pattern, self.status_pattern,
                                                          self.ack_pattern)]

    def _new_client(self) -> aiomqtt.Client:
        mq = self._cfg.mqtt
        client = aiomqtt.Client(
            mq.host,
            mq.port,
            username=mq.username or None,
            password=mq.password or None,
            identifier=self._cfg.mqtt_client_id,
            clean_session=False,
            keepalive=mq.keepalive_s,
            tls_context=mq.ssl_context(),
            timeout=10,
        )
        # aiomqtt exposes no switch for manual acknowledgement and converts every message into its
        # own objects before queueing it; paho, which it wraps, does both. We take messages straight
        # from paho's callback (on the event loop thread) and acknowledge each once it is applied.
        self._paho = client._client
        self._paho.manual_ack_set(True)
        acks = BrokerAcks(self._paho)

        def on_publish(topic: bytes, payload: bytes, qos: int, mid: int) -> None:
            if not self._stopping:  # after stop() messages stay unacknowledged: the broker keeps them
                self._on_publish(acks, topic, payload, qos, mid)

        def on_message(message: paho.MQTTMessage) -> None:  # what paho parsed itself (QoS 2, MQTT 5)
            if not self._stopping:
                self._on_publish(acks, message._topic, bytes(message.payload), message.qos, message.mid)

        ReadAhead(client, self._paho, on_publish)

        # paho matches every message against per-topic callbacks under two locks before it calls
        # `on_message`; there are none here (messages come only to us), so that step is skipped.
        self._paho._handle_on_message = on_message  # type: ignore[method-assign]
        return client

    async def _run(self) -> None:
        mq = self._cfg.mqtt
        attempt = 0
        while not self._stopping:
            connected_at: float | None = None
            try:
                client = self._new_client()
                async with client:
                    connected_at = time.monotonic()
                    self._client = client
                    await client.subscribe(self.subscriptions)
                    self._m.mqtt_connected.set(1)
                    self.connected.set()
                    log.info("connected to broker", extra={"host": mq.host, "port": mq.port,
                                                           "client_id": self._cfg.mqtt_client_id})
                    if self._stopping:
                        # stop() came while connecting. Its cancellation can be lost: Python 3.11's
                        # asyncio.wait_for (aiomqtt's connect and subscribe) returns the result instead
                        # when the reply comes in the same turn, and the messages below never end.
                        break
                    async for _ in client.messages:  # never yields (see _new_client); ends on disconnect
                        pass
            except aiomqtt.MqttError as exc:
                self._m.mqtt_reconnects.inc()
                if attempt == 0:
                    log.warning("broker connection lost or refused", extra={"error": str(exc)})
            except Exception as exc:  # e.g. an unreadable CA file: keep trying, never die silently
                self._m.mqtt_reconnects.inc()
                if attempt == 0:
                    log.error("cannot set up the broker connection", extra={"error": f"{type(exc).__name__}: {exc}"})
            finally:
                self._client = None
                self._paho = None
                self.connected.clear()
                self._m.mqtt_connected.set(0)
            if self._stopping:
                break
            # A session that stayed up a while starts the backoff afresh; a flapping one keeps growing it.
            if connected_at is not None and time.monotonic() - connected_at >= mq.reconnect_max_s:
                attempt = 0
            # Capped exponential backoff with full jitter, so a fleet does not reconnect in step.
            delay = full_jitter(attempt, mq.reconnect_min_s, mq.reconnect_max_s)
            attempt += 1
            await asyncio.sleep(delay)

    # ----------------------------------------------------------------- receive path
    def _on_publish(self, acks: BrokerAcks, topic: bytes, payload: bytes, qos: int, mid: int) -> None:
        """A received PUBLISH: apply now; acknowledge (PUBACK) once the buffer has committed it."""
        try:
            name = topic.decode()
        except UnicodeDecodeError:
            name = topic.decode("utf-8", "replace")
        self.handle(name, payload)
        if qos > 0:
            self._buffer.ack_later(acks, mid, qos)

    def handle(self, topic: str, payload: Any, *, retain: bool = False) -> None:
        """Apply one message or dead-letter it; never raises."""
        raw = payload if isinstance(payload, bytes) else str(payload).encode()
        try:
            route = self._routes.get(topic)
            if route is None:
                route = self._route(topic)
            kind = route.kind
            self._counts.messages[kind] += 1
            if kind == "telemetry":
                self._telemetry(route, raw)
            elif kind == "status":
                self._status(route.fields or {}, raw)
            elif kind == "command_ack":
                self._command_ack(route.fields or {}, raw)
            else:
                raise RejectedMessage("unknown_topic", "topic matches no configured pattern")
        except RejectedMessage as exc:
            self._dead.add(exc.reason, topic, raw, exc.detail)
        except Exception as exc:  # a bug must cost one message, not the service; counted and logged
            log.exception("internal error while handling a message", extra={"topic": topic[:200]})
            self._dead.add("internal_error", topic, raw, f"{type(exc).__name__}: {exc}"[:200])

    def _route(self, topic: str) -> Route:
        """Which pattern a topic fits and its captured fields; remembered, since a line has few topics."""
        route = Route("other", {})
        for kind, pattern in (("telemetry", self.telemetry_pattern), ("status", self.status_pattern),
                              ("command_ack", self.ack_pattern)):
            fields = pattern.match(topic)
            if fields is not None:
                route = Route(kind, fields)
                break
        if len(self._routes) >= MAX_ROUTES:  # bounded: a flood of made-up topics cannot grow it
            self._routes.clear()
        self._routes[topic] = route
        return route

    def _identity(self, fields: dict[str, str]) -> Identity:
        site = fields.get("site", self._site)
        if site != self._site:
            raise RejectedMessage("foreign_site", f"site {site!r} is not this gateway's {self._site!r}")
        device = fields.get("equipment_id") or fields["device_id"]
        mapping = self._ing.devices.get(device)
        equipment = mapping.thing if mapping is not None else device
        ttype = fields.get("type") or (mapping.type if mapping is not None and mapping.type else None)
        thing_id = sys.intern(f"{self._site}:{equipment}")  # one string for the Thing's topics
        if not THING_ID_RE.match(thing_id):
            raise RejectedMessage("bad_name", f"equipment id {equipment[:64]!r} is not allowed")
        if ttype is not None and not TYPE_RE.match(ttype):
            raise RejectedMessage("bad_name", f"equipment type {ttype[:32]!r} must be lowercase letters, digits, _ -")
        return Identity(thing_id, equipment, ttype)

    def _thing(self, ident: Identity) -> Thing:
        thing = self._registry.get(ident.thing_id)
        if thing is None:
            if not self._ing.auto_register:
                raise RejectedMessage(
                    "unknown_device",
                    f"{ident.thing_id} is not registered (create the Thing or set ingest.auto_register)",
                )
            metadata = {"name": ident.equipment_id, "line": self._cfg.gateway.line, "registeredBy": "ingest"}
            thing = self._registry.ensure(ident.thing_id, ident.type or self._ing.default_type, metadata)
        elif ident.type is not None and ident.type != thing.type:
            raise RejectedMessage("type_mismatch", f"{ident.thing_id} is a {thing.type}, topic says {ident.type}")
        return thing

    def _telemetry(self, route: Route, raw: bytes) -> None:
        ident = route.ident
        if ident is None:  # remembered with the route: the same few topics all day
            fields = route.fields or {}
            ident = self._identity(fields)  # a refused one is not remembered
            route.feature = fields.get("feature")
            route.device = fields.get("device_id") or fields.get("equipment_id")
            route.ident, route.fields = ident, None
        telemetry = parse_telemetry(
            raw,
            feature=route.feature,
            payload_format=self._ing.payload_format,
            max_bytes=self._ing.max_payload_bytes,
            max_samples=self._ing.max_samples,
            device_id=route.device,
        )
        thing = self._thing(ident)
        self._check_growth(thing, telemetry.samples)
        accepted = self._seq.fresh(thing.id, telemetry)
        fresh = accepted.samples
        if not fresh:
            return
        now = time.time()
        self._registry.apply_samples(thing, fresh, now, accepted.generation)
        self._buffer.add(thing.id, thing.type, fresh, now, accepted.mark)
        points = sum(count_points(s.properties) for s in fresh)
        counts = self._counts
        counts.accepted += 1
        counts.points += points

    def _check_growth(self, thing: Thing, samples: tuple[Sample, ...]) -> None:
        """Refuse a message that would give a Thing more features or series than the caps allow, so
        a faulty or hostile node cannot make the twin, the buffer and the uplink grow without end."""
        feats = thing.features
        for s in samples:
            if not _known_plain(feats.get(s.feature), s.properties):
                break
        else:
            return  # the common case: only properties the Thing already has, all plain values
        ing = self._ing
        new_features = {s.feature for s in samples} - feats.keys()
        if len(feats) + len(new_features) > ing.max_features_per_thing:
            raise RejectedMessage("too_many_features", f"{thing.id} has {len(feats)} features; "
                                  f"{len(new_features)} more would pass ingest.max_features_per_thing "
                                  f"({ing.max_features_per_thing})")
        have, more = self._buffer.new_series(thing.id, samples)
        if more and have + more > ing.max_series_per_thing:
            raise RejectedMessage("too_many_series", f"{thing.id} has {have} stored properties; {more} more "
                                  f"would pass ingest.max_series_per_thing ({ing.max_series_per_thing})")

    def _status(self, fields: dict[str, str], raw: bytes) -> None:
        if not raw:
            return  # an empty retained message clears a retained status; nothing to apply
        ident = self._identity(fields)
        status = parse_status(raw)
        thing = self._thing(ident)
        self._registry.set_connectivity(thing, status, time.time())

    def _command_ack(self, fields: dict[str, str], raw: bytes) -> None:
        ident = self._identity(fields)
        doc = decode_json(raw, 4096)
        if not isinstance(doc, dict) or not isinstance(doc.get("cmdId"), str):
            raise RejectedMessage("wrong_shape", 'cmd/ack must be {"cmdId": ..., "status": "ok"|"error"}')
        status = doc.get("status", "ok")
        if status not in ("ok", "error", "rejected"):
            raise RejectedMessage("wrong_type", "cmd/ack status must be ok, error or rejected")
        props = doc.get("properties")
        if props is not None and not isinstance(props, dict):
            raise RejectedMessage("wrong_type", "cmd/ack properties must be an object")
        detail = doc.get("detail")
        if not self._registry.apply_command_ack(doc["cmdId"], status, str(detail) if detail else None,
                                                props, time.time(), thing_id=ident.thing_id):
            raise RejectedMessage("unknown_command", f"no pending command {doc['cmdId'][:64]!r} for {ident.thing_id}")

    # ----------------------------------------------------------------- commands out
    async def send_command(self, thing: Thing, feature: str, desired: dict[str, Any], cmd_id: str) -> str:
        """Publish desired properties to the node's command topic (QoS 1); returns the topic."""
        client = self._client
        if client is None or not self.connected.is_set():
            self._m.commands.labels("broker_unavailable").inc()
            raise CommandNotSent("the MQTT broker is not connected")
        device = self._device_of_thing.get(thing.equipment_id, thing.equipment_id)
        topic = self.command_pattern.build(site=thing.site, type=thing.type, equipment_id=device,
                                           device_id=device, line=self._cfg.gateway.line)
        payload = json.dumps({"cmdId": cmd_id, "feature": feature, "desiredProperties": desired,
                              "ts": time.time()})
        try:
            await asyncio.wait_for(client.publish(topic, payload, qos=1), timeout=5)
        except (aiomqtt.MqttError, TimeoutError) as exc:
            self._m.commands.labels("failed").inc()
            raise CommandNotSent(f"publishing to {topic} failed: {exc}") from exc
        self._m.commands.labels("sent").inc()
        return topic
