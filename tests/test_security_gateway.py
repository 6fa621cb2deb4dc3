"""Attacks and losses on the gateway's side, each end to end against real processes: a real
Mosquitto, real paho clients, the real gateway service and its files."""

from __future__ import annotations

import asyncio
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import threading
import time
import tomllib
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import pytest
from aiohttp import web

from gateway.bus import EventBus
from gateway.config import GatewayConfig, load_config
from gateway.metrics import GatewayMetrics
from gateway.provision import Provisioner
from gateway.twin.registry import TwinRegistry
from tests.helpers import EGIZ, GatewayFactory, private_mosquitto, serve, telemetry, wait_for

# ------------------------------------------------------------------ 8. reordering on reconnect


class ReorderingNode:
    """A node as paho runs one: QoS 1, its own network thread, automatic reconnects. While the
    broker is away, publishes wait in paho's queue and are re-sent only after CONNACK (after
    `on_connect` has run), while the ones made after the socket reopens leave at once — so the
    broker receives seqs out of order. Like many nodes, this one also reports its current reading
    from `on_connect`, which makes the reordering happen at every reconnect."""

    def __init__(self, port: int, topic: str, rate_hz: float) -> None:
        self.topic = topic
        self.rate_hz = rate_hz
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"node-{uuid.uuid4().hex[:8]}",
                                  protocol=paho.MQTTv311)
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.acked: set[int] = set()
        self.seq = 0
        self.client.on_publish = lambda _c, _u, mid, _rc, _p: self.acked.add(mid)
        self.client.on_connect = lambda _c, _u, _f, _rc, _p: self.publish_next() if self.seq else None
        self._lock = threading.Lock()
        self.infos: list[paho.MQTTMessageInfo] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        period = 1.0 / self.rate_hz
        nxt = time.monotonic()
        while not self._stop.is_set():
            self.publish_next()
            nxt += period
            self._stop.wait(max(0.0, nxt - time.monotonic()))

    def publish_next(self) -> None:
        with self._lock:
            self.seq += 1
            payload = telemetry(self.seq, {"count": self.seq}, boot="b1")
            self.infos.append(self.client.publish(self.topic, payload, qos=1))

    def stop_publishing(self) -> None:
        self._stop.set()
        self._thread.join()

    def all_acknowledged(self) -> bool:
        return all(i.mid in self.acked for i in self.infos)  # PUBACK received

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.parametrize("run", [1, 2])
async def test_messages_reordered_by_a_reconnecting_client_are_all_stored_once(
        tmp_path: Path, start_gateway: GatewayFactory, run: int) -> None:
    broker = private_mosquitto(tmp_path)
    await broker.start()
    nodes: list[ReorderingNode] = []
    try:
        gw = await start_gateway(("127.0.0.1", broker.port))
        nodes = [ReorderingNode(broker.port, f"openegiz/{gw.site}/oven/oven-{i}/line/telemetry", 80)
                 for i in range(4)]
        for node in nodes:
            node.start()
        for _ in range(2):  # the broker restarts twice mid-stream (SIGTERM, saved persistence)
            await asyncio.sleep(1.5)
            await broker.stop()
            await asyncio.sleep(0.6)
            await broker.start()
        await asyncio.sleep(1.5)
        for node in nodes:
            node.stop_publishing()
        await wait_for(lambda: all(n.all_acknowledged() for n in nodes), timeout=30)
        published = sum(n.seq for n in nodes)
        ingest = gw.service.ingest
        await wait_for(lambda: ingest.accepted_messages == published, timeout=30)
        await gw.service.buffer.flush()

        def stored() -> list[tuple[str, int, int]]:
            rows = gw.service.buffer.store.reader().execute(
                "SELECT s.thing_id, p.seq, count(*) FROM points p JOIN series s ON p.series = s.id "
                "GROUP BY ALL").fetchall()
            return [(str(t), int(q), int(c)) for t, q, c in rows]

        rows = await gw.service.buffer.read(stored)
        for i, node in enumerate(nodes):
            thing = gw.thing_id(f"oven-{i}")
            counts = Counter({seq: c for t, seq, c in rows if t == thing})
            lost = [s for s in range(1, node.seq + 1) if counts[s] == 0]
            doubled = [s for s, c in counts.items() if c > 1]
            assert not lost and not doubled, f"{thing}: lost {lost[:20]}, doubled {doubled[:20]}"
            # the twin shows the newest reading, whatever order the late ones came in
            twin = gw.service.registry.require(thing).features["line"].properties
            assert twin["count"] == node.seq
        m = gw.service.metrics
        assert m.seq_late._value.get() > 0, "the publisher did not reorder: the test proved nothing"
        assert m.gaps._value.get() == m.seq_late._value.get()  # every gap was filled by a late message
        assert m.seq_too_old._value.get() == 0
    finally:
        for node in nodes:
            node.close()
        await broker.stop()


