"""ConnectorManager: every PLC device of the gateway — from `gateway.toml` and from the REST API
(persisted in the registry's SQLite file) — each with its own runner; add, change and remove a
device while the others keep polling; writes routed to the device that owns a Thing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import json
import logging
import math
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import sqlite_utils

from gateway.common import settings
from gateway.common.errors import Conflict, Invalid, NotFound
from gateway.connectors.base import DeviceConfig, DeviceError, ProtocolSpec, SharedLinks, TagValue, WriteRefused
from gateway.connectors.config import ConnectorsSection, ModbusDevice, OpcUaDevice, S7Device, device_problems
from gateway.connectors.health import ConnectorMetrics, HealthSnapshot
from gateway.connectors.register_map import RegisterMapError, with_register_map
from gateway.connectors.runner import DeviceRunner, HealthSink
from gateway.sqlite import SqliteWorker

log = logging.getLogger(__name__)
TABLE = "connector_devices"
PROTOCOL_MODULES = {"modbus": "gateway.connectors.modbus", "opcua": "gateway.connectors.opcua",
                    "s7": "gateway.connectors.s7"}
DEVICE_TYPES: dict[str, type[DeviceConfig]] = {"modbus": ModbusDevice, "opcua": OpcUaDevice, "s7": S7Device}


def protocol_spec(protocol: str) -> ProtocolSpec:
    """The protocol's module, imported on first use (a gateway without S7 devices never loads snap7)."""
    module = importlib.import_module(PROTOCOL_MODULES[protocol])
    spec: ProtocolSpec = module.PROTOCOL
    return spec


def device_document(device: DeviceConfig) -> dict[str, Any]:
    """The device as JSON (the REST body and the stored form): `protocol` and every key not at its default."""
    doc: dict[str, Any] = {"protocol": device.protocol}
    doc.update(_non_default(device, skip=("tags",)))
    doc["tags"] = [_non_default(t) for t in device.tags]
    return doc


