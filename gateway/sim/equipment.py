"""Signal models of food-line equipment: plausible readings with noise, a daily production cycle and faults.

Each model turns simulated time into readings of its features and bends them the way real failures
do (a drifting probe, a stuck sensor, a phase losing voltage, a zone running hot). Nothing here does
I/O or reads the clock, so a model is cheap, testable, and reproducible from its random generator.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

PropertyValue = float | str | bool | list[float] | dict[str, float]
Properties = dict[str, PropertyValue]
Readings = dict[str, Properties]  # feature name -> its properties

EQUIPMENT_TYPES = ("oven", "mixer", "conveyor", "proofer", "cooler")
BUSINESS_CONTEXT = "business_context"
RECIPES = ("white-bread", "whole-wheat", "baguette", "croissant", "simit", "pide", "rye", "brioche")

# (hour of day, production level) of a bakery line: idle at night, ramp-up, a morning and an evening
# shift with a cleaning changeover between them, ramp-down. Levels are interpolated linearly.
DAILY_PROFILE: tuple[tuple[float, float], ...] = (
    (0.0, 0.0), (4.0, 0.0), (5.0, 1.0), (12.75, 1.0), (13.0, 0.3), (13.5, 0.3), (13.75, 1.0),
    (21.5, 1.0), (22.5, 0.0), (24.0, 0.0),
)


def production_level(hour: float) -> float:
    """How hard the line works at `hour` (0-24, local time of the simulated clock): 0 idle, 1 full."""
    hour %= 24.0
    for (h0, v0), (h1, v1) in itertools.pairwise(DAILY_PROFILE):
        if h0 <= hour < h1:
            return v0 + (v1 - v0) * (hour - h0) / (h1 - h0)
    return DAILY_PROFILE[-1][1]


@dataclass(frozen=True)
class FaultTarget:
    """Where a fault shows: a feature and the stored (flattened) property path the truth file names."""

    feature: str
    property: str
    scale: float  # a typical size of the fault in the property's unit; the default magnitude


# The property each type's generic faults (drift, spike, stuck) act on.
KEY_TARGETS: dict[str, FaultTarget] = {
    "oven": FaultTarget("thermal", "temperature_zones[1]", 20.0),
    "mixer": FaultTarget("vibration", "rms", 1.5),
    "conveyor": FaultTarget("drive", "motor_current", 2.0),
    "proofer": FaultTarget("climate", "temperature", 6.0),
    "cooler": FaultTarget("climate", "temperature", 6.0),
}
_OVERTEMPERATURE = {
    "oven": FaultTarget("thermal", "temperature_zones[1]", 25.0),
    "proofer": FaultTarget("climate", "temperature", 8.0),
    "cooler": FaultTarget("climate", "temperature", 8.0),
}
_PHASE_IMBALANCE = {"oven": FaultTarget("electrical", "voltage.c", 25.0)}
_DROPOUT = FaultTarget("connectivity", "state", 0.0)


def fault_target(kind: str, equipment_type: str) -> FaultTarget | None:
    """Where fault `kind` shows on `equipment_type`, or None when it cannot happen to that type."""
    if kind == "dropout":
        return _DROPOUT
    if kind == "overtemperature":
        return _OVERTEMPERATURE.get(equipment_type)
    if kind == "phase_imbalance":
        return _PHASE_IMBALANCE.get(equipment_type)
    return KEY_TARGETS.get(equipment_type)


@dataclass
class ActiveFault:
    """One fault instance on one node, timed on the simulated clock (seconds since the run began)."""

    kind: str
    equipment_id: str
    start_s: float
    end_s: float
    magnitude: float
    target: FaultTarget
    started_at: float = 0.0  # wall-clock epoch when it began, for the ground truth
    frozen: Properties | None = None  # what a stuck sensor keeps reporting

    def ramp(self, elapsed_s: float) -> float:
        """0→1 over the first third of the fault (at most 60 s): real failures build up, they do not jump."""
        ramp_s = min(60.0, (self.end_s - self.start_s) / 3) or 1.0
        return min(1.0, max(0.0, (elapsed_s - self.start_s) / ramp_s))

    def progress(self, elapsed_s: float) -> float:
        """0→1 over the whole fault, for slow linear departures."""
        return min(1.0, max(0.0, (elapsed_s - self.start_s) / max(self.end_s - self.start_s, 1e-9)))


@dataclass(frozen=True)
class CommandOutcome:
    """What a node answers to a `cmd`: the status and the values it now reports."""

    status: str  # "ok" | "rejected"
    properties: Properties
    detail: str | None = None


def _lag(value: float, target: float, dt_s: float, tau_s: float) -> float:
    """First-order lag: heavy machines approach their target exponentially, never instantly."""
    return value + (target - value) * (1.0 - math.exp(-dt_s / tau_s))


def _add(amount: float) -> Callable[[float], float]:
    return lambda value: value + amount


def _bend(props: Properties, path: str, fn: Callable[[float], float]) -> None:
    """Apply `fn` to one number at a flattened path (`rms`, `temperature_zones[1]`, `voltage.c`)."""
    if path.endswith("]"):
        name, index = path[:-1].split("[")
        values = props.get(name)
        if isinstance(values, list):
            values = list(values)
            values[int(index)] = round(fn(values[int(index)]), 3)
            props[name] = values
        return
    if "." in path:
        name, key = path.split(".", 1)
        named = props.get(name)
        if isinstance(named, dict):
            named = dict(named)
            named[key] = round(fn(named[key]), 3)
            props[name] = named
        return
    value = props.get(path)
    if isinstance(value, int | float) and not isinstance(value, bool):
        props[path] = round(fn(float(value)), 3)


class EquipmentModel:
    """One machine's signals; subclasses say what the machine measures and how it behaves."""

    type: ClassVar[str]
    features: ClassVar[tuple[str, ...]]
    # (feature, property) -> allowed range of values a `cmd` may set
    commandable: ClassVar[dict[tuple[str, str], tuple[float, float]]]

    def __init__(self, equipment_id: str, rng: random.Random, line: str = "line-a") -> None:
        self.equipment_id = equipment_id
        self.rng = rng
        self.line = line
        self.faults: list[ActiveFault] = []
        self.batch = 0
        self._next_batch_at = 0.0

    def read(self, hour: float, elapsed_s: float, dt_s: float) -> Readings:
        """Readings of every feature at `hour` of the simulated day, `elapsed_s` into the run, `dt_s` after the last."""
        out = self._read(production_level(hour), elapsed_s, dt_s)
        for fault in self.faults:
            if fault.start_s <= elapsed_s < fault.end_s:
                self._apply(fault, out, elapsed_s)
        return out

    def business_context(self, elapsed_s: float, every_s: float) -> Properties | None:
        """A new production batch every `every_s` simulated seconds; None while the batch goes on."""
        if elapsed_s < self._next_batch_at:
            return None
        self._next_batch_at = elapsed_s + every_s
        self.batch += 1
        return {
            "current_batch": f"{self.line}-{self.equipment_id}-{self.batch:05d}",
            "recipe": self.rng.choice(RECIPES),
            "operator_id": f"op-{self.rng.randint(1, 40):03d}",
        }

    def command(self, feature: str, desired: object) -> CommandOutcome:
        """Apply desired properties the machine supports; reject the whole command otherwise."""
        if not isinstance(desired, dict) or not desired:
            return CommandOutcome("rejected", {}, "desiredProperties must be a non-empty object")
        changes: dict[str, float] = {}
        for name, value in desired.items():
            bounds = self.commandable.get((feature, str(name)))
            if bounds is None:
                return CommandOutcome("rejected", {}, f"{feature}.{name} cannot be set on a {self.type}")
            if not isinstance(value, int | float) or isinstance(value, bool) or not bounds[0] <= value <= bounds[1]:
                return CommandOutcome("rejected", {}, f"{feature}.{name} must be a number in {bounds[0]}..{bounds[1]}")
            changes[str(name)] = float(value)
        for name, value in changes.items():
            self._set(feature, name, value)
        return CommandOutcome("ok", dict(changes))

    # ---------------------------------------------------------------- per type
    def _read(self, level: float, elapsed_s: float, dt_s: float) -> Readings:
        raise NotImplementedError

    def _set(self, feature: str, name: str, value: float) -> None:
        raise NotImplementedError

    def _apply_specific(self, fault: ActiveFault, out: Readings, ramp: float) -> None:
        """Type-specific faults (phase imbalance, overtemperature); the generic ones are handled here."""

    # ---------------------------------------------------------------- faults
    def _apply(self, fault: ActiveFault, out: Readings, elapsed_s: float) -> None:
        target = fault.target
        props = out.get(target.feature)
        if fault.kind == "stuck" and props is not None:
            if fault.frozen is None:
                fault.frozen = dict(props)
            out[target.feature] = dict(fault.frozen)
        elif fault.kind == "drift" and props is not None:
            _bend(props, target.property, _add(fault.magnitude * fault.progress(elapsed_s)))
        elif fault.kind == "spike" and props is not None:
            if self.rng.random() < 0.15:
                size = fault.magnitude * self.rng.uniform(0.8, 1.2) * (1 if self.rng.random() < 0.8 else -1)
                _bend(props, target.property, _add(size))
        elif fault.kind in ("overtemperature", "phase_imbalance"):
            self._apply_specific(fault, out, fault.ramp(elapsed_s))
        # dropout has no signal effect: the node is simply silent


