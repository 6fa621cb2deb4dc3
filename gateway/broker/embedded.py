"""A deliberately small MQTT 3.1.1 broker for machines without Mosquitto (the demo's fallback).

CONNECT with optional password-file authentication, SUBSCRIBE/UNSUBSCRIBE with + and # wildcards,
PUBLISH QoS 0/1 (QoS 2 is accepted from publishers and delivered as QoS 1), retained messages, Last
Will, keep-alive, persistent sessions with the same in-flight window and queue limits as the
Mosquitto settings. It keeps its state in memory: it survives restart() of the same object, not a
process restart. It is built on asyncio.Protocol callbacks, so it owns no tasks, and it coalesces
writes per loop iteration so a burst costs one send per connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from gateway.broker.passwords import read_password_file, verify_password
from gateway.broker.settings import INSTALL_HINT, BrokerError, BrokerSettings, _Broker

log = logging.getLogger(__name__)
T = TypeVar("T")

_CONNECT, _PUBLISH, _PUBACK, _PUBREC, _PUBREL, _SUBSCRIBE, _UNSUBSCRIBE, _PINGREQ, _DISCONNECT = (
    1, 3, 4, 5, 6, 8, 10, 12, 14)
_PINGRESP = b"\xd0\x00"
_CONNECT_TIMEOUT_S = 10.0
_RC_ACCEPTED, _RC_BAD_PROTOCOL, _RC_BAD_CLIENT_ID, _RC_BAD_CREDENTIALS, _RC_NOT_AUTHORIZED = 0, 1, 2, 4, 5


class _ProtocolError(Exception):
    """The peer broke MQTT 3.1.1; its connection is closed (and its Will published)."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8_field(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


class _Reader:
    """Reads the fields of one packet's variable header and payload."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise _ProtocolError("packet too short")
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        if self.pos + 2 > len(self.data):
            raise _ProtocolError("packet too short")
        self.pos += 2
        return int.from_bytes(self.data[self.pos - 2:self.pos], "big")

    def binary(self) -> bytes:
        n = self.u16()
        if self.pos + n > len(self.data):
            raise _ProtocolError("packet too short")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def utf8(self) -> str:
        raw = self.binary()
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise _ProtocolError("invalid UTF-8 string") from None
        if "\0" in text:
            raise _ProtocolError("NUL in string")
        return text

    def rest(self) -> bytes:
        return self.data[self.pos:]

    @property
    def at_end(self) -> bool:
        return self.pos >= len(self.data)


def _subscription(flags: int, body: bytes, kind: str, entry: Callable[[_Reader], T]) -> tuple[int, list[T]]:
    """The packet id and the entries (`entry` reads one) of a SUBSCRIBE or UNSUBSCRIBE, whose fixed header
    flags are 0010 and which names at least one topic filter."""
    if flags != 0x02:
        raise _ProtocolError(f"malformed {kind}")
    r = _Reader(body)
    mid = r.u16()
    entries = []
    while not r.at_end:
        entries.append(entry(r))
    if not entries:
        raise _ProtocolError(f"{kind} without filters")
    return mid, entries


def _requested(r: _Reader) -> tuple[str, int]:
    """One topic filter of a SUBSCRIBE and the QoS asked for it."""
    topic_filter, qos = r.utf8(), r.byte()
    if qos & 0xFC:
        raise _ProtocolError("invalid requested QoS")
    return topic_filter, qos


def valid_topic_name(topic: str) -> bool:
    """A topic a client may publish to: not empty, no wildcards."""
    return bool(topic) and "+" not in topic and "#" not in topic


def valid_topic_filter(topic_filter: str) -> bool:
    """A subscription filter: `+` only as a whole level, `#` only as the whole last level."""
    if not topic_filter:
        return False
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether `topic` matches `topic_filter` (topics starting with `$` need a literal first level)."""
    f_levels, t_levels = topic_filter.split("/"), topic.split("/")
    if topic.startswith("$") and f_levels[0] in ("+", "#"):
        return False
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= len(t_levels) or (f != "+" and f != t_levels[i]):
            return False
    return len(f_levels) == len(t_levels)


