"""Node provisioning: nodes that announce themselves wait as pending until an admin approves them.
Approval creates the Thing, gives the node its own MQTT user with an ACL entry limited to its own
topics, rewrites Mosquitto's password and ACL files, has the broker reload them, and hands the
credentials to the node over its provisioning endpoint. A node that is not approved has no user,
so the broker refuses it.

Approval pins the node to the MAC and address it announced while pending: credentials go only to
that address, and a later announcement of the same id from another MAC or address is ignored,
logged and counted (`egiz_provision_mismatch_total`). The hand-over itself is plain HTTP on the
line's network (docs/security.md); the password waits in `nodes.sqlite` (mode 0600) only until
the node has it, and is then overwritten, not just unlinked from a row."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import re
import secrets
import shlex
import signal
import sqlite3
import string
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from gateway.broker.passwords import hash_password
from gateway.common.errors import Conflict, EgizError, Invalid, NotFound
from gateway.common.names import TYPE_RE
from gateway.common.timefmt import iso_seconds
from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.twin.registry import TwinRegistry

log = logging.getLogger(__name__)

NODE_ID_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}\Z")  # an equipment id: a topic level and part of a user name
STATES = ("pending", "approved", "rejected")


class ProvisionError(EgizError):
    """The broker's files could not be written or reloaded."""

    code = "provision_failed"


@dataclass
class Node:
    """A node as the gateway knows it; `password` is kept only until the node has received it."""

    id: str
    type: str
    state: str = "pending"
    fw: str = ""
    mac: str = ""
    address: str = ""
    port: int = 0
    first_seen: float = 0.0
    last_seen: float = 0.0
    username: str = ""
    password_hash: str = ""
    password: str = ""
    delivered_at: float = 0.0
    delivery_error: str = ""

    def to_json(self, site: str) -> dict[str, Any]:
        return {"id": self.id, "thingId": f"{site}:{self.id}", "type": self.type, "state": self.state,
                "fw": self.fw, "mac": self.mac, "address": self.address, "port": self.port,
                "firstSeen": _iso(self.first_seen), "lastSeen": _iso(self.last_seen),
                "username": self.username or None, "credentialsDelivered": bool(self.delivered_at),
                "deliveryError": self.delivery_error or None}


def _iso(t: float) -> str | None:
    return iso_seconds(t) if t else None


_COLUMNS = tuple(Node.__dataclass_fields__)