def _noise(rng: random.Random, sigma: float) -> float:
    return rng.gauss(0.0, sigma)


class OvenModel(EquipmentModel):
    """A three-zone tunnel oven: zone temperatures lag toward the setpoint; heaters draw three-phase power."""

    type = "oven"
    features = ("thermal", "electrical")
    commandable = {("thermal", "setpoint"): (50.0, 300.0)}
    STANDBY_C = 80.0  # ovens are kept warm overnight
    ZONE_OFFSETS = (-3.0, 0.0, 2.0)

    def __init__(self, equipment_id: str, rng: random.Random, line: str = "line-a") -> None:
        super().__init__(equipment_id, rng, line)
        self.setpoint = 190.0
        self._zones: list[float] | None = None
        self._phase_offsets = {p: rng.uniform(-1.5, 1.5) for p in "abc"}

    def _set(self, feature: str, name: str, value: float) -> None:
        self.setpoint = value

    def _read(self, level: float, elapsed_s: float, dt_s: float) -> Readings:
        rng = self.rng
        target = self.STANDBY_C + (self.setpoint - self.STANDBY_C) * level
        if self._zones is None:  # start in steady state rather than from cold
            self._zones = [target + off * level for off in self.ZONE_OFFSETS]
        self._zones = [_lag(z, target + off * level, dt_s, 240.0) for z, off in zip(self._zones, self.ZONE_OFFSETS,
                                                                                     strict=True)]
        mean = sum(self._zones) / 3
        # Heater power: losses at the current temperature plus what heating up still needs,
        # modulated by the thermostat's on/off cycling.
        power = 0.18 * (mean - 20.0) + 0.6 * max(0.0, target - mean)
        power *= 1.0 + 0.06 * math.sin(2 * math.pi * elapsed_s / 90.0)
        power = max(0.5, power + _noise(rng, 0.3))
        volts = {p: 230.0 + self._phase_offsets[p] + _noise(rng, 0.6) for p in "abc"}
        pf = min(0.99, 0.92 + _noise(rng, 0.004))
        amps = {p: power * 1000.0 / (3 * volts[p] * pf) * (1.0 + _noise(rng, 0.01)) for p in "abc"}
        return {
            "thermal": {"temperature_zones": [round(z + _noise(rng, 0.35), 2) for z in self._zones],
                        "setpoint": self.setpoint},
            "electrical": _electrical(volts, amps, pf),
        }

    def _apply_specific(self, fault: ActiveFault, out: Readings, ramp: float) -> None:
        if fault.kind == "overtemperature":
            # The failed controller heats every zone past the setpoint, whatever the line is doing:
            # an oven kept at standby (night, changeover) overshoots as surely as one in production.
            for i, share in enumerate((0.8, 1.0, 0.9)):
                below = max(0.0, self.setpoint - self._zones[i]) if self._zones else 0.0
                _bend(out["thermal"], f"temperature_zones[{i}]", _add((below + fault.magnitude * share) * ramp))
        elif fault.kind == "phase_imbalance":
            e = out["electrical"]
            volts, amps, pf = e["voltage"], e["current"], e["power_factor"]
            assert isinstance(volts, dict) and isinstance(amps, dict) and isinstance(pf, float)
            volts = {**volts, "c": volts["c"] - fault.magnitude * ramp}
            amps = {"a": amps["a"] * (1 - 0.05 * ramp), "b": amps["b"] * (1 - 0.05 * ramp),
                    "c": amps["c"] * (1 + 0.3 * ramp)}
            out["electrical"] = _electrical(volts, amps, pf - 0.03 * ramp)


