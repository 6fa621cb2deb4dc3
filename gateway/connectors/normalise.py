"""From a device's raw values to the readings of its Thing: scale/offset, unit conversion (pint),
clamping, per-tag deadband, and calculated tags (simpleeval, never Python `eval`); and the inverse
for a write.

Unit conversions are affine (°F→°C, bar→psi, ...): pint is asked once per tag for the conversion's
slope and intercept, so converting a value costs a multiply and an add, not a pint Quantity.
"""

from __future__ import annotations

import ast
import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.connectors.base import DeviceConfig, RawValue, Reading, TagConfig, TagValue, WriteRefused

SAFE_FUNCTIONS: dict[str, Any] = {
    "abs": abs, "min": min, "max": max, "round": round, "sqrt": math.sqrt, "exp": math.exp, "log": math.log,
    "log10": math.log10, "sin": math.sin, "cos": math.cos, "floor": math.floor, "ceil": math.ceil,
}
MAX_EXPRESSION = 500


@functools.cache
def _units() -> Any:
    import pint

    return pint.UnitRegistry(autoconvert_offset_to_baseunit=True)


def unit_problem(unit: str, to: str = "") -> str | None:
    """None when `unit` is a unit pint knows (and converts to `to`), else what is wrong."""
    if not unit:
        return None
    import pint

    try:
        u = _units().Unit(unit)
        if to:
            _units().Quantity(1.0, u).to(to)
    except pint.UndefinedUnitError:
        return f"{to or unit!r} is not a unit (use pint's names: degC, degF, bar, psi, kPa, m/s, ...)"
    except pint.DimensionalityError:
        return f"cannot convert {unit} to {to}"
    except (ValueError, TypeError, AttributeError, AssertionError) as exc:  # pint's parser on odd input
        return f"{unit!r} is not a unit ({type(exc).__name__})"
    return None


@functools.cache
def affine(unit: str, to: str) -> tuple[float, float]:
    """(slope, intercept) of the conversion `unit` → `to`: value_to = slope * value + intercept."""
    if not to or to == unit:
        return (1.0, 0.0)
    q = _units().Quantity
    b = float(q(0.0, unit).to(to).magnitude)
    a = float(q(1.0, unit).to(to).magnitude) - b
    return (a, b)


def _parse(expression: str) -> ast.Expression:
    if len(expression) > MAX_EXPRESSION:
        raise ValueError(f"longer than {MAX_EXPRESSION} characters")
    return ast.parse(expression, mode="eval")


def expression_names(expression: str) -> set[str]:
    """The tag (property) names an expression reads."""
    return {n.id for n in ast.walk(_parse(expression)) if isinstance(n, ast.Name)} - set(SAFE_FUNCTIONS) \
        - {"True", "False"}


def expression_problem(expression: str) -> str | None:
    """None when the expression is one simpleeval accepts, else what is wrong."""
    try:
        tree = _parse(expression)
    except (SyntaxError, ValueError) as exc:
        return f"not an expression: {exc}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute | ast.Subscript | ast.Lambda | ast.ListComp | ast.DictComp |
                      ast.SetComp | ast.GeneratorExp | ast.Starred | ast.NamedExpr):
            return f"{type(node).__name__.lower()} is not allowed (use tag names, numbers, operators, " \
                   f"{', '.join(sorted(SAFE_FUNCTIONS))})"
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in SAFE_FUNCTIONS):
            return f"only these functions: {', '.join(sorted(SAFE_FUNCTIONS))}"
    return None


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one tag's value goes through, computed once."""

    tag: TagConfig
    a: float  # raw → stored: a * raw + b (scale, offset and unit conversion in one)
    b: float
    numeric_out: bool