class _TopicTree:
    """Subscriptions as a tree of filter levels, so routing a message walks its levels, not every filter."""

    __slots__ = ("children", "subscribers")

    def __init__(self) -> None:
        self.children: dict[str, _TopicTree] = {}
        self.subscribers: dict[str, int] = {}  # client id -> granted QoS

    def add(self, topic_filter: str, client_id: str, qos: int) -> None:
        node = self
        for level in topic_filter.split("/"):
            node = node.children.setdefault(level, _TopicTree())
        node.subscribers[client_id] = qos

    def remove(self, topic_filter: str, client_id: str) -> None:
        path = [self]
        levels = topic_filter.split("/")
        for level in levels:
            nxt = path[-1].children.get(level)
            if nxt is None:
                return
            path.append(nxt)
        path[-1].subscribers.pop(client_id, None)
        for depth in range(len(levels), 0, -1):  # prune branches nobody subscribes to any more
            node = path[depth]
            if node.subscribers or node.children:
                break
            del path[depth - 1].children[levels[depth - 1]]

    def match(self, topic: str) -> dict[str, int]:
        """{client id: highest granted QoS} over every filter matching `topic`."""
        out: dict[str, int] = {}
        self._match(topic.split("/"), 0, out, topic.startswith("$"))
        return out

    def _match(self, levels: list[str], i: int, out: dict[str, int], dollar: bool) -> None:
        wild = not (i == 0 and dollar)
        if wild and "#" in self.children:
            _merge(out, self.children["#"].subscribers)
        if i == len(levels):
            _merge(out, self.subscribers)
            return
        if wild and "+" in self.children:
            self.children["+"]._match(levels, i + 1, out, dollar)
        child = self.children.get(levels[i])
        if child is not None:
            child._match(levels, i + 1, out, dollar)


def _merge(out: dict[str, int], subscribers: dict[str, int]) -> None:
    for client_id, qos in subscribers.items():
        if out.get(client_id, -1) < qos:
            out[client_id] = qos


@dataclass(frozen=True, slots=True)
class _Message:
    topic: str
    payload: bytes
    qos: int  # 0 or 1: QoS 2 publishes are delivered as QoS 1
    retain: bool  # the flag as sent: set only when delivered from the retained store
    topic_field: bytes  # length-prefixed UTF-8, encoded once for every subscriber

    @classmethod
    def make(cls, topic: str, payload: bytes, qos: int, retain: bool) -> _Message:
        return cls(topic, payload, min(qos, 1), retain, _utf8_field(topic))

    def packet(self, qos: int, mid: int = 0, dup: bool = False) -> bytes:
        flags = (0x08 if dup else 0) | (qos << 1) | (0x01 if self.retain else 0)
        if qos:
            body_len = len(self.topic_field) + 2 + len(self.payload)
            return b"".join((bytes((0x30 | flags,)), _varint(body_len), self.topic_field,
                             mid.to_bytes(2, "big"), self.payload))
        body_len = len(self.topic_field) + len(self.payload)
        return b"".join((bytes((0x30 | flags,)), _varint(body_len), self.topic_field, self.payload))


@dataclass(eq=False, slots=True)
class _Session:
    """What the broker keeps for one client id; outlives connections when clean_session is false."""

    client_id: str
    clean: bool
    conn: _Connection | None = None
    subscriptions: dict[str, int] = field(default_factory=dict)
    inflight: dict[int, _Message] = field(default_factory=dict)  # sent QoS 1, awaiting PUBACK, in order
    queue: deque[_Message] = field(default_factory=deque)  # QoS 1 waiting for the window or a reconnect
    queued_bytes: int = 0
    qos2_received: set[int] = field(default_factory=set)  # QoS 2 ids between PUBLISH and PUBREL
    last_mid: int = 0
    overflowing: bool = False