def _electrical(volts: dict[str, float], amps: dict[str, float], pf: float) -> Properties:
    return {
        "voltage": {p: round(v, 2) for p, v in volts.items()},
        "current": {p: round(a, 2) for p, a in amps.items()},
        "power_factor": round(pf, 3),
        "power_kw": round(sum(volts[p] * amps[p] for p in volts) * pf / 1000.0, 3),
    }


class MixerModel(EquipmentModel):
    """A spiral dough mixer running 10-minute cycles: slow mixing, fast kneading, discharge."""

    type = "mixer"
    features = ("motor", "vibration")
    commandable = {("motor", "speed_rpm"): (0.0, 300.0)}
    CYCLE_S = 600.0

    def __init__(self, equipment_id: str, rng: random.Random, line: str = "line-a") -> None:
        super().__init__(equipment_id, rng, line)
        self.speed_setpoint = 120.0
        self._rpm = 0.0
        self._phase0 = rng.uniform(0.0, self.CYCLE_S)  # mixers on a line do not run in step

    def _set(self, feature: str, name: str, value: float) -> None:
        self.speed_setpoint = value

    def _read(self, level: float, elapsed_s: float, dt_s: float) -> Readings:
        rng = self.rng
        phase = ((elapsed_s + self._phase0) % self.CYCLE_S) / self.CYCLE_S
        running = level >= 0.5
        if not running or phase >= 0.8:
            target, load = 0.0, 0.0
        elif phase < 0.2:
            target, load = 0.5 * self.speed_setpoint, 0.6 + phase
        else:
            target, load = self.speed_setpoint, 0.6 + 0.6 * phase  # dough stiffens as gluten develops
        self._rpm = _lag(self._rpm, target, dt_s, 3.0)
        rpm = max(0.0, self._rpm + _noise(rng, 0.8) * (self._rpm > 1))
        rms = 0.25 + 0.011 * rpm * (0.8 + 0.4 * load) + abs(_noise(rng, 0.04))
        return {
            "motor": {"current": round(max(0.0, 0.4 + 0.09 * rpm * max(load, 0.3) + _noise(rng, 0.15)), 2),
                      "speed_rpm": round(rpm, 1)},
            "vibration": {"rms": round(rms, 3), "peak": round(rms * (2.9 + _noise(rng, 0.15)), 3)},
        }


