"""Discovery and provisioning across a real network: the gateway (with its Mosquitto) in one network
namespace, simulated nodes in another, joined by a veth pair. A node announces itself over mDNS, is
listed as pending, is approved with `egiz nodes approve`, receives its own credentials and its telemetry
reaches the twin. The broker refuses clients with no or wrong credentials, drops a node's publishes
outside its own topics, and refuses a node once it is rejected."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.broker import BrokerSettings, render_mosquitto_conf
from gateway.config import GatewayConfig, load_config
from gateway.provision import write_broker_files
from tests.helpers import EGIZ, gateway_toml, need, wait_until

SITE = "izmir-bakery"
ADMIN_KEY = "admin-key-" + "0" * 16
GW_ADDR, NODE_ADDR = "10.231.7.1", "10.231.7.2"

REFUSED = {4, 5, 134, 135}  # bad user name or password / not authorised (3.1.1 and 5)

pytestmark = pytest.mark.timeout(240)


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=60)


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    need(os.geteuid() == 0 and shutil.which("ip") is not None,
         "needs root and iproute2 (network namespaces): run as root, apt-get install iproute2")
    need(shutil.which("mosquitto") is not None, "needs Mosquitto: apt-get install mosquitto")
    tag = secrets.token_hex(3)
    gw, node = f"egiz-gw-{tag}", f"egiz-node-{tag}"
    veth_gw, veth_node = f"vg{tag}", f"vn{tag}"
    try:
        sh("ip", "netns", "add", gw)
        sh("ip", "netns", "add", node)
        sh("ip", "link", "add", veth_gw, "type", "veth", "peer", "name", veth_node)
        for ns, veth, addr in ((gw, veth_gw, GW_ADDR), (node, veth_node, NODE_ADDR)):
            sh("ip", "link", "set", veth, "netns", ns)
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", veth)
            sh("ip", "-n", ns, "link", "set", veth, "up", "multicast", "on")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", veth)  # for mDNS to cross
        yield gw, node
    finally:
        for ns in (gw, node):
            sh("ip", "netns", "pids", ns, check=False)
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            sh("ip", "netns", "del", ns, check=False)


def start(ns: str, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    return subprocess.Popen(["ip", "netns", "exec", ns, *args], stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def in_ns(ns: str, code: str, *args: str, timeout: float = 60) -> Any:
    """Run Python in a namespace; its last stdout line is JSON."""
    r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code, *args], capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


HTTP_GET = """
import json, sys, urllib.request
req = urllib.request.Request(sys.argv[1], headers={"Authorization": "Bearer " + sys.argv[2]})
try:
    with urllib.request.urlopen(req, timeout=5) as r:
        print(json.dumps({"status": r.status, "body": json.loads(r.read())}))
except urllib.error.HTTPError as e:
    print(json.dumps({"status": e.code, "body": None}))
"""

# Connecting as a node: the client and its CONNACK code (None when none came within 10 s).
CONNECT = """
import asyncio, json, sys, time
import paho.mqtt.client as mqtt

def connect(user, password, host, port, client_id):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    if user is not None:
        c.username_pw_set(user, password)
    result = {}
    c.on_connect = lambda c, u, f, rc, p=None: result.setdefault("rc", int(rc.value if hasattr(rc, "value") else rc))
    c.connect(host, int(port), 10)
    deadline = time.time() + 10
    while "rc" not in result and time.time() < deadline:
        c.loop(0.1)
    return c, result.get("rc")
"""

# A node of the test's own: it provisions itself like a simulated node, then probes the broker.
PROBE = CONNECT + """
from gateway.sim.provisioning import SimulatedNodes

async def provision():
    nodes = SimulatedNodes([("mixer-902", "mixer")], address=sys.argv[1])
    await nodes.start()
    try:
        return (await asyncio.wait_for(nodes.wait(), 90))["mixer-902"]
    finally:
        await nodes.stop()

creds = asyncio.run(provision())
out = {"username": creds.username, "password": creds.password, "broker": [creds.host, creds.port]}

def probe(user, password):
    return connect(user, password, sys.argv[2], sys.argv[3], "probe-" + str(time.time()))

