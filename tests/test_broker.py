"""The broker settings and launchers: a real Mosquitto on a free port with a generated config, and the
embedded fallback broker, checked for the behaviour the gateway relies on (persistent sessions that
survive a broker restart, a wide in-flight window, queues beyond Mosquitto's default, credentials,
retained messages and Last Will)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import re
import shutil
import ssl
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gateway.broker.embedded as embedded_mod
import gateway.broker.mosquitto as mosquitto_mod
from gateway.broker import (
    BrokerError,
    BrokerProcess,
    BrokerSettings,
    EmbeddedBroker,
    find_free_port,
    find_mosquitto,
    hash_password,
    render_mosquitto_conf,
    start_broker,
    topic_matches,
    verify_password,
    write_password_file,
)
from tests.helpers import all_stopped, need_mosquitto, private_mosquitto, receive

DOCS = Path(__file__).resolve().parent.parent / "docs" / "broker.md"
Broker = BrokerProcess | EmbeddedBroker
BrokerFactory = Callable[..., Awaitable[Broker]]


@pytest.fixture(params=["mosquitto", "embedded"])
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "mosquitto":
        need_mosquitto()
    return str(request.param)


@pytest.fixture
async def make_broker(tmp_path: Path, kind: str) -> AsyncIterator[BrokerFactory]:
    """Start brokers of the parametrized kind on free ports; all are stopped at the end."""
    count = itertools.count()
    async with all_stopped() as start:

        async def make(**overrides: Any) -> Broker:
            overrides.setdefault("allow_anonymous", True)
            s = BrokerSettings(port=find_free_port(), data_dir=tmp_path / f"broker-{next(count)}", **overrides)
            return await start(BrokerProcess(s) if kind == "mosquitto" else EmbeddedBroker(s))

        yield make


def unique() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def publish_many(port: int, topic: str, n: int) -> None:
    """Publish n QoS 1 messages pipelined (not one round trip each) and wait for every PUBACK."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=unique())
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        infos = [client.publish(topic, str(i).encode(), qos=1) for i in range(n)]
        for info in infos:
            info.wait_for_publish(10)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


# ----------------------------------------------------------------------------------- both brokers

async def test_qos1_round_trip_with_wildcards_and_a_retained_message(make_broker: BrokerFactory) -> None:
    b = await make_broker()
    base = unique()
    async with aiomqtt.Client(b.host, b.port) as sub, aiomqtt.Client(b.host, b.port) as pub:
        await sub.subscribe(f"{base}/+/telemetry/#", qos=1)
        await pub.publish(f"{base}/oven-001/telemetry", b"1", qos=1)
        await pub.publish(f"{base}/oven-001/status", b"not for us", qos=1)
        await pub.publish(f"{base}/mixer-002/telemetry/zone", b"2", qos=1)
        got = await receive(sub, 2)
        assert [(str(m.topic), m.payload, m.qos) for m in got] == [
            (f"{base}/oven-001/telemetry", b"1", 1), (f"{base}/mixer-002/telemetry/zone", b"2", 1)]
        await pub.publish(f"{base}/oven-001/status", b'{"state":"online"}', qos=1, retain=True)
    async with aiomqtt.Client(b.host, b.port) as late:
        await late.subscribe(f"{base}/+/status", qos=1)
        (m,) = await receive(late, 1)
        assert (str(m.topic), m.payload, m.retain, m.qos) == (f"{base}/oven-001/status", b'{"state":"online"}', True, 1)