class ConveyorModel(EquipmentModel):
    """A belt conveyor between stations: runs at its set speed during production, stopped at night."""

    type = "conveyor"
    features = ("drive",)
    commandable = {("drive", "speed_mps"): (0.0, 2.0)}

    def __init__(self, equipment_id: str, rng: random.Random, line: str = "line-a") -> None:
        super().__init__(equipment_id, rng, line)
        self.speed_setpoint = 0.5
        self._speed: float | None = None

    def _set(self, feature: str, name: str, value: float) -> None:
        self.speed_setpoint = value

    def _read(self, level: float, elapsed_s: float, dt_s: float) -> Readings:
        rng = self.rng
        target = self.speed_setpoint * level
        self._speed = target if self._speed is None else _lag(self._speed, target, dt_s, 5.0)
        loading = 0.5 + 0.5 * math.sin(2 * math.pi * elapsed_s / 180.0)  # trays come in waves
        share = self._speed / self.speed_setpoint if self.speed_setpoint else 0.0
        return {"drive": {
            "speed_mps": round(max(0.0, self._speed + _noise(rng, 0.004)), 3),
            "motor_current": round(max(0.0, 0.3 + 4.5 * share * (0.8 + 0.2 * loading) + _noise(rng, 0.06)), 3),
        }}