out["anonymous_rc"] = probe(None, None)[1]
out["wrong_password_rc"] = probe(creds.username, "not-the-password")[1]
c, out["own_rc"] = probe(creds.username, creds.password)
boot = "probe-boot"
own = {"ts": time.time(), "seq": 1, "boot": boot, "properties": {"rms": 1.234, "peak": 2.5}}
forged = {"ts": time.time(), "seq": 1, "boot": boot, "properties": {"temperature_zones": [999.0, 999.0, 999.0],
                                                                     "setpoint": 190.0}}
infos = [c.publish(sys.argv[4] + "/vibration/telemetry", json.dumps(own), qos=1),
         c.publish("openegiz/%s/oven/oven-001/thermal/telemetry" % creds.site, json.dumps(forged), qos=1)]
deadline = time.time() + 10
while not all(i.is_published() for i in infos) and time.time() < deadline:
    c.loop(0.1)
c.disconnect()
print(json.dumps(out))
"""

RECONNECT = CONNECT + """
print(json.dumps({"rc": connect(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], "probe-again")[1]}))
"""


def test_a_node_is_discovered_approved_provisioned_and_confined_to_its_topics(
        namespaces: tuple[str, str], tmp_path: Path) -> None:
    gw_ns, node_ns = namespaces
    data, broker_dir = tmp_path / "gw", tmp_path / "broker"
    broker_dir.mkdir()
    gw_password = secrets.token_urlsafe(16)
    config = gateway_toml(
        tmp_path / "gateway.toml", SITE, key=ADMIN_KEY, gateway={"id": "gw-netns", "data_dir": data},
        mqtt={"host": "127.0.0.1", "port": 1883, "username": "egiz-gateway", "password": gw_password},
        http={"host": "0.0.0.0", "port": 8080}, discovery={"enabled": True},
        broker={"reload": f"pidfile:{broker_dir / 'mosquitto.pid'}"}, detect={"enabled": False})
    cfg = load_config(GatewayConfig, config, environ={})
    write_broker_files(cfg, [])  # what the fleet tooling does before the broker first starts
    conf = render_mosquitto_conf(BrokerSettings(port=1883, host="0.0.0.0", data_dir=broker_dir,
                                                password_file=cfg.password_file, acl_file=cfg.acl_file))
    (broker_dir / "mosquitto.conf").write_text(conf + f"pid_file {broker_dir / 'mosquitto.pid'}\n")
    procs = [start(gw_ns, ["mosquitto", "-c", str(broker_dir / "mosquitto.conf")], tmp_path / "mosquitto.log")]
    try:
        wait_until("the broker's pid file", (broker_dir / "mosquitto.pid").exists, 10)
        procs.append(start(gw_ns, [EGIZ, "gateway", "run", "--config", str(config)], tmp_path / "gateway.log"))
        api = f"http://{GW_ADDR}:8080"
        wait_until("gateway ready", lambda: in_ns(gw_ns, HTTP_GET, f"{api}/ready", "")["status"] == 200, 30)
        # a simulated node, as `egiz sim --provision` runs it on the line
        procs.append(start(node_ns, [EGIZ, "sim", "--site", SITE, "--nodes", "1", "--rate", "2", "--provision",
                                     "--advertise-address", NODE_ADDR], tmp_path / "sim.log"))

        def nodes() -> dict[str, Any]:
            r = subprocess.run(["ip", "netns", "exec", gw_ns, EGIZ, "nodes", "list", "--json", "--config",
                                str(config)], capture_output=True, text=True, timeout=30)
            return {n["id"]: n for n in json.loads(r.stdout)} if r.returncode == 0 else {}

        pending = wait_until("the node listed as pending", lambda: nodes().get("oven-001"), 60)
        assert pending["state"] == "pending" and pending["type"] == "oven" and pending["address"] == NODE_ADDR
        thing = f"{SITE}:oven-001"
        assert in_ns(gw_ns, HTTP_GET, f"{api}/api/v1/things/{thing}", ADMIN_KEY)["status"] == 404

        r = subprocess.run(["ip", "netns", "exec", gw_ns, EGIZ, "nodes", "approve", "oven-001", "--config",
                            str(config)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "credentials delivered" in r.stdout, r.stdout + r.stderr
        acl = cfg.acl_file.read_text()
        assert f"user node-oven-001\ntopic write openegiz/{SITE}/oven/oven-001/+/telemetry\n" in acl
        assert f"topic read openegiz/{SITE}/oven/oven-001/cmd\n" in acl

        # what a technician sees on the node's network
        r = subprocess.run(["ip", "netns", "exec", node_ns, EGIZ, "discover", "--json", "--seconds", "3"],
                           capture_output=True, text=True, timeout=60)
        found = json.loads(r.stdout)
        assert [(g["gateway"], g["site"], g["line"], g["port"]) for g in found["gateways"]] == \
            [("gw-netns", SITE, "line-a", 8080)], found
        assert [(b["addresses"], b["port"]) for b in found["brokers"]] == [([GW_ADDR], 1883)], found
        assert [(n["id"], n["type"]) for n in found["nodes"]] == [("oven-001", "oven")], found

        def telemetry() -> Any:
            doc = in_ns(gw_ns, HTTP_GET, f"{api}/api/v1/things/{thing}", ADMIN_KEY)["body"]
            return doc if doc and doc["features"].get("thermal", {}).get("properties") else None

        doc = wait_until("the node's telemetry in the twin", telemetry, 60)
        assert len(doc["features"]["thermal"]["properties"]["temperature_zones"]) == 3

        # the test's own node: provisioned the same way, then tries what it must not do
        approve_probe = subprocess.Popen(["ip", "netns", "exec", gw_ns, sys.executable, "-c", f"""