async def test_offline_persistent_subscriber_gets_its_backlog_after_a_broker_restart(
        make_broker: BrokerFactory) -> None:
    # 1500 queued messages: more than Mosquitto's default queue of 1000, which would drop the rest.
    b = await make_broker()
    topic, client_id, n = f"{unique()}/telemetry", unique(), 1500
    async with aiomqtt.Client(b.host, b.port, identifier=client_id, clean_session=False) as sub:
        await sub.subscribe(topic, qos=1)
    await asyncio.to_thread(publish_many, b.port, topic, n)  # the gateway is away
    await b.restart()
    async with aiomqtt.Client(b.host, b.port, identifier=client_id, clean_session=False,
                              max_queued_incoming_messages=0) as sub:
        got = await receive(sub, n, timeout=15)
    assert [m.payload for m in got] == [str(i).encode() for i in range(n)]


async def test_a_subscriber_that_acknowledges_after_processing_gets_a_wide_window(make_broker: BrokerFactory) -> None:
    """The gateway sends PUBACK only after applying a message; the broker must not stop at 20 unacknowledged."""
    b = await make_broker()
    topic, n = f"{unique()}/telemetry", 300
    received: list[paho.MQTTMessage] = []
    subscribed = threading.Event()
    sub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=unique())
    sub.manual_ack_set(True)
    sub.on_message = lambda client, userdata, message: received.append(message)
    sub.on_subscribe = lambda *args: subscribed.set()
    sub.connect(b.host, b.port)
    sub.subscribe(topic, qos=1)
    sub.loop_start()
    try:
        assert await asyncio.to_thread(subscribed.wait, 5)
        await asyncio.to_thread(publish_many, b.port, topic, n)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while len(received) < n and loop.time() < deadline:
            await asyncio.sleep(0.02)
        assert len(received) == n  # all delivered although none is acknowledged yet
        for message in received:
            sub.ack(message.mid, message.qos)
    finally:
        sub.disconnect()
        sub.loop_stop()


async def test_password_file_right_password_connects_wrong_and_anonymous_are_refused(
        make_broker: BrokerFactory, tmp_path: Path) -> None:
    pw = tmp_path / "passwd"
    write_password_file(pw, {"egiz-gateway": "correct horse", "node-1": "battery staple"})
    assert pw.stat().st_mode & 0o777 == 0o600
    b = await make_broker(allow_anonymous=False, password_file=pw)
    async with aiomqtt.Client(b.host, b.port, username="egiz-gateway", password="correct horse") as c:
        await c.publish(f"{unique()}/x", b"ok", qos=1)
    for username, password in (("egiz-gateway", "battery staple"), ("nobody", "correct horse"), (None, None)):
        with pytest.raises(aiomqtt.MqttCodeError):
            async with aiomqtt.Client(b.host, b.port, username=username, password=password, timeout=5):
                pass


async def test_last_will_of_a_node_that_vanishes_is_published_and_retained(make_broker: BrokerFactory) -> None:
    b = await make_broker()
    topic = f"{unique()}/oven/oven-001/status"
    async with aiomqtt.Client(b.host, b.port) as watcher:
        await watcher.subscribe(topic, qos=1)
        node = await RawClient.connect(b.port, unique(), will=(topic, b'{"state":"offline"}', 1, True))
        node.writer.transport.abort()  # power cut: no DISCONNECT
        (m,) = await receive(watcher, 1)
        assert m.payload == b'{"state":"offline"}'
    async with aiomqtt.Client(b.host, b.port) as later:
        await later.subscribe(topic, qos=1)
        (m,) = await receive(later, 1)
        assert m.retain and m.payload == b'{"state":"offline"}'


async def test_a_clean_disconnect_publishes_no_will(make_broker: BrokerFactory) -> None:
    b = await make_broker()
    topic = f"{unique()}/status"
    async with aiomqtt.Client(b.host, b.port) as watcher:
        await watcher.subscribe(topic, qos=1)
        async with aiomqtt.Client(b.host, b.port, will=aiomqtt.Will(topic, b"offline", qos=1)):
            pass
        await watcher.publish(topic, b"marker", qos=1)
        (m,) = await receive(watcher, 1)
        assert m.payload == b"marker"


# ----------------------------------------------------------------------------------- mosquitto only