class NodeStore:
    """Nodes in SQLite (`nodes.sqlite` in the data directory), so approvals survive restarts."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # a password waits here until its node has it: readable by the gateway's user only (SQLite
        # gives the -wal and -shm files the mode of the database file)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        for f in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if f.exists():  # also a file an older version left readable by others
                os.chmod(f, 0o600)
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA secure_delete=ON")  # a delivered password is overwritten with zeros
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS nodes (id TEXT PRIMARY KEY, type TEXT, state TEXT, fw TEXT, mac TEXT, "
            "address TEXT, port INTEGER, first_seen REAL, last_seen REAL, username TEXT, password_hash TEXT, "
            "password TEXT, delivered_at REAL, delivery_error TEXT)")

    def all(self) -> list[Node]:
        rows = self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM nodes ORDER BY id").fetchall()
        return [Node(*row) for row in rows]

    def get(self, node_id: str) -> Node | None:
        row = self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM nodes WHERE id = ?", (node_id,)).fetchone()
        return Node(*row) if row else None

    def put(self, node: Node) -> None:
        values = asdict(node)
        self.db.execute(f"INSERT OR REPLACE INTO nodes ({', '.join(_COLUMNS)}) VALUES "
                        f"({', '.join('?' for _ in _COLUMNS)})", [values[c] for c in _COLUMNS])

    def delete(self, node_id: str) -> None:
        self.db.execute("DELETE FROM nodes WHERE id = ?", (node_id,))

    def forget_old_versions(self) -> None:
        """Checkpoint and empty the write-ahead log, which still holds pages written before."""
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        self.db.close()


def fill_topic(template: str, **values: str) -> str:
    """A configured topic pattern with the known levels filled in and any other level a `+` wildcard."""
    out = []
    for literal, name, _, _ in string.Formatter().parse(template):
        out.append(literal)
        if name is not None:
            out.append(values.get(name, "+"))
    return "".join(out)


class Provisioner:
    """Pending, approved and rejected nodes, and the Mosquitto files that follow from them."""

    def __init__(self, config: GatewayConfig, registry: TwinRegistry, metrics: GatewayMetrics | None = None) -> None:
        self._m = metrics or GatewayMetrics()
        self.config = config
        self.registry = registry
        self.store = NodeStore(Path(config.gateway.data_dir) / "nodes.sqlite")
        self._lock = asyncio.Lock()
        self._http: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.config.discovery.provision_timeout_s)
        self._http = aiohttp.ClientSession(timeout=timeout)
        await asyncio.to_thread(self.write_broker_files)
        self.reload_broker()

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
        self.store.close()

    # ------------------------------------------------------------------ what discovery reports
    async def seen(self, node_id: str, node_type: str, *, fw: str = "", mac: str = "", address: str = "",
                   port: int = 0) -> Node | None:
        """A node announced itself: list it as pending if it is new; deliver credentials still owed to it."""
        if not NODE_ID_RE.match(node_id) or not TYPE_RE.match(node_type):
            log.warning("ignored a node announcing an invalid id or type",
                        extra={"node_id": node_id[:80], "type": node_type[:40], "address": address})
            return None
        now = time.time()
        async with self._lock:
            node = self.store.get(node_id)
            if node is None:
                node = Node(node_id, node_type, first_seen=now)
                log.info("new node waiting for approval", extra={"node_id": node_id, "type": node_type,
                                                                 "address": address})
            elif node.state == "approved" and (mac.lower() != node.mac.lower() or address != node.address):
                # approval pinned the node to what the admin saw: another device using its id gets nothing
                self._m.provision_mismatch.inc()
                log.warning("ignored an announcement of an approved node from another MAC or address",
                            extra={"node_id": node_id, "mac": mac[:40], "address": address[:64],
                                   "approved_mac": node.mac, "approved_address": node.address})
                return node
            node.fw, node.mac, node.address, node.port, node.last_seen = fw, mac, address, port, now
            if node.state == "pending":
                node.type = node_type
            self.store.put(node)
            owed = node.state == "approved" and bool(node.password)
        if owed:
            await self._deliver(node_id)
        return self.store.get(node_id)

    def expire(self) -> int:
        """Drop pending nodes not heard of for `discovery.node_stale_s`."""
        cutoff = time.time() - self.config.discovery.node_stale_s
        stale = [n.id for n in self.store.all() if n.state == "pending" and n.last_seen < cutoff]
        for node_id in stale:
            self.store.delete(node_id)
        return len(stale)

    # ------------------------------------------------------------------ admin actions
    def nodes(self) -> list[Node]:
        return self.store.all()

    def require(self, node_id: str) -> Node:
        node = self.store.get(node_id)
        if node is None:
            raise NotFound(f"no node {node_id!r}; nodes are listed once they announce themselves")
        return node

    async def approve(self, node_id: str) -> Node:
        """Create the Thing, issue fresh credentials, update the broker, hand them to the node."""
        async with self._lock:
            node = self.require(node_id)
            thing_id = self.config.thing_id(node.id)
            existing = self.registry.get(thing_id)
            if existing is not None and existing.type != node.type:
                raise Conflict(f"Thing {thing_id!r} exists with type {existing.type!r}, the node says {node.type!r}",
                               thing_id=thing_id)
            self.registry.ensure(thing_id, node.type, {"name": node.id, "line": self.config.gateway.line,
                                                       "fw": node.fw, "mac": node.mac})
            await self.registry.flush()
            password = secrets.token_urlsafe(24)
            node.state, node.username, node.password = "approved", f"node-{node.id}", password
            node.password_hash = hash_password(password)
            node.delivered_at, node.delivery_error = 0.0, ""
            self.store.put(node)
            await asyncio.to_thread(self.write_broker_files)
            self.reload_broker()
            log.info("node approved", extra={"node_id": node.id, "thing_id": thing_id, "username": node.username})
        await self._deliver(node_id)
        return self.require(node_id)

    async def reject(self, node_id: str) -> Node:
        """Refuse the node: it has no MQTT user (any it had is removed) and stays listed as rejected."""
        async with self._lock:
            node = self.require(node_id)
            was_approved = node.state == "approved"
            node.state, node.username, node.password_hash, node.password = "rejected", "", "", ""
            node.delivered_at, node.delivery_error = 0.0, ""
            self.store.put(node)
            if was_approved:
                await asyncio.to_thread(self.write_broker_files)
                self.reload_broker()
            log.info("node rejected", extra={"node_id": node.id})
            return node

    # ------------------------------------------------------------------ broker files
    def write_broker_files(self) -> None:
        write_broker_files(self.config, self.store.all())

    def reload_broker(self) -> None:
        """Tell Mosquitto to read its files again, as `broker.reload` says (nothing, a SIGHUP, a command)."""
        how, _, arg = self.config.broker.reload.partition(":")
        try:
            if how == "pidfile":
                os.kill(int(Path(arg).read_text().strip()), signal.SIGHUP)
            elif how == "command":
                subprocess.run(shlex.split(arg), check=True, capture_output=True, timeout=30)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            raise ProvisionError(f"the broker could not be reloaded ({self.config.broker.reload}): {exc}") from None

    # ------------------------------------------------------------------ credentials to the node
    async def _deliver(self, node_id: str) -> None:
        node = self.require(node_id)
        if node.state != "approved" or not node.password:
            return
        if not node.address or not node.port:
            self._delivery_failed(node, "the node announced no provisioning endpoint")
            return
        doc = {"site": self.config.gateway.site, "gateway": self.config.gateway.id,
               "broker": {"host": self.broker_host_for(node.address), "port": self.broker_port},
               "username": node.username, "password": node.password,
               "topic_prefix": fill_topic(self.config.ingest.status_topic,
                                          **topic_values(self.config, node)).rsplit("/", 1)[0]}
        host = f"[{node.address}]" if ":" in node.address else node.address
        assert self._http is not None, "start() first"
        try:
            async with self._http.post(f"http://{host}:{node.port}/provision", json=doc) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self._delivery_failed(node, str(exc) or type(exc).__name__)
            return
        node.password, node.delivered_at, node.delivery_error = "", time.time(), ""  # only the hash is kept
        self.store.put(node)
        self.store.forget_old_versions()
        log.info("credentials delivered to node", extra={"node_id": node.id, "address": node.address})

    def _delivery_failed(self, node: Node, error: str) -> None:
        node.delivery_error = error
        self.store.put(node)
        log.warning("credentials not delivered; retried when the node announces itself again",
                    extra={"node_id": node.id, "address": node.address, "error": error})

    @property
    def broker_port(self) -> int:
        return self.config.discovery.broker_port or self.config.mqtt.port

    def broker_host_for(self, node_address: str) -> str:
        """Where the node reaches our broker: the configured host, else our address on the node's network."""
        d, mqtt_host = self.config.discovery, self.config.mqtt.host
        if d.broker_host:
            return d.broker_host
        if mqtt_host not in ("127.0.0.1", "localhost", "::1", "0.0.0.0", ""):
            return mqtt_host
        return local_address_towards(node_address) or d.address or mqtt_host