class _Connection(asyncio.Protocol):
    """One client connection: parses packets as bytes arrive and hands them to the broker."""

    def __init__(self, broker: EmbeddedBroker) -> None:
        self.broker = broker
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.session: _Session | None = None
        self.will: tuple[_Message, bool] | None = None  # (message, retain)
        self.paused = False
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.peer = "?"
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._flush_pending = False
        self._keepalive_s = 0.0
        self._last_rx = self.loop.time()
        self._timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------- transport callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = str(transport.get_extra_info("peername"))
        self.broker._connections.add(self)
        self._timer = self.loop.call_later(_CONNECT_TIMEOUT_S, self._connect_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.broker._connections.discard(self)
        will, self.will = self.will, None
        self.broker._detach(self)
        if will is not None:
            message, retain = will
            self.broker._publish(message, retain)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.session is not None:
            self.broker._pump(self.session)

    def data_received(self, data: bytes) -> None:
        self._last_rx = self.loop.time()
        buf = self._buf
        buf += data
        pos, end_of_data = 0, len(buf)
        limit = self.broker.settings.max_packet_size
        try:
            while end_of_data - pos >= 2:
                length, multiplier, i = 0, 1, pos + 1
                while True:
                    if i >= end_of_data:
                        length = -1  # the length itself is still incomplete
                        break
                    digit = buf[i]
                    length += (digit & 0x7F) * multiplier
                    i += 1
                    if not digit & 0x80:
                        break
                    multiplier *= 128
                    if multiplier > 128**3:
                        raise _ProtocolError("malformed remaining length")
                if length < 0:
                    break
                if i - pos + length > limit:
                    raise _ProtocolError(f"packet of {i - pos + length} bytes exceeds max_packet_size {limit}")
                if i + length > end_of_data:
                    break
                header = buf[pos]
                body = bytes(buf[i:i + length])
                pos = i + length
                self._handle(header, body)
                if self.transport is None or self.transport.is_closing():
                    return
        except _ProtocolError as exc:
            log.debug("embedded broker closes a connection", extra={"peer": self.peer, "reason": str(exc)})
            self.close()
            return
        del buf[:pos]

    # ------------------------------------------------------------- sending
    def send(self, packet: bytes) -> None:
        """Queue a packet; everything queued in this loop iteration goes out in one write."""
        self._out.append(packet)
        if not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        out, self._out = self._out, []
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))

    def close(self) -> None:
        """Close after sending what is queued (a refused CONNACK, say)."""
        self._flush()
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------- packets
    def _handle(self, header: int, body: bytes) -> None:
        kind, flags = header >> 4, header & 0x0F
        if self.session is None:
            if kind != _CONNECT:
                raise _ProtocolError("the first packet must be CONNECT")
            self._connect(body)
            return
        session = self.session
        if kind == _PUBLISH:
            self._publish(flags, body)
        elif kind == _PUBACK:
            mid = _Reader(body).u16()
            if session.inflight.pop(mid, None) is not None:
                self.broker._pump(session)
        elif kind == _PUBREL:
            mid = _Reader(body).u16()
            session.qos2_received.discard(mid)
            self.send(b"\x70\x02" + mid.to_bytes(2, "big"))  # PUBCOMP
        elif kind == _SUBSCRIBE:
            self._subscribe(flags, body)
        elif kind == _UNSUBSCRIBE:
            self._unsubscribe(flags, body)
        elif kind == _PINGREQ:
            self.send(_PINGRESP)
        elif kind == _DISCONNECT:
            self.will = None  # a clean disconnect: no Last Will
            self.close()
        elif kind == _CONNECT:
            raise _ProtocolError("second CONNECT")
        elif kind == _PUBREC:
            pass  # we never send QoS 2, so there is nothing to continue
        else:
            raise _ProtocolError(f"unexpected packet type {kind}")

    def _connack(self, session_present: bool, rc: int) -> None:
        self.send(bytes((0x20, 0x02, 1 if session_present else 0, rc)))

    def _refuse(self, rc: int, reason: str) -> None:
        log.debug("embedded broker refused a connection", extra={"peer": self.peer, "reason": reason})
        self._connack(False, rc)
        self.close()

    def _connect(self, body: bytes) -> None:
        r = _Reader(body)
        name, level = r.utf8(), r.byte()
        if name not in ("MQTT", "MQIsdp"):
            raise _ProtocolError(f"unknown protocol {name!r}")
        if level not in (3, 4):
            self._refuse(_RC_BAD_PROTOCOL, f"protocol level {level} (this broker speaks MQTT 3.1.1)")
            return
        flags = r.byte()
        keepalive = r.u16()
        client_id = r.utf8()
        will: tuple[_Message, bool] | None = None
        if flags & 0x04:
            will_topic, will_payload = r.utf8(), r.binary()
            will_qos = (flags >> 3) & 0x03
            if will_qos == 3 or not valid_topic_name(will_topic):
                raise _ProtocolError("invalid Last Will")
            will = _Message.make(will_topic, will_payload, will_qos, False), bool(flags & 0x20)
        username = r.utf8() if flags & 0x80 else None
        password = r.binary() if flags & 0x40 else None
        clean = bool(flags & 0x02)
        if not client_id:
            if not clean:
                self._refuse(_RC_BAD_CLIENT_ID, "empty client id with a persistent session")
                return
            client_id = f"auto-{os.urandom(8).hex()}"
        rc = self.broker._authenticate(username, password)
        if rc != _RC_ACCEPTED:
            self._refuse(rc, "bad credentials" if rc == _RC_BAD_CREDENTIALS else "anonymous not allowed")
            return
        self.will = will
        self.session, present = self.broker._attach(self, client_id, clean)
        self._connack(present, _RC_ACCEPTED)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if keepalive:
            self._keepalive_s = keepalive * 1.5
            self._timer = self.loop.call_later(self._keepalive_s, self._check_keepalive)
        self.broker._resume(self.session)

    def _publish(self, flags: int, body: bytes) -> None:
        qos, retain = (flags >> 1) & 0x03, bool(flags & 0x01)
        if qos == 3:
            raise _ProtocolError("QoS 3")
        r = _Reader(body)
        topic = r.utf8()
        if not valid_topic_name(topic):
            raise _ProtocolError("invalid topic name")
        mid = r.u16() if qos else 0
        payload = r.rest()
        assert self.session is not None
        if len(payload) > self.broker.settings.message_size_limit:
            # Like Mosquitto: drop, but complete the QoS flow so the sender does not resend it forever.
            self.broker.dropped_too_large += 1
        elif qos == 2 and mid in self.session.qos2_received:
            pass  # a resend before PUBREL: already delivered once
        else:
            if qos == 2:
                self.session.qos2_received.add(mid)
            self.broker._publish(_Message.make(topic, payload, qos, False), retain)
        if qos == 1:
            self.send(b"\x40\x02" + mid.to_bytes(2, "big"))
        elif qos == 2:
            self.send(b"\x50\x02" + mid.to_bytes(2, "big"))  # PUBREC

    def _subscribe(self, flags: int, body: bytes) -> None:
        mid, requests = _subscription(flags, body, "SUBSCRIBE", _requested)
        granted = [self.broker._subscribe(self, f, q) for f, q in requests]
        self.send(b"\x90" + _varint(2 + len(granted)) + mid.to_bytes(2, "big") + bytes(granted))
        for (topic_filter, _), qos in zip(requests, granted, strict=True):
            if qos != 0x80:
                self.broker._send_retained(self, topic_filter, qos)

    def _unsubscribe(self, flags: int, body: bytes) -> None:
        mid, filters = _subscription(flags, body, "UNSUBSCRIBE", _Reader.utf8)
        for topic_filter in filters:
            self.broker._unsubscribe(self, topic_filter)
        self.send(b"\xb0\x02" + mid.to_bytes(2, "big"))

    # ------------------------------------------------------------- timers
    def _connect_timeout(self) -> None:
        self._timer = None
        if self.session is None:
            log.debug("embedded broker: no CONNECT in time", extra={"peer": self.peer})
            self.close()

    def _check_keepalive(self) -> None:
        idle = self.loop.time() - self._last_rx
        if idle >= self._keepalive_s:
            self._timer = None
            log.debug("embedded broker: keep-alive expired", extra={"peer": self.peer})
            if self.transport is not None:
                self.transport.abort()  # the Will is published in connection_lost
            return
        self._timer = self.loop.call_later(self._keepalive_s - idle, self._check_keepalive)