@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate and key for 127.0.0.1."""
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
    return cert, key


async def test_generated_config_with_every_option_is_accepted_and_serves_tls(
        tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    """Mosquitto refuses unknown options, so starting it checks every line we generate."""
    need_mosquitto()
    cert, key = certificate
    pw, acl = tmp_path / "passwd", tmp_path / "acl"
    write_password_file(pw, {"egiz-gateway": "s3cret"})
    acl.write_text("user egiz-gateway\ntopic readwrite openegiz/#\n")
    s = BrokerSettings(port=find_free_port(), data_dir=tmp_path / "data with space", password_file=pw, acl_file=acl,
                       tls_cert_file=cert, tls_key_file=key, tls_ca_file=cert)
    async with BrokerProcess(s) as b:
        tls = ssl.create_default_context(cafile=str(cert))
        async with aiomqtt.Client(b.host, b.port, username="egiz-gateway", password="s3cret", tls_context=tls) as c:
            await c.subscribe("openegiz/#", qos=1)
            await c.publish("openegiz/s/oven/1/t/telemetry", b"1", qos=1)
            (m,) = await receive(c, 1)
            assert m.payload == b"1"
    conf = b.conf_path.read_text()
    for option in ("max_inflight_messages 2000", "max_queued_messages 0", "persistence true", "acl_file",
                   "message_size_limit 262144", "certfile"):
        assert option in conf
    assert (s.data_dir / "mosquitto.db").exists()  # saved on SIGTERM


async def test_a_failed_start_says_why_with_mosquittos_own_words(tmp_path: Path) -> None:
    need_mosquitto()
    s = BrokerSettings(port=find_free_port(), data_dir=tmp_path / "b", password_file=tmp_path / "missing")
    b = BrokerProcess(s)
    with pytest.raises(BrokerError) as info:
        await b.start()
    assert "exited with code" in str(info.value) and "missing" in info.value.log_tail
    assert not b.running and isinstance(info.value, OSError)

    async with BrokerProcess(BrokerSettings(port=find_free_port(), data_dir=tmp_path / "c")) as first:
        taken = BrokerProcess(BrokerSettings(port=first.port, data_dir=tmp_path / "d"))
        with pytest.raises(BrokerError, match="already in use"):
            await taken.start()


async def test_kill_is_a_crash_and_the_broker_starts_again(tmp_path: Path) -> None:
    b = private_mosquitto(tmp_path)
    await b.start()
    pid = b.pid
    await b.kill()
    assert not b.running and pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    await b.start()
    try:
        async with aiomqtt.Client(b.host, b.port) as c:
            await c.publish(f"{unique()}/x", b"1", qos=1)
    finally:
        await b.stop()


def test_hashes_match_mosquitto_passwd_both_ways(tmp_path: Path) -> None:
    """Our `$7$` hashes are Mosquitto's: its own tool's hash verifies with ours."""
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        need_mosquitto()
        pytest.skip("needs mosquitto_passwd (package mosquitto)")
    pw = tmp_path / "passwd"
    pw.touch(mode=0o600)
    subprocess.run([tool, "-b", str(pw), "node-1", "s3cret"], check=True, capture_output=True)
    name, hashed = pw.read_text().strip().split(":", 1)
    assert name == "node-1" and hashed.startswith("$7$")
    assert verify_password("s3cret", hashed) and not verify_password("s3cret!", hashed)
    assert verify_password("pw", hash_password("pw")) and not verify_password("pw", "$7$bogus")


# ----------------------------------------------------------------------------------- choosing

async def test_start_broker_prefers_mosquitto_and_falls_back_to_the_embedded_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.broker")
    if find_mosquitto() is not None:
        b = await start_broker(BrokerSettings(port=find_free_port(), data_dir=tmp_path / "m", allow_anonymous=True))
        await b.stop()
        assert isinstance(b, BrokerProcess)
    # A machine without Mosquitto: nothing on PATH, nothing in sbin.
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(mosquitto_mod, "_SBIN_DIRS", ())
    b = await start_broker(BrokerSettings(port=find_free_port(), data_dir=tmp_path / "e", allow_anonymous=True))
    try:
        assert isinstance(b, EmbeddedBroker)
        assert "using the embedded broker" in caplog.text
        async with aiomqtt.Client(b.host, b.port) as c:
            await c.subscribe("demo/#", qos=1)
            await c.publish("demo/x", b"1", qos=1)
            assert (await receive(c, 1))[0].payload == b"1"
    finally:
        await b.stop()


async def test_the_embedded_broker_refuses_what_it_cannot_honour(tmp_path: Path) -> None:
    for overrides in ({"host": "0.0.0.0"}, {"acl_file": tmp_path / "acl"}):
        with pytest.raises(BrokerError, match=r"loopback|ACLs"):
            await EmbeddedBroker(BrokerSettings(port=find_free_port(), data_dir=tmp_path, **overrides)).start()


def test_invalid_settings_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="port") as info:
        BrokerSettings(port=0, data_dir=tmp_path, max_inflight_messages=70000, persistent_client_expiration="2 weeks")
    assert "max_inflight_messages" in str(info.value) and "persistent_client_expiration" in str(info.value)
    with pytest.raises(ValueError, match="user name"):
        write_password_file(tmp_path / "pw", {"bad:name": "x"})


def test_an_expiration_with_a_trailing_newline_is_refused(tmp_path: Path) -> None:
    assert BrokerSettings(port=1883, data_dir=tmp_path, persistent_client_expiration="14d")
    with pytest.raises(ValueError, match="persistent_client_expiration"):
        BrokerSettings(port=1883, data_dir=tmp_path, persistent_client_expiration="14d\n")


# ----------------------------------------------------------------------------------- docs

def test_every_setting_and_generated_option_is_documented(tmp_path: Path) -> None:
    text = DOCS.read_text()
    missing = [f.name for f in dataclasses.fields(BrokerSettings) if f"`{f.name}`" not in text]
    assert not missing, f"undocumented in docs/broker.md: {missing}"
    example = re.search(r"```conf\n(.*?)```", text, re.S)
    assert example is not None, "docs/broker.md needs a complete example mosquitto.conf"
    documented = {line.split()[0] for line in example.group(1).splitlines() if line and not line.startswith("#")}
    full = BrokerSettings(port=1883, data_dir=tmp_path, password_file=tmp_path / "p", acl_file=tmp_path / "a",
                          tls_cert_file=tmp_path / "c", tls_key_file=tmp_path / "k", tls_ca_file=tmp_path / "ca")
    generated = {line.split()[0] for line in render_mosquitto_conf(full).splitlines() if not line.startswith("#")}
    assert generated - {"user", "log_dest"} <= documented


# ----------------------------------------------------------------------------------- embedded only

class RawClient:
    """MQTT 3.1.1 over a bare socket, to send what real clients would not (and to vanish abruptly)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, client_id: str,
                      will: tuple[str, bytes, int, bool] | None = None) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        flags, payload = 0x02, _field(client_id.encode())
        if will is not None:
            topic, message, qos, retain = will
            flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
            payload += _field(topic.encode()) + _field(message)
        client = cls(reader, writer)
        client.send(0x10, _field(b"MQTT") + bytes((4, flags)) + (60).to_bytes(2, "big") + payload)
        assert await client.read() == (0x20, b"\x00\x00")
        return client

    def send(self, header: int, body: bytes) -> None:
        self.writer.write(bytes((header,)) + embedded_mod._varint(len(body)) + body)

    async def read(self) -> tuple[int, bytes]:
        header = (await self.reader.readexactly(1))[0]
        length, multiplier = 0, 1
        while True:
            digit = (await self.reader.readexactly(1))[0]
            length += (digit & 0x7F) * multiplier
            multiplier *= 128
            if not digit & 0x80:
                break
        return header, await self.reader.readexactly(length)

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def _field(raw: bytes) -> bytes:
    return len(raw).to_bytes(2, "big") + raw