async def test_a_late_message_is_stored_but_does_not_overwrite_the_twin(
        mosquitto: tuple[str, int], start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(mosquitto)
    thermal = f"openegiz/{gw.site}/oven/oven-7/thermal/telemetry"
    power = f"openegiz/{gw.site}/oven/oven-7/power/telemetry"
    t0 = time.time() - 60
    async with aiomqtt.Client(*mosquitto) as client:
        await client.publish(thermal, telemetry(1, {"t": 1.0}, ts=t0 + 1), qos=1)
        await client.publish(power, telemetry(2, {"kw": 2.0}, ts=t0 + 2), qos=1)
        await client.publish(thermal, telemetry(5, {"t": 5.0}, ts=t0 + 5), qos=1)
        # seq 3 and 4 arrive late: thermal has seq 5 already (only its new property `door` is taken),
        # power had nothing newer than seq 2, so seq 4 is its newest value
        await client.publish(thermal, telemetry(3, {"t": 3.0, "door": "open"}, ts=t0 + 3), qos=1)
        await client.publish(power, telemetry(4, {"kw": 4.0}, ts=t0 + 4), qos=1)
        await client.publish(thermal, telemetry(3, {"t": 3.0}, ts=t0 + 3), qos=1)  # a redelivery
    ingest = gw.service.ingest
    await wait_for(lambda: ingest.accepted_messages == 5)
    thing = gw.service.registry.require(gw.thing_id("oven-7"))
    assert thing.features["thermal"].properties == {"t": 5.0, "door": "open"}
    assert thing.features["power"].properties == {"kw": 4.0}
    await gw.service.buffer.flush()
    _, hist = await gw.get(f"/api/v1/things/{thing.id}/history?from=0&feature=thermal&property=t&resolution=raw")
    assert hist["series"][0]["points"]["value"] == [1.0, 3.0, 5.0]  # history has every reading
    assert gw.service.metrics.duplicates._value.get() == 1


async def test_a_numeric_property_that_sends_nan_as_text_reads_back_as_written(
        mosquitto: tuple[str, int], start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(mosquitto)
    thermal = f"openegiz/{gw.site}/oven/oven-8/thermal/telemetry"
    t0 = time.time() - 60
    async with aiomqtt.Client(*mosquitto) as client:
        for seq, value in enumerate([20.5, "NaN", 21.0], start=1):
            await client.publish(thermal, telemetry(seq, {"t": value}, ts=t0 + seq), qos=1)
    await wait_for(lambda: gw.service.ingest.accepted_messages == 3)
    await gw.service.buffer.flush()
    thing_id = gw.thing_id("oven-8")
    _, hist = await gw.get(f"/api/v1/things/{thing_id}/history?from=0&resolution=raw")
    assert hist["series"][0]["points"]["value"] == [20.5, "NaN", 21.0]
    _, twin = await gw.get(f"/api/v1/things/{thing_id}")
    assert twin["features"]["thermal"]["properties"]["t"] == 21.0


# ------------------------------------------------------------------ 7. history bounds


async def test_history_times_out_of_range_are_a_400(
        mosquitto: tuple[str, int], start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(mosquitto)
    async with aiomqtt.Client(*mosquitto) as client:
        await client.publish(f"openegiz/{gw.site}/oven/oven-9/thermal/telemetry", telemetry(1, {"t": 1.0}), qos=1)
    await wait_for(lambda: gw.service.ingest.accepted_messages == 1)
    for bad in ("to=1e300", "to=inf", "from=-inf", "to=nan", "from=-5", "to=99999-01-01T00:00:00"):
        status, body = await gw.get(f"/api/v1/things/{gw.thing_id('oven-9')}/history?{bad}")
        assert status == 400, (bad, body)
        assert "epoch seconds" in body["detail"]
    status, _ = await gw.get(f"/api/v1/things/{gw.thing_id('oven-9')}/history?from=0&to=253402300799")
    assert status == 200


# ------------------------------------------------------------------ 6. provisioning


async def provisioning_endpoint(received: list[dict[str, Any]], *, answer: int = 200) -> tuple[web.AppRunner, int]:
    """A node's provisioning endpoint (real HTTP): what it was handed, in order."""

    async def provision(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.json_response({"ok": answer == 200}, status=answer)

    app = web.Application()
    app.router.add_post("/provision", provision)
    return await serve(app)


def registry_files_holding(data_dir: Path, secret: str) -> list[str]:
    """Files of the node registry that hold `secret` or that others than the owner may read."""
    files = list(data_dir.glob("nodes.sqlite*"))
    assert files
    return [f.name for f in files if secret.encode() in f.read_bytes() or f.stat().st_mode & 0o077]


async def test_credentials_stay_pinned_to_the_mac_and_address_seen_at_approval(tmp_path: Path) -> None:
    cfg = load_config(GatewayConfig, environ={}, overrides={
        "gateway.id": "gw-a", "gateway.site": "s1", "gateway.line": "l1", "auth.open": True,
        "gateway.data_dir": str(tmp_path), "mqtt.username": "egiz-gateway", "mqtt.password": "gateway-password",
        "broker.password_file": str(tmp_path / "passwords"), "broker.acl_file": str(tmp_path / "acl"),
    })
    node_got: list[dict[str, Any]] = []
    thief_got: list[dict[str, Any]] = []
    node_runner, node_port = await provisioning_endpoint(node_got, answer=503)  # the node is busy at first
    thief_runner, thief_port = await provisioning_endpoint(thief_got)
    registry = TwinRegistry(tmp_path / "registry.sqlite", EventBus(), flush_interval_s=60)
    await registry.start()
    metrics = GatewayMetrics()
    prov = Provisioner(cfg, registry, metrics)
    await prov.start()
    try:
        await prov.seen("oven-1", "oven", mac="02:00:00:00:00:01", address="127.0.0.1", port=node_port)
        node = await prov.approve("oven-1")
        assert node.delivered_at == 0 and node.password  # owed: the node did not take it yet
        db = tmp_path / "nodes.sqlite"
        assert oct(db.stat().st_mode & 0o777) == "0o600"
        # another device announces the same id from another MAC (and its own endpoint): it gets nothing
        await prov.seen("oven-1", "oven", mac="02:00:00:00:00:99", address="127.0.0.2", port=thief_port)
        await prov.seen("oven-1", "oven", mac="02:00:00:00:00:99", address="127.0.0.1", port=thief_port)
        await prov.seen("oven-1", "oven", mac="02:00:00:00:00:01", address="127.0.0.2", port=thief_port)
        assert thief_got == []
        assert metrics.provision_mismatch._value.get() == 3
        pinned = prov.require("oven-1")
        assert (pinned.mac, pinned.address, pinned.port) == ("02:00:00:00:00:01", "127.0.0.1", node_port)
        # the real node announces again when it is ready: it gets its credentials, and the
        # password is then gone from every file of the node registry
        await node_runner.cleanup()
        node_runner, node_port = await provisioning_endpoint(node_got)
        await prov.seen("oven-1", "oven", mac="02:00:00:00:00:01", address="127.0.0.1", port=node_port)
        password = node_got[-1]["password"]
        assert prov.require("oven-1").delivered_at > 0
        assert registry_files_holding(tmp_path, password) == []
    finally:
        await prov.stop()
        await registry.stop()
        await node_runner.cleanup()
        await thief_runner.cleanup()


# ------------------------------------------------------------------ 7. secrets in `egiz gateway check`


def test_gateway_check_masks_webhook_headers_and_every_other_secret(tmp_path: Path) -> None:
    secrets_ = ["Bearer hook-secret-0123456789", "x-secret-value-42", "mqtt-password-1", "admin-key-0123456789abcdef",
                "uplink-token-0123456789", "url-password-7"]
    (tmp_path / "gateway.toml").write_text(f"""
[gateway]
site = "s1"
line = "l1"
id = "gw-1"
data_dir = "{tmp_path / 'data'}"
[mqtt]
username = "egiz-gateway"
password = "{secrets_[2]}"
[auth]
api_keys = [{{ key = "{secrets_[3]}", role = "admin" }}]
[uplink]
url = "https://gw:{secrets_[5]}@aggregator.example:8090"
token = "{secrets_[4]}"
[[detect.webhooks]]
url = "https://hooks.example/anomaly"
headers = {{ Authorization = "{secrets_[0]}", X-Api-Key = "{secrets_[1]}" }}
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EGIZ_")}
    result = subprocess.run([EGIZ, "gateway", "check", "--config", str(tmp_path / "gateway.toml")],
                            capture_output=True, text=True, timeout=60, env=env, check=False)
    assert result.returncode == 0, result.stderr
    for secret in secrets_:
        assert secret not in result.stdout + result.stderr
    shown = json.loads(result.stdout)
    hook = shown["detect"]["webhooks"][0]
    assert hook["headers"] == {"Authorization": "***", "X-Api-Key": "***"}  # names stay readable
    assert hook["url"] == "https://hooks.example/anomaly"
    assert shown["uplink"]["url"] == "https://gw:***@aggregator.example:8090"
    assert shown["auth"]["api_keys"][0]["key"] == "***" and shown["auth"]["api_keys"][0]["role"] == "admin"
    assert shown["mqtt"]["username"] == "egiz-gateway" and shown["mqtt"]["password"] == "***"


# ------------------------------------------------------------------ 7. first boot keeps no secret


def firstboot_module() -> Any:
    """The image's first-boot program (a script without .py), loaded as a module."""
    path = Path(__file__).resolve().parents[1] / "images" / "firstboot" / "egiz-firstboot"
    loader = importlib.machinery.SourceFileLoader("egiz_firstboot", str(path))
    spec = importlib.util.spec_from_loader("egiz_firstboot", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_first_boot_blanks_secrets_written_as_dotted_keys_inline_tables_and_multiline_strings() -> None:
    source = """
# a site's egiz.toml, written by hand
uplink.url = "https://aggregator.example:8090"
uplink.token = "dotted-token-0123456789"
secrets = { admin_key = "inline-admin-key-0123", mqtt_password = 'literal-mqtt-pw' }

[gateway]
site = "izmir-bakery"
line = "line-a"
id = "gw-izmir-line-a"

[wifi]
ssid = "plant-floor"
psk = \"\"\"multi-line
wifi-passphrase\"\"\"

[[extra.api_keys]]
key = "array-table-key-42"
role = "admin"
"""
    applied = firstboot_module().without_secrets(source)
    for secret in ("dotted-token", "inline-admin-key", "literal-mqtt-pw", "wifi-passphrase", "array-table-key"):
        assert secret not in applied
    doc = tomllib.loads(applied)  # still TOML, every other value as it was
    assert doc["uplink"] == {"url": "https://aggregator.example:8090", "token": "<applied>"}
    assert doc["secrets"] == {"admin_key": "<applied>", "mqtt_password": "<applied>"}
    assert doc["gateway"] == {"site": "izmir-bakery", "line": "line-a", "id": "gw-izmir-line-a"}
    assert doc["wifi"] == {"ssid": "plant-floor", "psk": "<applied>"}
    assert doc["extra"]["api_keys"] == [{"key": "<applied>", "role": "admin"}]


# ------------------------------------------------------------------ 7. a node cannot grow a Thing without end


async def test_features_and_series_per_thing_are_capped_with_counted_rejections(
        mosquitto: tuple[str, int], start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(mosquitto, **{"ingest.max_features_per_thing": 3, "ingest.max_series_per_thing": 8})
    base = f"openegiz/{gw.site}/oven/oven-5"
    async with aiomqtt.Client(*mosquitto) as client:
        seq = 0
        for feature in ("f0", "f1", "f2", "f3", "f4"):  # a node inventing a new feature every message
            seq += 1
            await client.publish(f"{base}/{feature}/telemetry", telemetry(seq, {"v": 1.0}), qos=1)
        seq += 1  # an array property that would make 10 series at once
        await client.publish(f"{base}/f0/telemetry", telemetry(seq, {"v": 2.0, "zones": [1.0] * 10}), qos=1)
        seq += 1  # known features and properties still work, also with a few new series within the cap
        await client.publish(f"{base}/f1/telemetry", telemetry(seq, {"v": 3.0, "zones": [1.0] * 4}), qos=1)
    dead = gw.service.dead_letters
    await wait_for(lambda: dead.total == 3 and gw.service.ingest.accepted_messages == 4)
    thing = gw.service.registry.require(gw.thing_id("oven-5"))
    assert sorted(thing.features) == ["f0", "f1", "f2"]
    assert thing.features["f1"].properties["v"] == 3.0
    _, letters = await gw.get("/api/v1/deadletters?limit=10")
    reasons = sorted(item["reason"] for item in letters["items"])
    assert reasons == ["too_many_features", "too_many_features", "too_many_series"]
    assert all("ingest.max_" in item["detail"] for item in letters["items"])
    _, metrics = await gw.get("/metrics")
    assert 'egiz_ingest_rejected_total{reason="too_many_features"} 2.0' in metrics
    assert 'egiz_ingest_rejected_total{reason="too_many_series"} 1.0' in metrics