def _non_default(obj: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        if f.default is not dataclasses.MISSING and value == f.default:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue
        out[f.name] = value
    return out


def parse_device(doc: Any) -> DeviceConfig:
    """A device from a JSON document (`protocol` + the TOML keys), or Invalid naming every bad key."""
    if not isinstance(doc, dict):
        raise Invalid("the body must be a device object with protocol, name, url, thing, tags")
    protocol = doc.get("protocol")
    if protocol not in DEVICE_TYPES:
        raise Invalid(f"protocol must be one of {', '.join(DEVICE_TYPES)}")
    body = {k: v for k, v in doc.items() if k != "protocol"}
    device, problems = settings.build(DEVICE_TYPES[protocol], body)
    if device is not None:
        if not problems:
            try:
                device = with_register_map(device)
            except RegisterMapError as exc:
                problems.extend(exc.problems)
        reported = {key for key, _ in problems}  # a key of the wrong type is reported once, by its type
        problems.extend((k, m) for k, m in device_problems(device) if k not in reported)
    if problems or device is None:
        raise Invalid("; ".join(f"{k}: {m}" for k, m in problems) or "not a device", problems=problems)
    return device


@dataclass(frozen=True, slots=True)
class DeviceEntry:
    """A device as the API lists it: its config, where it comes from, its health."""

    device: DeviceConfig
    source: Literal["config", "api"]
    health: HealthSnapshot | None


class ConnectorManager:
    """Starts a runner per enabled device; hot-reloads one device at a time."""

    def __init__(self, section: ConnectorsSection, sqlite: SqliteWorker, sink: HealthSink, metrics: ConnectorMetrics,
                 *, thing_prefix: str, state_dir: Path | None = None) -> None:
        self._section = section
        self._sqlite = sqlite
        self._sink = sink
        self._m = metrics
        self._prefix = thing_prefix  # "{site}:"
        self._links = SharedLinks(state_dir)
        self._configured: dict[str, DeviceConfig] = {}
        self._stored: dict[str, DeviceConfig] = {}
        self._runners: dict[str, DeviceRunner] = {}
        self._lock = asyncio.Lock()  # one change at a time; polling goes on meanwhile

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        for _proto, _i, dev in self._section.all_devices():
            self._configured[dev.name] = with_register_map(dev)  # checked at config load
        for doc in await self._sqlite.call(_load):
            try:
                dev = parse_device(doc)
            except Invalid as exc:  # e.g. a file from a newer version: skip it loudly, keep the rest
                log.error("stored connector device is invalid; skipped", extra={"device": doc.get("name"),
                                                                                   "error": exc.detail})
                continue
            if dev.name in self._configured:
                log.warning("a stored device has the name of a configured one; the configured one wins",
                            extra={"device": dev.name})
                continue
            self._stored[dev.name] = dev
        for dev in self.devices_config():
            await self._start_runner(dev)
        if self._runners:
            log.info("connectors started", extra={"devices": len(self._runners)})

    async def stop(self) -> None:
        async with self._lock:
            runners = list(self._runners.values())
            self._runners.clear()
            await asyncio.gather(*(r.stop() for r in runners))

    def devices_config(self) -> list[DeviceConfig]:
        return [*self._configured.values(), *self._stored.values()]

    def _first_delay(self, dev: DeviceConfig) -> float:
        if dev.offset_s >= 0:
            return dev.offset_s
        if not self._section.stagger:
            return 0.0
        # spread by name: stable across restarts and reloads, independent of how many devices there are
        return (zlib.crc32(dev.name.encode()) / 2**32) * dev.poll_s

    async def _start_runner(self, dev: DeviceConfig) -> None:
        if not dev.enabled:
            return
        try:
            spec = protocol_spec(dev.protocol)
        except ImportError as exc:  # a protocol module or its library missing from this installation
            log.error("connector protocol not available; the device is not polled",
                      extra={"device": dev.name, "protocol": dev.protocol, "error": str(exc)})
            return
        runner = DeviceRunner(dev, spec, self._links, self._sink, self._m, first_delay_s=self._first_delay(dev))
        self._runners[dev.name] = runner
        await runner.start()

    # ----------------------------------------------------------------- reading
    def entries(self) -> list[DeviceEntry]:
        out = []
        for dev in self.devices_config():
            runner = self._runners.get(dev.name)
            out.append(DeviceEntry(dev, "config" if dev.name in self._configured else "api",
                                   runner.health.snapshot() if runner is not None else None))
        return out

    def entry(self, name: str) -> DeviceEntry:
        for e in self.entries():
            if e.device.name == name:
                return e
        raise NotFound(f"no connector device {name!r}")

    def runner(self, name: str) -> DeviceRunner | None:
        return self._runners.get(name)

    def runner_for_thing(self, thing_id: str) -> DeviceRunner | None:
        for runner in self._runners.values():
            if self._prefix + runner.device.thing == thing_id:
                return runner
        return None

    def owns(self, thing_id: str) -> bool:
        return any(self._prefix + d.thing == thing_id for d in self.devices_config())

    # ----------------------------------------------------------------- changing
    async def put(self, device: DeviceConfig) -> bool:
        """Add or replace an API device; only its own runner restarts. True when it was created."""
        try:
            protocol_spec(device.protocol)
        except ImportError as exc:
            raise Invalid(f"protocol {device.protocol} is not available in this installation ({exc})") from None
        async with self._lock:
            if device.name in self._configured:
                raise Conflict(f"{device.name!r} is defined in the configuration file; change it there")
            for other in self.devices_config():
                if other.name != device.name and other.thing == device.thing:
                    raise Conflict(f"Thing {device.thing!r} already belongs to device {other.name!r}")
            created = device.name not in self._stored
            doc = device_document(device)
            await self._sqlite.call(lambda db: _save(db, device.name, device.protocol, doc))
            old = self._runners.pop(device.name, None)
            if old is not None:
                await old.stop()
            self._stored[device.name] = device
            await self._start_runner(device)
            log.info("connector device " + ("added" if created else "changed"), extra={"device": device.name})
            return created

    async def delete(self, name: str) -> None:
        async with self._lock:
            if name in self._configured:
                raise Conflict(f"{name!r} is defined in the configuration file; remove it there")
            if name not in self._stored:
                raise NotFound(f"no connector device {name!r}")
            await self._sqlite.call(lambda db: _delete(db, name))
            del self._stored[name]
            runner = self._runners.pop(name, None)
            if runner is not None:
                await runner.stop()
            log.info("connector device removed", extra={"device": name})

    # ----------------------------------------------------------------- commands
    def check_write(self, thing_id: str, feature: str, desired: Mapping[str, Any]) -> DeviceRunner:
        """The runner that will write, after refusing (WriteRefused) anything it would not send."""
        runner = self.runner_for_thing(thing_id)
        if runner is None:
            raise WriteRefused(f"{thing_id} has no running connector device")
        for prop, value in desired.items():
            tag = runner.normaliser.tag(feature, prop)
            if tag is None or tag.calculated:
                raise WriteRefused(f"{runner.device.name} has no writable tag {feature}.{prop}")
            runner.normaliser.to_raw(tag, value)
        return runner

    async def write(self, thing_id: str, feature: str, desired: Mapping[str, Any]) -> dict[str, TagValue]:
        """Write each desired property; the values read back, by property."""
        runner = self.check_write(thing_id, feature, desired)
        out: dict[str, TagValue] = {}
        for prop, value in desired.items():
            out[prop] = await runner.write(feature, prop, value)
        return out


def _load(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    if TABLE not in db.table_names():
        return []
    return [json.loads(row["doc"]) for row in db[TABLE].rows_where(order_by="name")]


def _save(db: sqlite_utils.Database, name: str, protocol: str, doc: dict[str, Any]) -> None:
    db.table(TABLE).upsert({"name": name, "protocol": protocol, "doc": json.dumps(doc), "updated": time.time()},
                     pk="name")


def _delete(db: sqlite_utils.Database, name: str) -> None:
    if TABLE in db.table_names():
        db.table(TABLE).delete_where("name = ?", [name])


__all__ = ["ConnectorManager", "DeviceEntry", "DeviceError", "device_document", "parse_device", "protocol_spec"]
