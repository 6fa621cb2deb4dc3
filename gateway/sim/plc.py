"""Simulated PLCs: the simulator's equipment models (with the same fault injection and ground truth)
behind a Modbus server — one unit id per machine, as behind an RS-485 line or a Modbus TCP gateway.

The register map follows from the model: every number it measures is a float32 input register
(two registers each, from address 0, in the order the model reports them), every property a
command may set is a writable int16 holding register with scale 0.1 (from address 100). A property's
name is its flattened path with `[i]` as `_i` and `.` as `_` (`temperature_zones[1]` →
`temperature_zones_1`, `voltage.a` → `voltage_a`). A `dropout` fault makes the unit answer
"gateway target did not respond", as a real Modbus gateway does for a dead unit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.connectors.config import ModbusTag
from gateway.sim.clock import RunClock, local_hour
from gateway.sim.equipment import EquipmentModel, make_model
from gateway.sim.faults import ActiveFault, FaultItem, FaultSchedule, TruthRecord, TruthWriter
from gateway.sim.modbus_plc import ModbusPlcServer, RegisterMemory

log = logging.getLogger(__name__)
SETPOINT_BASE = 100


def tag_property(path: str) -> str:
    """`temperature_zones[1]` → `temperature_zones_1`; `voltage.a` → `voltage_a`."""
    return re.sub(r"\[(\d+)\]", r"_\1", path).replace(".", "_")


def _numbers(props: dict[str, Any]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for name, value in props.items():
        if isinstance(value, bool | str):
            continue
        if isinstance(value, int | float):
            out.append((name, float(value)))
        elif isinstance(value, list):
            out += [(f"{name}[{i}]", float(v)) for i, v in enumerate(value)]
        elif isinstance(value, dict):
            out += [(f"{name}.{k}", float(v)) for k, v in value.items()]
    return out


def register_map(model: EquipmentModel) -> tuple[ModbusTag, ...]:
    """The Modbus tags of a machine: its measurements, then its commandable setpoints."""
    probe = make_model(model.type, model.equipment_id, random.Random(0), model.line)
    tags: list[ModbusTag] = []
    address = 0
    commandable = set(model.commandable)
    for feature, props in probe.read(12.0, 0.0, 1.0).items():
        for path, _ in _numbers(props):
            if (feature, path) in commandable:
                continue
            tags.append(ModbusTag(feature=feature, property=tag_property(path), table="input", address=address,
                                  datatype="float32"))
            address += 2
    for i, ((feature, prop), (lo, hi)) in enumerate(sorted(model.commandable.items())):
        tags.append(ModbusTag(feature=feature, property=tag_property(prop), table="holding",
                              address=SETPOINT_BASE + i, datatype="int16", scale=0.1, writable=True, min=lo, max=hi))
    return tuple(tags)


@dataclass
class SimulatedPlc:
    """One machine behind one unit id: its model, its registers and its tags."""

    unit: int
    equipment_id: str
    model: EquipmentModel
    tags: tuple[ModbusTag, ...]
    memory: RegisterMemory = field(default_factory=RegisterMemory)
    written: dict[tuple[str, str], float] = field(default_factory=dict)  # setpoints as last put in registers

    def device_toml(self, site_port: int, host: str, poll_s: float) -> str:
        """The `[[connectors.modbus]]` table a gateway needs for this machine."""
        rows = []
        for t in self.tags:
            extra = f', scale = {t.scale}, writable = true, min = {t.min:g}, max = {t.max:g}' if t.writable else ""
            rows.append(f'  {{ feature = "{t.feature}", property = "{t.property}", table = "{t.table}", '
                        f'address = {t.address}, datatype = "{t.datatype}"{extra} }},')
        return "\n".join([
            "[[connectors.modbus]]", f'name = "{self.equipment_id}-plc"', f'url = "tcp://{host}:{site_port}"',
            f"unit = {self.unit}", f"poll_s = {poll_s:g}", f'thing = "{self.equipment_id}"',
            f'type = "{self.model.type}"', "tags = [", *rows, "]", ""])


@dataclass(frozen=True)
class PlcOptions:
    site: str
    line: str = "line-a"
    nodes: int = 1
    types: tuple[str, ...] = ("oven",)
    rate_hz: float = 1.0
    host: str = "127.0.0.1"
    port: int = 5020
    faults: tuple[FaultItem, ...] = ()
    truth_path: Any = None
    seed: int | None = None
    duration_s: float | None = None
    time_scale: float = 1.0
    first_index: int = 1  # equipment ids count from here (`oven-001`, like the MQTT fleet)

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= 247:
            raise ValueError("a Modbus line has at most 247 unit ids: --nodes must be 1..247")


def plan_plcs(opts: PlcOptions) -> list[SimulatedPlc]:
    plcs = []
    for i in range(opts.nodes):
        etype = opts.types[i % len(opts.types)]
        eid = f"{etype}-{opts.first_index + i:03d}"  # the MQTT fleet's names, so the same --faults apply
        rng = random.Random(f"{opts.seed}:{eid}") if opts.seed is not None else random.Random()
        model = make_model(etype, eid, rng, opts.line)
        plcs.append(SimulatedPlc(i + 1, eid, model, register_map(model)))
    return plcs


class PlcLine:
    """Runs the models on the simulated clock and keeps each unit's registers up to date."""

    def __init__(self, opts: PlcOptions) -> None:
        self.opts = opts
        self.plcs = plan_plcs(opts)
        self.by_id = {p.equipment_id: p for p in self.plcs}
        things = [(p.equipment_id, p.model.type) for p in self.plcs]
        rng = random.Random(f"{opts.seed}:faults") if opts.seed is not None else random.Random()
        self.schedule = FaultSchedule(opts.faults, things, rng)
        self.server = ModbusPlcServer({p.unit: p.memory for p in self.plcs}, host=opts.host, port=opts.port)
        self.ticks = 0

    def _sync_commands(self) -> None:
        """A setpoint written by the gateway reaches the model; one it refuses is put back."""
        for plc in self.plcs:
            for tag in plc.tags:
                if not tag.writable:
                    continue
                raw = plc.memory.get(tag)
                assert isinstance(raw, int | float)
                value = round(raw * tag.scale, 6)
                last = plc.written.get(tag.key)
                if last is not None and not math.isclose(value, last, abs_tol=1e-6):
                    outcome = plc.model.command(tag.feature, {tag.property: value})
                    if outcome.status != "ok":
                        log.warning("setpoint refused by the machine", extra={
                            "equipment_id": plc.equipment_id, "detail": outcome.detail})

    def tick(self, elapsed_s: float, dt_s: float, hour: float, truth: TruthWriter) -> None:
        now = time.time()
        self._sync_commands()
        started, ended = self.schedule.update(elapsed_s, now)
        for fault in started:
            self._start(fault)
        for fault in ended:
            self._end(fault, now, truth)
        for plc in self.plcs:
            readings = plc.model.read(hour, elapsed_s, dt_s)
            values = {(f, tag_property(p)): v for f, props in readings.items() for p, v in _numbers(props)}
            for tag in plc.tags:
                value = values.get(tag.key)
                if value is None:
                    continue
                if tag.writable:
                    raw = round(value / tag.scale)
                    plc.memory.put(tag, raw)
                    plc.written[tag.key] = round(raw * tag.scale, 6)
                else:
                    plc.memory.put(tag, value)
        self.ticks += 1

    def _silence(self, unit: int) -> Callable[[bool], None]:
        """A dropout makes the unit answer "gateway target did not respond" until the last one ends."""
        return lambda silent: (self.server.silent_units.add if silent else self.server.silent_units.discard)(unit)

    def _start(self, fault: ActiveFault) -> None:
        plc = self.by_id[fault.equipment_id]
        self.schedule.begin(fault, plc.model.faults, self._silence(plc.unit))
        log.info("fault started", extra={"thing": f"{self.opts.site}:{plc.equipment_id}", "fault": fault.kind})

    def _end(self, fault: ActiveFault, now: float, truth: TruthWriter) -> None:
        plc = self.by_id[fault.equipment_id]
        self.schedule.finish(fault, plc.model.faults, self._silence(plc.unit))
        self._record(fault, now, truth)

    def _record(self, fault: ActiveFault, end: float, truth: TruthWriter) -> None:
        truth.write(TruthRecord(f"{self.opts.site}:{fault.equipment_id}", fault.kind, round(fault.started_at, 3),
                                round(end, 3), fault.target.feature, tag_property(fault.target.property)))

    async def run(self, stop: asyncio.Event, on_ready: Callable[[PlcLine], None] | None = None) -> None:
        """Serve until `stop` (or the duration); faults still open at the end are written to the truth."""
        o = self.opts
        with TruthWriter(o.truth_path) as truth:
            self.tick(0.0, 1.0 / o.rate_hz * o.time_scale, local_hour(time.time()), truth)
            await self.server.start()
            if on_ready is not None:
                on_ready(self)
            loop = asyncio.get_running_loop()
            clock = RunClock.start(o.rate_hz, o.time_scale, o.duration_s)
            tick = 1
            try:
                while not stop.is_set() and loop.time() < clock.end:
                    due = clock.t0 + tick * clock.period
                    delay = due - loop.time()
                    if delay > 0:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), timeout=min(delay, clock.end - loop.time()))
                        continue
                    elapsed_s = tick * clock.dt_s
                    self.tick(elapsed_s, clock.dt_s, clock.hour(elapsed_s), truth)
                    tick += 1
            finally:
                now = time.time()
                for fault in self.schedule.active:
                    self._record(fault, now, truth)
                self.schedule.active.clear()
                await self.server.stop()


def gateway_toml(line: PlcLine, poll_s: float = 1.0, host: str | None = None) -> str:
    """The `[[connectors.modbus]]` tables for every simulated machine of the line."""
    return "\n".join(p.device_toml(line.opts.port, host or line.opts.host, poll_s) for p in line.plcs)


def device_tables(opts: PlcOptions, poll_s: float = 1.0) -> list[dict[str, Any]]:
    """The same tables as data, for a gateway configured in code (`egiz demo`)."""
    import tomllib

    text = "\n".join(p.device_toml(opts.port, opts.host, poll_s) for p in plan_plcs(opts))
    devices: list[dict[str, Any]] = tomllib.loads(text)["connectors"]["modbus"]
    return devices


__all__ = ["PlcLine", "PlcOptions", "SimulatedPlc", "device_tables", "gateway_toml", "plan_plcs", "register_map",
           "tag_property"]