def topic_values(config: GatewayConfig, node: Node) -> dict[str, str]:
    """The topic levels a node's own topics fill in; any other level of a pattern stays a `+`."""
    g = config.gateway
    return {"site": g.site, "line": g.line, "type": node.type, "equipment_id": node.id, "device_id": node.id}


def node_topics(config: GatewayConfig, node: Node) -> tuple[list[str], list[str]]:
    """(topics a node may publish to, topics it may read): its telemetry, status and command acks; its commands."""
    ing, values = config.ingest, topic_values(config, node)
    command = fill_topic(ing.command_topic, **values)
    return ([fill_topic(ing.telemetry_topic, **values), fill_topic(ing.status_topic, **values), command + "/ack"],
            [command])


def write_broker_files(config: GatewayConfig, nodes: list[Node]) -> None:
    """Rewrite Mosquitto's password and ACL files whole (atomically): the gateway's own user, which may
    use every topic, and every approved node, which may use only its own."""
    users: list[tuple[str, str]] = []
    acl = ["# Generated by the OpenEgiz Edge gateway; approving or rejecting a node rewrites it.", ""]
    mqtt = config.mqtt
    if mqtt.username:
        users.append((mqtt.username, hash_password(mqtt.password)))
        acl += [f"user {mqtt.username}", "topic readwrite #", ""]
    for node in nodes:
        if node.state != "approved" or not node.username:
            continue
        users.append((node.username, node.password_hash))
        writes, reads = node_topics(config, node)
        acl += [f"user {node.username}", *(f"topic write {t}" for t in writes),
                *(f"topic read {t}" for t in reads), ""]
    _write_atomically(config.password_file, "".join(f"{u}:{h}\n" for u, h in users))
    _write_atomically(config.acl_file, "\n".join(acl))


def local_address_towards(remote: str) -> str:
    """This host's IPv4 address on the same network as `remote`, or "" when none is."""
    import ifaddr

    try:
        target = ipaddress.ip_address(remote)
    except ValueError:
        return ""
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if not isinstance(ip.ip, str):
                continue
            net = ipaddress.ip_network(f"{ip.ip}/{ip.network_prefix}", strict=False)
            if target in net and not ipaddress.ip_address(ip.ip).is_loopback:
                return ip.ip
    return ""


def _write_atomically(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o640)
        os.replace(tmp, path)
    except OSError as exc:
        raise ProvisionError(f"cannot write {path}: {exc}") from None


def check_node_id(node_id: str) -> str:
    if not NODE_ID_RE.match(node_id):
        raise Invalid(f"{json.dumps(node_id)[:80]} is not a node id (1-63 of a-z 0-9 _ -)")
    return node_id