import json, subprocess, time
for _ in range(120):
    r = subprocess.run([{EGIZ!r}, "nodes", "list", "--json", "--config", {str(config)!r}], capture_output=True)
    if r.returncode == 0 and any(n["id"] == "mixer-902" for n in json.loads(r.stdout)):
        subprocess.run([{EGIZ!r}, "nodes", "approve", "mixer-902", "--config", {str(config)!r}], check=True)
        break
    time.sleep(0.5)
"""])
        probe = in_ns(node_ns, PROBE, NODE_ADDR, GW_ADDR, "1883", f"openegiz/{SITE}/mixer/mixer-902", timeout=120)
        approve_probe.wait(30)
        assert probe["broker"] == [GW_ADDR, 1883]
        # CONNACK refusals, as MQTT 3.1.1 codes or the reason codes paho maps them to
        assert probe["anonymous_rc"] in REFUSED, probe
        assert probe["wrong_password_rc"] in REFUSED, probe
        assert probe["own_rc"] == 0, probe

        def own_reading() -> Any:
            body = in_ns(gw_ns, HTTP_GET, f"{api}/api/v1/things/{SITE}:mixer-902", ADMIN_KEY)["body"]
            return body and body["features"].get("vibration", {}).get("properties", {}).get("rms") == 1.234

        wait_until("the probe's own reading in the twin", own_reading, 20)
        time.sleep(1.0)  # the forged message, had it passed, would have arrived with the other one
        oven = in_ns(gw_ns, HTTP_GET, f"{api}/api/v1/things/{thing}", ADMIN_KEY)["body"]
        zones = oven["features"]["thermal"]["properties"]["temperature_zones"]
        assert 999.0 not in zones, "a node wrote to another node's topic"
        history = in_ns(gw_ns, HTTP_GET, f"{api}/api/v1/things/{thing}/history?feature=thermal"
                        "&property=temperature_zones[0]&from=0", ADMIN_KEY)["body"]
        assert history["series"] and max(history["series"][0]["points"]["value"]) < 500

        # rejected: its user is gone from the broker
        r = subprocess.run(["ip", "netns", "exec", gw_ns, EGIZ, "nodes", "reject", "mixer-902", "--config",
                            str(config)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "node-mixer-902" not in cfg.password_file.read_text()
        again = wait_until("the rejected node refused", lambda: (lambda d: d if d.get("rc") in REFUSED else None)(
            in_ns(node_ns, RECONNECT, probe["username"], probe["password"], GW_ADDR, "1883")), 15)
        assert again["rc"] in REFUSED
        assert nodes()["mixer-902"]["state"] == "rejected"
    finally:
        for p in reversed(procs):
            stop(p)
        for name in ("gateway.log", "sim.log", "mosquitto.log"):
            log = tmp_path / name
            if log.exists():
                print(f"--- {name}\n{log.read_text(errors='replace')[-3000:]}")