async def _still_serves(port: int) -> None:
    c = await RawClient.connect(port, unique())
    c.send(0x82, b"\x00\x01" + _field(b"fz/#") + b"\x01")
    assert await c.read() == (0x90, b"\x00\x01\x01")
    c.send(0x32, _field(b"fz/1") + b"\x00\x02" + b"ok")
    packets = {await c.read(), await c.read()}
    assert (0x40, b"\x00\x02") in packets  # PUBACK
    assert any(h & 0xF0 == 0x30 and body.endswith(b"ok") for h, body in packets)
    await c.close()


class _Collect(logging.Handler):
    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# Packet bodies built from MQTT's own field types, so the examples get past the first length check.
mqtt_field = st.one_of(
    st.integers(0, 65535).map(lambda n: n.to_bytes(2, "big")),
    st.sampled_from(["MQTT", "a", "a/b", "+", "#", "a/#", "#/a", "a+", "", "$SYS/x", "fz/1"]).map(
        lambda t: _field(t.encode())),
    st.binary(max_size=4).map(_field),
    st.integers(0, 255).map(lambda b: bytes((b,))),
    st.binary(max_size=8),
)
packet = st.tuples(st.sampled_from([0x10, 0x30, 0x32, 0x34, 0x36, 0x40, 0x50, 0x62, 0x82, 0xA2, 0xC0, 0xE0, 0xF0]),
                   st.lists(mqtt_field, max_size=6).map(b"".join))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(after_connect=st.booleans(), packets=st.lists(packet, max_size=6), tail=st.binary(max_size=20))
