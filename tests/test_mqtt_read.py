"""The gateway's own reading of PUBLISH packets, between it and a real Mosquitto.

A proxy sits between the gateway and the broker: it forwards the broker's packets (cut into small
pieces when asked, so packets straddle the gateway's reads), inserts packets of its own into the
broker's stream, and records what the gateway sends back (keeping the answers to its own packets
from the broker).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiomqtt
import pytest

from tests.helpers import GatewayFactory, RunningGateway, telemetry, wait_for

PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 0x30, 0x40, 0x50, 0x60, 0x70


def remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish_packet(topic: str, payload: bytes, *, qos: int, mid: int = 0, dup: bool = False) -> bytes:
    name = topic.encode()
    body = len(name).to_bytes(2, "big") + name + (mid.to_bytes(2, "big") if qos else b"") + payload
    return bytes([PUBLISH | (0x08 if dup else 0) | qos << 1]) + remaining_length(len(body)) + body


def length_bytes(packet: bytes) -> int:
    """How many bytes a packet's remaining length takes."""
    n = 1
    while packet[n] & 0x80:
        n += 1
    return n


async def read_packet(reader: asyncio.StreamReader) -> bytes:
    """One whole MQTT packet (fixed header included); IncompleteReadError at the end of the stream."""
    head = await reader.readexactly(1)
    length, shift, lb = 0, 0, b""
    while True:
        b = await reader.readexactly(1)
        lb += b
        length |= (b[0] & 0x7F) << shift
        shift += 7
        if b[0] < 0x80:
            break
    return head + lb + await reader.readexactly(length)


