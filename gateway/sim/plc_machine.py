"""A simulated PLC in front of one machine: the equipment model sampled on a fixed clock, its faults
and ground truth, its values written into a PLC image (an OPC UA information model, an S7 data
block) that a protocol server serves, and the setpoint a client writes fed back to the model.

The protocol servers live beside this module (`plc_opcua.py`, `plc_s7.py`); each implements
`PlcImage`. A `dropout` fault takes the server off the network for the fault's duration, the way
a PLC that lost power or its switch port does; the other faults bend the signals exactly as they
do for the MQTT nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gateway.common.series import flatten
from gateway.sim.clock import RunClock
from gateway.sim.equipment import ActiveFault, make_model, production_level
from gateway.sim.faults import FaultItem, FaultSchedule, SimError, TruthRecord, TruthWriter
from gateway.sim.plc_image import PLC_TYPES, POINTS, PlcImage, PlcPoint, PlcValues

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class MachineOptions:
    """One simulated PLC: the machine it fronts, its clock, its faults; invalid values raise SimError."""

    site: str
    equipment_id: str
    type: str = "proofer"
    line: str = "line-a"
    rate_hz: float = 1.0
    faults: tuple[FaultItem, ...] = ()
    truth_path: Path | None = None
    duration_s: float | None = None
    seed: int | None = None
    time_scale: float = 1.0
    clock_start: float | None = None

    def __post_init__(self) -> None:
        if self.type not in POINTS:
            raise SimError(f"a simulated PLC fronts one of: {', '.join(PLC_TYPES)} (not {self.type!r})")
        if not 0.01 <= self.rate_hz <= 100:
            raise SimError("rate_hz must be 0.01..100")


@dataclass
class PlcStats:
    """What a run did, for the CLI's summary."""

    samples: int = 0
    faults: int = 0
    commands: int = 0
    outages: int = 0


def image_values(points: tuple[PlcPoint, ...], readings: Mapping[str, Mapping[str, object]]) -> PlcValues:
    """The points' values from one reading of the model (flattened paths); points the model lacks are left out."""
    flat: dict[tuple[str, str], object] = {}
    for feature, props in readings.items():
        for path, value in flatten(dict(props)):
            flat[(feature, path)] = value
    out: PlcValues = {}
    for p in points:
        value = flat.get((p.feature, p.path))
        if isinstance(value, bool | int | float | str):
            out[p.name] = value
    return out


class PlcSimulation:
    """Steps the model, its faults and its truth, and keeps the image up to date."""

    def __init__(self, options: MachineOptions, image: PlcImage) -> None:
        self.options = options
        self.image = image
        self.points = POINTS[options.type]
        rng = random.Random(f"{options.seed}:{options.equipment_id}") if options.seed is not None else random.Random()
        self.model = make_model(options.type, options.equipment_id, rng, options.line)
        frng = random.Random(f"{options.seed}:faults") if options.seed is not None else random.Random()
        self.schedule = FaultSchedule(options.faults, [(options.equipment_id, options.type)], frng)
        self.stats = PlcStats()
        self.down = False
        self._setpoints: PlcValues = {}

    async def run(self, stop: asyncio.Event) -> PlcStats:
        """Serve until `duration_s` is over or `stop` is set; the server is stopped on the way out."""
        o = self.options
        loop = asyncio.get_running_loop()
        clock = RunClock.start(o.rate_hz, o.time_scale, o.duration_s, o.clock_start)
        # building a server can take seconds (asyncua's address space): a stop meanwhile ends it at once
        starting = asyncio.ensure_future(self.image.start())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            return self.stats
        starting.result()  # a failure to listen is raised here
        tick = 0
        with TruthWriter(o.truth_path) as truth:
            try:
                while not stop.is_set() and loop.time() < clock.end:
                    elapsed_s = tick * clock.dt_s
                    await self._tick(elapsed_s, clock.dt_s, clock.hour(elapsed_s), truth)
                    tick += 1
                    due = clock.t0 + tick * clock.period
                    if due > loop.time():
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), timeout=min(due, clock.end) - loop.time())
                    else:
                        tick += int((loop.time() - due) / clock.period)  # overran: skip, do not burst
            finally:
                now = time.time()
                for fault in self.schedule.active:
                    self._record(fault, now, truth)
                if not self.down:
                    await self.image.stop()
        return self.stats

    async def _tick(self, elapsed_s: float, dt_s: float, hour: float, truth: TruthWriter) -> None:
        now = time.time()
        started, ended = self.schedule.update(elapsed_s, now)
        for fault in ended:
            await self._end(fault, now, truth)
        for fault in started:
            await self._start(fault)
        if self.down:
            return
        await self._take_commands()
        readings = self.model.read(hour, elapsed_s, dt_s)
        self.model.business_context(elapsed_s, 300.0)  # a new batch every 5 simulated minutes
        readings["state"] = {"running": production_level(hour) >= 0.5, "batch_count": self.model.batch}
        setpoint = getattr(self.model, "setpoint", None)
        for point in self.points:
            if point.writable and isinstance(setpoint, float) and point.path == "setpoint":
                readings.setdefault(point.feature, {})["setpoint"] = setpoint
        values = image_values(self.points, readings)
        self._setpoints.update({p.name: values[p.name] for p in self.points if p.writable and p.name in values})
        await self.image.publish(values, now)
        self.stats.samples += 1

    async def _take_commands(self) -> None:
        """A setpoint a client wrote becomes a command to the model; refused values are put back."""
        current = await self.image.written()
        for point in self.points:
            if not point.writable or point.name not in current:
                continue
            value = current[point.name]
            if _same(self._setpoints.get(point.name), value):
                continue
            first = point.name not in self._setpoints
            self._setpoints[point.name] = value
            if first:
                continue  # the image's initial value, before the first sample
            outcome = self.model.command(point.feature, {point.path: value})
            self.stats.commands += 1
            log.info("plc setpoint written", extra={"point": point.name, "value": value, "outcome": outcome.status})

    async def _start(self, fault: ActiveFault) -> None:
        if fault.kind == "dropout":
            if not self.down:
                self.down = True
                self.stats.outages += 1
                await self.image.stop()
        else:
            self.model.faults.append(fault)
        log.info("fault started", extra={"thing": f"{self.options.site}:{fault.equipment_id}", "fault": fault.kind})

    async def _end(self, fault: ActiveFault, now: float, truth: TruthWriter) -> None:
        if fault.kind == "dropout":
            still = any(f.kind == "dropout" for f in self.schedule.active)
            if self.down and not still:
                self.down = False
                await self.image.start()
        elif fault in self.model.faults:
            self.model.faults.remove(fault)
        self._record(fault, now, truth)

    def _record(self, fault: ActiveFault, end: float, truth: TruthWriter) -> None:
        truth.write(TruthRecord(f"{self.options.site}:{fault.equipment_id}", fault.kind, round(fault.started_at, 3),
                                round(end, 3), fault.target.feature, fault.target.property))
        self.stats.faults += 1


