"""Signal models of food-line equipment: plausible values with noise and a daily production cycle.

Each node turns wall time into readings of its features; active faults bend those readings the
way real failures do (a drifting probe, a stuck sensor, a phase losing voltage, an oven zone
running hot). Nothing here does I/O, so the models are cheap and testable.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

EQUIPMENT_TYPES = ("oven", "mixer", "conveyor", "proofer", "cooler")
RECIPES = ("white-bread", "whole-wheat", "baguette", "croissant", "simit", "pide")
# Where each type's faults show (feature, property) — also written to the ground truth.
FAULT_TARGET = {
    "oven": ("thermal", "temperature_zones[1]"),
    "mixer": ("vibration", "rms"),
    "conveyor": ("drive", "motor_current"),
    "proofer": ("climate", "temperature"),
    "cooler": ("climate", "temperature"),
}


def production_level(sim_ts: float) -> float:
    """0 at night, 1 during production (07-21 h UTC of simulated time), linear ramps between."""
    hour = (sim_ts % 86_400) / 3600
    if 7 <= hour < 21:
        return 1.0
    if 6 <= hour < 7:
        return hour - 6
    if 21 <= hour < 22:
        return 22 - hour
    return 0.0


@dataclass
class ActiveFault:
    kind: str
    start: float  # simulated seconds since the run started
    end: float
    frozen: dict[str, dict[str, Any]] | None = None


@dataclass
class Node:
    """One simulated ESP32 node on one machine."""

    equipment_id: str
    type: str
    rng: random.Random
    setpoint: float = 0.0
    batch: int = 0
    recipe: str = ""
    operator: str = ""
    faults: list[ActiveFault] = field(default_factory=list)
    _zones: list[float] = field(default_factory=lambda: [25.0, 25.0, 25.0])
    _last_batch_change: float = -1e9

    def __post_init__(self) -> None:
        defaults = {"oven": 190.0, "proofer": 35.0, "cooler": 4.0, "mixer": 120.0, "conveyor": 0.5}
        self.setpoint = self.setpoint or defaults[self.type]

    def features(self) -> tuple[str, ...]:
        return {
            "oven": ("thermal", "electrical"),
            "mixer": ("motor", "vibration"),
            "conveyor": ("drive",),
            "proofer": ("climate",),
            "cooler": ("climate",),
        }[self.type]

    def read(self, sim_ts: float, elapsed: float) -> dict[str, dict[str, Any]]:
        """Readings of every feature at simulated time `sim_ts` (`elapsed` s into the run)."""
        level = production_level(sim_ts)
        g = self.rng.gauss
        out: dict[str, dict[str, Any]] = {}
        if self.type == "oven":
            target = 60.0 + (self.setpoint - 60.0) * level
            offsets = (-2.0, 0.0, 1.5)
            for i in range(3):  # first-order lag toward the target, like a heavy oven
                self._zones[i] += (target + offsets[i] - self._zones[i]) * 0.1
            out["thermal"] = {"temperature_zones": [round(z + g(0, 0.4), 2) for z in self._zones],
                              "setpoint": self.setpoint}
            amps = 4.0 + 14.0 * level
            volts = {p: round(230.0 + g(0, 0.8), 2) for p in "abc"}
            current = {p: round(amps + g(0, 0.3), 2) for p in "abc"}
            pf = round(min(0.99, 0.92 + g(0, 0.005)), 3)
            out["electrical"] = {"voltage": volts, "current": current, "power_factor": pf,
                                 "power_kw": round(sum(volts[p] * current[p] for p in "abc") * pf / 1000, 3)}
        elif self.type == "mixer":
            rpm = self.setpoint * level
            load = 0.5 + 0.5 * math.sin(elapsed / 30)
            out["motor"] = {"current": round(6.0 + 10.0 * level * load + g(0, 0.2), 2),
                            "speed_rpm": round(rpm + g(0, 1.0), 1)}
            rms = 0.4 + 1.1 * level + abs(g(0, 0.05))
            out["vibration"] = {"rms": round(rms, 3), "peak": round(rms * 2.9 + abs(g(0, 0.1)), 3)}
        elif self.type == "conveyor":
            out["drive"] = {"speed_mps": round(self.setpoint * level + g(0, 0.005), 3),
                            "motor_current": round(2.5 + 2.0 * level + g(0, 0.05), 3)}
        elif self.type == "proofer":
            out["climate"] = {"temperature": round(self.setpoint - 10 * (1 - level) + g(0, 0.15), 2),
                              "humidity": round(78.0 + 4 * level + g(0, 0.5), 1)}
        else:
            out["climate"] = {"temperature": round(self.setpoint + g(0, 0.1), 2),
                              "humidity": round(60.0 + g(0, 1.0), 1)}
        self._apply_faults(out, elapsed)
        return out

    def business_context(self, elapsed: float, every_s: float = 300.0) -> dict[str, Any] | None:
        """A new batch every `every_s` seconds (None when nothing changed)."""
        if elapsed - self._last_batch_change < every_s:
            return None
        self._last_batch_change = elapsed
        self.batch += 1
        self.recipe = self.rng.choice(RECIPES)
        self.operator = f"operator-{self.rng.randint(1, 40):02d}"
        return {"current_batch": f"{self.equipment_id}-batch-{self.batch:04d}", "recipe": self.recipe,
                "operator_id": self.operator}

    def _apply_faults(self, out: dict[str, dict[str, Any]], elapsed: float) -> None:
        for f in self.faults:
            if not f.start <= elapsed < f.end:
                continue
            since = elapsed - f.start
            feature, prop = FAULT_TARGET[self.type]
            if f.kind == "stuck":
                if f.frozen is None:
                    f.frozen = {k: dict(v) for k, v in out.items()}
                out[feature] = dict(f.frozen[feature])
            elif f.kind == "drift":
                _bend(out[feature], prop, lambda v, s=since: v * (1 + 0.002 * s))
            elif f.kind == "spike":
                if self.rng.random() < 0.3:
                    _bend(out[feature], prop, lambda v: v * self.rng.choice((1.6, 0.4)))
            elif f.kind == "overtemperature":
                if self.type == "oven":
                    _bend(out["thermal"], "temperature_zones[1]", lambda v, s=since: v + min(25.0, 0.5 * s))
                else:
                    _bend(out[feature], prop, lambda v, s=since: v + min(10.0, 0.2 * s))
            elif f.kind == "phase_imbalance" and "electrical" in out:
                e = out["electrical"]
                e["voltage"]["c"] = round(e["voltage"]["c"] - min(25.0, 0.5 * since), 2)
                e["current"]["c"] = round(e["current"]["c"] * 1.3, 2)


def _bend(props: dict[str, Any], path: str, fn: Any) -> None:
    if path.endswith("]"):
        name, idx = path[:-1].split("[")
        props[name] = list(props[name])
        props[name][int(idx)] = round(fn(props[name][int(idx)]), 3)
    else:
        props[path] = round(fn(props[path]), 3)