class ProoferModel(EquipmentModel):
    """A proofing cabinet: warm and humid in production; door openings for racks cool and dry it."""

    type = "proofer"
    features = ("climate",)
    commandable = {("climate", "setpoint"): (20.0, 45.0)}
    IDLE_C, IDLE_RH, HUMIDITY_SETPOINT = 24.0, 50.0, 80.0

    def __init__(self, equipment_id: str, rng: random.Random, line: str = "line-a") -> None:
        super().__init__(equipment_id, rng, line)
        self.setpoint = 36.0
        self._temp: float | None = None
        self._rh: float | None = None

    def _set(self, feature: str, name: str, value: float) -> None:
        self.setpoint = value

    def _read(self, level: float, elapsed_s: float, dt_s: float) -> Readings:
        rng = self.rng
        t_target = self.IDLE_C + (self.setpoint - self.IDLE_C) * level
        rh_target = self.IDLE_RH + (self.HUMIDITY_SETPOINT - self.IDLE_RH) * level
        temp = t_target if self._temp is None else _lag(self._temp, t_target, dt_s, 300.0)
        rh = rh_target if self._rh is None else _lag(self._rh, rh_target, dt_s, 120.0)
        if rng.random() < min(1.0, dt_s / 120.0) * level:  # a rack goes in or out
            temp -= 1.5
            rh -= 6.0
        self._temp, self._rh = temp, rh
        return {"climate": {"temperature": round(temp + _noise(rng, 0.12), 2),
                            "humidity": round(min(100.0, max(0.0, rh + _noise(rng, 0.6))), 1)}}

    def _apply_specific(self, fault: ActiveFault, out: Readings, ramp: float) -> None:
        if fault.kind == "overtemperature":
            _bend(out["climate"], "temperature", _add(fault.magnitude * ramp))


class CoolerModel(EquipmentModel):
    """A cooling room: the compressor's thermostat cycles around the setpoint; open doors let heat in."""

    type = "cooler"
    features = ("climate",)
    commandable = {("climate", "setpoint"): (-5.0, 10.0)}
    CYCLE_S = 600.0

    def __init__(self, equipment_id: str, rng: random.Random, line: str = "line-a") -> None:
        super().__init__(equipment_id, rng, line)
        self.setpoint = 4.0
        self._door_heat = 0.0
        self._phase0 = rng.uniform(0.0, self.CYCLE_S)

    def _set(self, feature: str, name: str, value: float) -> None:
        self.setpoint = value

    def _read(self, level: float, elapsed_s: float, dt_s: float) -> Readings:
        rng = self.rng
        phase = ((elapsed_s + self._phase0) % self.CYCLE_S) / self.CYCLE_S
        hysteresis = 1.0 - 4.0 * abs(phase - 0.5)  # triangle wave in [-1, 1]
        self._door_heat = _lag(self._door_heat, 0.0, dt_s, 120.0)
        if rng.random() < min(1.0, dt_s / 90.0) * level:
            self._door_heat += 2.0
        return {"climate": {
            "temperature": round(self.setpoint + 0.8 * hysteresis + self._door_heat + _noise(rng, 0.08), 2),
            "humidity": round(min(100.0, max(0.0, 85.0 + 2.0 * self._door_heat + _noise(rng, 1.2))), 1),
        }}

    def _apply_specific(self, fault: ActiveFault, out: Readings, ramp: float) -> None:
        if fault.kind == "overtemperature":
            _bend(out["climate"], "temperature", _add(fault.magnitude * ramp))


MODELS: dict[str, type[EquipmentModel]] = {
    m.type: m for m in (OvenModel, MixerModel, ConveyorModel, ProoferModel, CoolerModel)
}
FEATURES: dict[str, tuple[str, ...]] = {t: m.features for t, m in MODELS.items()}


def make_model(equipment_type: str, equipment_id: str, rng: random.Random, line: str = "line-a") -> EquipmentModel:
    """The signal model of one machine of `equipment_type`."""
    try:
        cls = MODELS[equipment_type]
    except KeyError:
        raise ValueError(f"unknown equipment type {equipment_type!r} (known: {', '.join(EQUIPMENT_TYPES)})") from None
    return cls(equipment_id, rng, line)