def _same(a: object, b: object) -> bool:
    """Equal, for floats within what a float32 register keeps."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-5 * max(1.0, abs(a))
    return a == b


@dataclass(frozen=True)
class PlcServe:
    """Which protocol a simulated PLC speaks and where it listens (OPC UA: its security and users)."""

    protocol: Literal["opcua", "s7"]
    host: str = "127.0.0.1"
    port: int = 0  # 0: the protocol's usual port (OPC UA 4840, S7 102)
    opcua_modes: tuple[str, ...] = ("None",)
    opcua_users: tuple[tuple[str, str], ...] = ()
    cert_dir: Path | None = None

    @property
    def listen_port(self) -> int:
        return self.port or {"opcua": 4840, "s7": 102}[self.protocol]


def make_image(serve: PlcServe, equipment_type: str) -> PlcImage:
    """The protocol server of a simulated PLC fronting a machine of `equipment_type`."""
    points = POINTS[equipment_type]
    if serve.protocol == "opcua":
        from gateway.sim.plc_opcua import OpcUaPlc, OpcUaServe

        return OpcUaPlc(OpcUaServe(host=serve.host, port=serve.listen_port, modes=serve.opcua_modes,
                                   users=dict(serve.opcua_users), anonymous=not serve.opcua_users,
                                   cert_dir=serve.cert_dir), equipment_type, points)
    from gateway.sim.plc_s7 import S7Plc

    return S7Plc(equipment_type, points, host=serve.host, port=serve.listen_port)


def describe(serve: PlcServe, equipment_type: str) -> list[str]:
    """What a client configures to read this PLC: one line per point (node id, or S7 address and type)."""
    prefix = equipment_type.capitalize()
    if serve.protocol == "opcua":
        return [f"ns=2;s={prefix}.{p.name}  ({p.kind}{', ' + p.unit if p.unit else ''}"
                f"{', writable' if p.writable else ''})" for p in POINTS[equipment_type]]
    from gateway.sim.plc_s7 import HEATER, LAYOUT, STATUS

    lines = [f"{a}  {a.datatype}  {name}{' (writable)' if p.writable else ''}"
             for p in POINTS[equipment_type] if (a := LAYOUT[equipment_type].get(p.name)) is not None
             for name in (p.name,)]
    return [*lines, f"{HEATER}  BOOL  HeaterOn", f"{STATUS}  INT  Status (1 running, 0 idle)"]