@dataclass
class Upstream:
    """What the gateway sent on one connection, as (packet type, packet id) of acknowledgements."""

    acks: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class BrokerProxy:
    broker: tuple[str, int]
    pieces: tuple[int, ...] = ()  # when set, the broker's bytes go to the gateway in pieces of these sizes, in turn
    own_mids: set[int] = field(default_factory=set)  # acknowledgements of these ids are kept from the broker
    connections: list[Upstream] = field(default_factory=list)
    downstream: list[bytes] = field(default_factory=list)  # the broker's PUBLISH packets, as forwarded
    _writer: asyncio.StreamWriter | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _open: list[asyncio.StreamWriter] = field(default_factory=list)
    port: int = 0

    async def serve(self) -> asyncio.Server:
        server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        return server

    async def insert(self, packet: bytes) -> None:
        """Put a packet into the broker's stream to the gateway, between two of the broker's packets."""
        assert self._writer is not None
        async with self._lock:
            self._writer.write(packet)
            await self._writer.drain()

    def cut(self) -> None:
        """Close both sides of the current connection, as a network failure would."""
        for w in self._open:
            w.transport.abort()

    def acks(self, kind: int) -> list[int]:
        return [mid for up in self.connections for k, mid in up.acks if k == kind]

    async def _connection(self, gw_reader: asyncio.StreamReader, gw_writer: asyncio.StreamWriter) -> None:
        br_reader, br_writer = await asyncio.open_connection(*self.broker)
        up = Upstream()
        self.connections.append(up)
        self._writer, self._open = gw_writer, [gw_writer, br_writer]
        tasks = [asyncio.create_task(self._down(br_reader, gw_writer)),
                 asyncio.create_task(self._up(gw_reader, br_writer, gw_writer, up))]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
        for w in (gw_writer, br_writer):
            w.transport.abort()

    async def _down(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            turn = 0
            while True:
                packet = await read_packet(reader)
                if packet[0] & 0xF0 == PUBLISH:
                    self.downstream.append(packet)
                async with self._lock:
                    if not self.pieces:
                        writer.write(packet)
                        await writer.drain()
                        continue
                    pos = 0
                    while pos < len(packet):
                        size = self.pieces[turn % len(self.pieces)]
                        turn += 1
                        writer.write(packet[pos:pos + size])
                        await writer.drain()
                        pos += size
                        await asyncio.sleep(0.006)  # longer than the gateway's pause: a read of its own

    async def _up(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  gw_writer: asyncio.StreamWriter, up: Upstream) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                packet = await read_packet(reader)
                kind = packet[0] & 0xF0
                if kind in (PUBACK, PUBREC, PUBCOMP):
                    mid = int.from_bytes(packet[2:4], "big")
                    up.acks.append((kind, mid))
                    if mid in self.own_mids:
                        if kind == PUBREC:  # the broker's part of QoS 2: release the message
                            await self.insert(bytes([PUBREL | 0x02, 2]) + packet[2:4])
                        continue
                writer.write(packet)
                await writer.drain()


@contextlib.asynccontextmanager
async def proxy(broker: tuple[str, int], **kw: object) -> AsyncIterator[BrokerProxy]:
    p = BrokerProxy(broker, **kw)  # type: ignore[arg-type]
    server = await p.serve()
    try:
        yield p
    finally:
        p.cut()
        server.close()


def short_site() -> str:
    return f"r{uuid.uuid4().hex[:6]}"  # short, so the smallest packet needs a one-byte length


async def start_behind(start_gateway: GatewayFactory, p: BrokerProxy, site: str, **overrides: object) -> RunningGateway:
    gw = await start_gateway(("127.0.0.1", p.port), **{"gateway.site": site, "ingest.max_payload_bytes": 4 * 2**20,
                                                      **overrides})
    await wait_for(lambda: p.connections != [])
    return gw


async def test_packets_split_anywhere_with_lengths_of_one_to_four_bytes(mosquitto, start_gateway: GatewayFactory):
    # Every packet reaches the gateway in pieces of 1 to 13 bytes and larger, so headers, topics and
    # payloads straddle its reads; the packets need one, two, three and four bytes for their length.
    site = short_site()
    async with proxy(mosquitto, pieces=(1, 2, 3, 5, 8, 13, 700, 65536)) as p:
        gw = await start_behind(start_gateway, p, site)
        topic = f"openegiz/{site}/oven/o1/thermal/telemetry"
        sizes = [127, 300, 20_000, 2_200_000]  # remaining lengths of 1, 2, 3 and 4 bytes
        sent = []
        async with aiomqtt.Client(*mosquitto) as client:
            for seq, size in enumerate(sizes * 2, start=1):
                qos = seq % 2  # QoS 0 and 1 alike
                body = telemetry(seq, {"n": seq}, ts=time.time()).encode()
                pad = size - 2 - len(topic) - 2 * qos - len(body)
                assert pad >= 0
                body += b" " * pad
                await client.publish(topic, body, qos=qos)
                sent.append((seq, qos))
            await client.publish(topic, telemetry(3, {"n": 3}), qos=1)  # a duplicate: dropped, acknowledged
        await wait_for(lambda: gw.service.ingest.accepted_messages == len(sent), timeout=60)
        await wait_for(lambda: gw.service.metrics.duplicates._value.get() == 1, timeout=30)
        assert len(p.downstream) == len(sent) + 1  # each reached the gateway through the proxy
        assert {length_bytes(pk) for pk in p.downstream} == {1, 2, 3, 4}
        _, thing = await gw.get(f"/api/v1/things/{gw.thing_id('o1')}")
        assert thing["features"]["thermal"]["properties"]["n"] == len(sent)
        assert gw.service.dead_letters.total == 0
        _, metrics = await gw.get("/metrics")  # the ingest's counts, read when scraped
        assert f'egiz_mqtt_messages_total{{kind="telemetry"}} {len(sent) + 1}.0' in metrics
        assert f"egiz_ingest_accepted_messages_total {len(sent)}.0" in metrics
        assert f"egiz_ingest_points_total {len(sent)}.0" in metrics
        # One connection throughout (no packet was refused), and each QoS 1 message acknowledged once.
        qos1 = sum(1 for _, q in sent if q) + 1
        await wait_for(lambda: len(p.acks(PUBACK)) == qos1, timeout=30)
        assert len(p.connections) == 1
        assert len(set(p.acks(PUBACK))) == qos1


async def test_a_redelivery_is_applied_once_and_acknowledged_after_the_commit(mosquitto,
                                                                                start_gateway: GatewayFactory):
    site = short_site()
    async with proxy(mosquitto) as p:
        gw = await start_behind(start_gateway, p, site, **{"buffer.commit_interval_ms": 10_000,
                                                           "buffer.commit_idle_ms": 10_000})
        topic = f"openegiz/{site}/oven/o1/thermal/telemetry"
        async with aiomqtt.Client(*mosquitto) as client:
            for seq in range(1, 21):
                await client.publish(topic, telemetry(seq, {"n": seq}), qos=1)
        ingest = gw.service.ingest
        await wait_for(lambda: ingest.accepted_messages == 20)
        assert p.acks(PUBACK) == []  # applied, not yet committed: nothing acknowledged
        p.cut()  # the broker keeps the 20 and sends them again on the next connection, marked dup
        await wait_for(lambda: len(p.connections) == 2, timeout=30)
        await wait_for(lambda: len(p.connections[1].acks) == 20, timeout=40)
        redelivered = p.downstream[20:]
        assert len(redelivered) == 20 and all(pk[0] & 0x08 for pk in redelivered)
        assert ingest.accepted_messages == 20  # the redeliveries were recognised, not applied again
        assert gw.service.metrics.duplicates._value.get() == 20
        _, thing = await gw.get(f"/api/v1/things/{gw.thing_id('o1')}")
        assert thing["features"]["thermal"]["properties"]["n"] == 20


async def test_qos_2_is_released_and_completed_after_the_commit(mosquitto, start_gateway: GatewayFactory):
    # The gateway subscribes with QoS 1, so a broker never sends it QoS 2; one that did gets the
    # full exchange, the completion only once the message is committed.
    site = short_site()
    async with proxy(mosquitto, own_mids={65000, 65001}) as p:
        gw = await start_behind(start_gateway, p, site, **{"buffer.commit_interval_ms": 5000,
                                                           "buffer.commit_idle_ms": 5000})
        await wait_for(lambda: gw.service.ingest.connected.is_set())
        await asyncio.sleep(0.2)  # the subscription is answered
        topic = f"openegiz/{site}/oven/o1/thermal/telemetry"
        commits = gw.service.metrics.buffer_commits._value.get
        before = commits()
        await p.insert(publish_packet(topic, telemetry(1, {"n": 1}).encode(), qos=2, mid=65000))
        await wait_for(lambda: gw.service.ingest.accepted_messages == 1)
        assert p.acks(PUBREC) == [65000] and p.acks(PUBCOMP) == []
        await wait_for(lambda: p.acks(PUBCOMP) == [65000], timeout=20)
        assert commits() > before
        await p.insert(publish_packet(topic, telemetry(2, {"n": 2}).encode(), qos=1, mid=65001, dup=True))
        await wait_for(lambda: gw.service.ingest.accepted_messages == 2)
        assert 65001 not in p.acks(PUBACK)
        await wait_for(lambda: 65001 in p.acks(PUBACK), timeout=20)
        assert len(p.connections) == 1


MALFORMED = {
    "topic longer than the packet": bytes([0x32, 6, 0x00, 0x40, ord("a"), ord("b"), 0xFD, 0xE8]),
    "a fifth length byte": bytes([0x32, 0x80, 0x80, 0x80, 0x80, 0x01]) + b"\x00" * 8,
    "an empty topic": bytes([0x32, 5, 0x00, 0x00, 0xFD, 0xE8, ord("x")]),
    "QoS 3": bytes([0x36, 5, 0x00, 0x01, ord("a"), 0xFD, 0xE8]),
    "no room for the packet id": bytes([0x32, 4, 0x00, 0x01, ord("a"), 0xFD]),
}


@pytest.mark.parametrize("name", list(MALFORMED))
async def test_a_malformed_publish_ends_the_connection_and_nothing_is_lost(name: str, mosquitto,
                                                                           start_gateway: GatewayFactory):
    site = short_site()
    async with proxy(mosquitto, own_mids={65000}) as p:
        gw = await start_behind(start_gateway, p, site)
        await asyncio.sleep(0.2)  # the subscription is answered
        topic = f"openegiz/{site}/oven/o1/thermal/telemetry"
        async with aiomqtt.Client(*mosquitto) as client:
            for seq in range(1, 6):
                await client.publish(topic, telemetry(seq, {"n": seq}), qos=1)
            await wait_for(lambda: gw.service.ingest.accepted_messages == 5)
            await p.insert(MALFORMED[name])
            await wait_for(lambda: len(p.connections) == 2, timeout=30)  # the gateway hung up and came back
            await wait_for(lambda: gw.service.ingest.connected.is_set(), timeout=30)
            for seq in range(6, 11):
                await client.publish(topic, telemetry(seq, {"n": seq}), qos=1)
        await wait_for(lambda: gw.service.ingest.accepted_messages == 10, timeout=30)
        assert 65000 not in p.acks(PUBACK)  # nothing acknowledged for the refused packet
        assert gw.service.dead_letters.total == 0
        _, thing = await gw.get(f"/api/v1/things/{gw.thing_id('o1')}")
        assert thing["features"]["thermal"]["properties"]["n"] == 10