def test_garbage_never_breaks_the_embedded_broker(after_connect: bool, packets: list[tuple[int, bytes]],
                                                  tail: bytes) -> None:
    """Whatever a client sends, the broker closes that connection at worst and keeps serving others."""
    handler = _Collect(logging.ERROR)
    errors = handler.records
    logging.getLogger("asyncio").addHandler(handler)  # asyncio logs exceptions raised in our callbacks

    async def scenario() -> None:
        # The embedded broker writes no files, so data_dir is never used.
        async with EmbeddedBroker(BrokerSettings(port=find_free_port(), data_dir=Path("."),
                                                 allow_anonymous=True)) as b:
            if after_connect:
                c = await RawClient.connect(b.port, unique())
            else:
                reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
                c = RawClient(reader, writer)
            for header, body in packets:
                c.send(header, body)
            c.writer.write(tail)
            c.writer.write_eof()
            await asyncio.wait_for(c.reader.read(), 5)  # the broker's EOF: it has handled every byte
            c.writer.transport.abort()
            await _still_serves(b.port)

    try:
        asyncio.run(scenario())
    finally:
        logging.getLogger("asyncio").removeHandler(handler)
    assert not errors, [r.getMessage() for r in errors]


def test_topic_filters_match_like_mqtt_says() -> None:
    assert topic_matches("a/+/c", "a/b/c") and topic_matches("a/#", "a") and topic_matches("+/+", "/x")
    assert not topic_matches("a/+", "a/b/c") and not topic_matches("#", "$SYS/x") and topic_matches("$SYS/#", "$SYS/x")
    tree = embedded_mod._TopicTree()
    for f in ("a/+/c", "a/#", "#", "$SYS/#", "x/y"):
        tree.add(f, f, 1)
    assert set(tree.match("a/b/c")) == {"a/+/c", "a/#", "#"}
    assert set(tree.match("$SYS/load")) == {"$SYS/#"}
    for f in ("a/+/c", "a/#", "#", "$SYS/#", "x/y"):
        tree.remove(f, f)
    assert tree.children == {}  # nothing left behind