class EmbeddedBroker(_Broker):
    """An in-process MQTT 3.1.1 broker for machines without Mosquitto (the demo's fallback).

    Loopback only, no TLS or ACLs; honours allow_anonymous, the password file and the same
    in-flight and queue limits as Mosquitto. State is kept in memory: `restart()` keeps sessions,
    queued and retained messages (like Mosquitto's persistence); `kill()` loses them, like a crash.
    """

    kind = "embedded"

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self.dropped_queue_full = 0  # QoS 1 messages dropped because a session's queue was full
        self.dropped_too_large = 0  # publishes over message_size_limit
        self.dropped_qos0 = 0  # QoS 0 messages for a client that was offline or not reading
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._sessions: dict[str, _Session] = {}
        self._tree = _TopicTree()
        self._retained: dict[str, _Message] = {}
        self._users: dict[str, str] | None = None

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        """Listen on settings.host:port; refuses settings it cannot honour instead of ignoring them."""
        if self._server is not None:
            return
        s = self.settings
        if not _is_loopback(s.host):
            raise BrokerError(f"the embedded broker listens on loopback only, not {s.host!r}; "
                              f"for a real line install Mosquitto ({INSTALL_HINT})")
        if s.acl_file is not None or s.tls:
            raise BrokerError(f"the embedded broker supports neither ACLs nor TLS ({INSTALL_HINT})")
        try:
            self._users = read_password_file(s.password_file) if s.password_file is not None else None
        except OSError as exc:
            raise BrokerError(f"cannot read the password file {s.password_file}: {exc}") from exc
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(lambda: _Connection(self), s.host, s.port)
        except OSError as exc:
            raise BrokerError(f"cannot start the embedded broker on {s.host}:{s.port}: {exc}") from exc
        log.info("broker started", extra={"broker": self.kind, "host": s.host, "port": s.port})

    async def stop(self) -> None:
        """Close the listener and every connection (no Wills: clients are not at fault); keep state."""
        await self._close(abort=False)

    async def kill(self) -> None:
        """Drop every connection at once and forget all state, like a crash of a broker without persistence."""
        await self._close(abort=True)
        self._sessions.clear()
        self._tree = _TopicTree()
        self._retained.clear()

    async def _close(self, *, abort: bool) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        conns = list(self._connections)
        for conn in conns:
            conn.will = None
            if conn.transport is not None:
                if abort:
                    conn.transport.abort()
                else:
                    conn.close()
        if conns:
            _, pending = await asyncio.wait([c.closed for c in conns], timeout=5)
            for conn in conns:
                if conn.closed in pending and conn.transport is not None:
                    conn.transport.abort()  # a peer that does not read: stop waiting for it
            if pending:
                await asyncio.wait(pending, timeout=1)
        await server.wait_closed()
        log.info("broker stopped" if not abort else "broker killed", extra={"broker": self.kind, "port": self.port})

    # ------------------------------------------------------------- sessions
    def _authenticate(self, username: str | None, password: bytes | None) -> int:
        if username is None:
            return _RC_ACCEPTED if self.settings.allow_anonymous else _RC_NOT_AUTHORIZED
        if self._users is None:  # no password file: like Mosquitto, any name is accepted
            return _RC_ACCEPTED if self.settings.allow_anonymous else _RC_NOT_AUTHORIZED
        hashed = self._users.get(username)
        try:
            text = (password or b"").decode()
        except UnicodeDecodeError:
            return _RC_BAD_CREDENTIALS
        if hashed is None or not verify_password(text, hashed):
            return _RC_BAD_CREDENTIALS
        return _RC_ACCEPTED

    def _attach(self, conn: _Connection, client_id: str, clean: bool) -> tuple[_Session, bool]:
        """Bind a new connection to its session; returns (session, session present)."""
        old = self._sessions.get(client_id)
        if old is not None and old.conn is not None:
            previous = old.conn  # the same client id again: the newer connection takes over
            previous.will = None
            previous.session = None
            old.conn = None
            if previous.transport is not None:
                previous.transport.abort()
        if old is not None and (clean or old.clean):
            self._drop_session(old)
            old = None
        if old is None:
            session = _Session(client_id, clean)
            self._sessions[client_id] = session
            present = False
        else:
            session, present = old, True
        session.conn = conn
        return session, present

    def _detach(self, conn: _Connection) -> None:
        session, conn.session = conn.session, None
        if session is None or session.conn is not conn:
            return
        session.conn = None
        if session.clean:
            self._drop_session(session)

    def _drop_session(self, session: _Session) -> None:
        for topic_filter in session.subscriptions:
            self._tree.remove(topic_filter, session.client_id)
        if self._sessions.get(session.client_id) is session:
            del self._sessions[session.client_id]

    def _resume(self, session: _Session) -> None:
        """After a reconnect: resend unacknowledged messages (DUP, same ids), then the queue."""
        conn = session.conn
        assert conn is not None
        for mid, message in session.inflight.items():
            conn.send(message.packet(1, mid, dup=True))
        self._pump(session)

    def _subscribe(self, conn: _Connection, topic_filter: str, qos: int) -> int:
        session = conn.session
        assert session is not None
        if not valid_topic_filter(topic_filter):
            return 0x80
        granted = min(qos, 1)
        session.subscriptions[topic_filter] = granted
        self._tree.add(topic_filter, session.client_id, granted)
        return granted

    def _unsubscribe(self, conn: _Connection, topic_filter: str) -> None:
        session = conn.session
        assert session is not None
        if session.subscriptions.pop(topic_filter, None) is not None:
            self._tree.remove(topic_filter, session.client_id)

    # ------------------------------------------------------------- routing
    def _publish(self, message: _Message, retain: bool) -> None:
        if retain:
            if message.payload:
                self._retained[message.topic] = _Message(message.topic, message.payload, message.qos, True,
                                                         message.topic_field)
            else:
                self._retained.pop(message.topic, None)  # an empty retained message clears the topic
        for client_id, sub_qos in self._tree.match(message.topic).items():
            session = self._sessions.get(client_id)
            if session is not None:
                self._deliver(session, message, min(message.qos, sub_qos))

    def _send_retained(self, conn: _Connection, topic_filter: str, granted: int) -> None:
        session = conn.session
        assert session is not None
        for topic, message in self._retained.items():
            if topic_matches(topic_filter, topic):
                self._deliver(session, message, min(message.qos, granted))

    def _deliver(self, session: _Session, message: _Message, qos: int) -> None:
        conn = session.conn
        if qos == 0:
            if conn is not None and not conn.paused:
                conn.send(message.packet(0))
            else:
                self.dropped_qos0 += 1
            return
        limits = self.settings
        window = limits.max_inflight_messages or 65535
        if conn is not None and not conn.paused and not session.queue and len(session.inflight) < window:
            mid = _next_mid(session)
            session.inflight[mid] = message
            conn.send(message.packet(1, mid))
            return
        if (limits.max_queued_messages and len(session.queue) >= limits.max_queued_messages) or (
                limits.max_queued_bytes and session.queued_bytes + len(message.payload) > limits.max_queued_bytes):
            self.dropped_queue_full += 1
            if not session.overflowing:
                session.overflowing = True
                log.warning("embedded broker queue full; dropping QoS 1 messages for a client",
                            extra={"client_id": session.client_id, "queued": len(session.queue),
                                   "queued_bytes": session.queued_bytes})
            return
        session.queue.append(message)
        session.queued_bytes += len(message.payload)
        self._pump(session)

    def _pump(self, session: _Session) -> None:
        """Move queued QoS 1 messages into the in-flight window while the client can take them."""
        conn = session.conn
        if conn is None:
            return
        window = self.settings.max_inflight_messages or 65535
        queue, inflight = session.queue, session.inflight
        while queue and not conn.paused and len(inflight) < window:
            message = queue.popleft()
            session.queued_bytes -= len(message.payload)
            mid = _next_mid(session)
            inflight[mid] = message
            conn.send(message.packet(1, mid))
        if session.overflowing and not queue:
            session.overflowing = False


def _next_mid(session: _Session) -> int:
    mid = session.last_mid
    while True:
        mid = mid % 65535 + 1
        if mid not in session.inflight:
            session.last_mid = mid
            return mid


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