class DeviceNormaliser:
    """Normalises one device's raw values into readings; keeps its deadband state and last values."""

    def __init__(self, device: DeviceConfig) -> None:
        from simpleeval import SimpleEval

        self.device = device
        self._plans: dict[tuple[str, str], _Plan] = {}
        for tag in device.tags:
            ua, ub = affine(tag.unit, tag.to_unit) if tag.unit else (1.0, 0.0)
            # stored = ua * (raw * scale + offset) + ub
            self._plans[tag.key] = _Plan(tag, ua * tag.scale, ua * tag.offset + ub, True)
        self._calculated = [t for t in device.tags if t.calculated]
        self._eval = SimpleEval(functions=dict(SAFE_FUNCTIONS))
        self._trees = {t.key: self._eval.parse(t.expression) for t in self._calculated}
        self._last_stored: dict[tuple[str, str], float] = {}
        self.values: dict[str, TagValue] = {}  # the newest value of each property, for calculated tags

    def tag(self, feature: str, prop: str) -> TagConfig | None:
        plan = self._plans.get((feature, prop))
        return plan.tag if plan is not None else None

    def normalise(self, raw: Sequence[RawValue], now: float | None = None) -> list[Reading]:
        """Readings for these raw values (deadband applied), then the calculated tags they feed."""
        now = time.time() if now is None else now
        out: list[Reading] = []
        for rv in raw:
            plan = self._plans.get(rv.tag.key)
            if plan is None:
                continue
            reading = self._one(plan, rv.value, rv.ts if rv.ts is not None else now, rv.quality)
            if reading is not None:
                out.append(reading)
        if self._calculated and raw:
            out.extend(self._calculate(now))
        return out

    def _one(self, plan: _Plan, value: TagValue | None, ts: float, quality: Any) -> Reading | None:
        tag = plan.tag
        if quality == "bad" or value is None:
            self._last_stored.pop(tag.key, None)
            return Reading(tag.feature, tag.property, None, ts, "bad")
        if isinstance(value, bool | str):
            self.values[tag.property] = value
            return Reading(tag.feature, tag.property, value, ts, quality)
        v = plan.a * value + plan.b
        if plan.b != 0.0 or plan.a != 1.0:
            v = round(v, 9)  # the conversion's float noise (99.99999999999736 °C for 212 °F)
        if not math.isfinite(v):
            return Reading(tag.feature, tag.property, None, ts, "bad")
        if v < tag.min or v > tag.max:
            v = min(max(v, tag.min), tag.max)
            quality = "uncertain"
        if isinstance(value, int) and plan.a == 1.0 and plan.b == 0.0:
            out: TagValue = int(v)
        else:
            out = v
        self.values[tag.property] = out
        if tag.deadband > 0 and quality == "good":
            last = self._last_stored.get(tag.key)
            if last is not None and abs(v - last) <= tag.deadband:
                return None
            self._last_stored[tag.key] = v
        return Reading(tag.feature, tag.property, out, ts, quality)

    def _calculate(self, ts: float) -> list[Reading]:
        out: list[Reading] = []
        names = self.values
        for tag in self._calculated:
            tree = self._trees[tag.key]
            self._eval.names = names
            try:
                value = self._eval.eval(tag.expression, previously_parsed=tree)
            except Exception:  # a missing input, a division by zero, a domain error: no value this time
                out.append(Reading(tag.feature, tag.property, None, ts, "bad"))
                continue
            if isinstance(value, bool):
                reading = self._one(self._plans[tag.key], value, ts, "good")
            elif isinstance(value, int | float):
                reading = self._one(self._plans[tag.key], float(value), ts, "good")
            else:
                reading = Reading(tag.feature, tag.property, None, ts, "bad")
            if reading is not None:
                out.append(reading)
        return out

    def to_raw(self, tag: TagConfig, value: Any) -> TagValue:
        """The raw value to write for a stored (engineering) value, or WriteRefused saying why."""
        if not tag.writable:
            raise WriteRefused(f"{tag.feature}.{tag.property} is read-only", device=self.device.name)
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            return value
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise WriteRefused(f"{tag.feature}.{tag.property} takes a number", device=self.device.name)
        if value < tag.min or value > tag.max:
            raise WriteRefused(f"{tag.feature}.{tag.property} must be within {tag.min}..{tag.max}, got {value}",
                               device=self.device.name)
        plan = self._plans[tag.key]
        return (float(value) - plan.b) / plan.a

    def from_raw(self, tag: TagConfig, raw: TagValue) -> TagValue:
        """The stored value of a raw one read back after a write (no clamping, no deadband)."""
        if isinstance(raw, bool | str):
            return raw
        plan = self._plans[tag.key]
        v = round(plan.a * raw + plan.b, 9)
        return int(v) if isinstance(raw, int) and plan.a == 1.0 and plan.b == 0.0 else v
