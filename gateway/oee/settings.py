"""The `[oee]` section of the gateway configuration: machine-state rules per equipment type, counters,
ideal cycle times per machine and recipe, the site's reason list and its shift calendar.

Only the standard library here: `gateway.config` imports this module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

STATES = ("running", "idle", "down", "changeover", "planned_stop", "offline")
OPERATOR_STATES = ("planned_stop", "changeover")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
CLOCK_RE = re.compile(r"([01]\d|2[0-3]):([0-5]\d)")
PATH_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\.[A-Za-z_][A-Za-z0-9_.\[\]-]*")


@dataclass(frozen=True)
class Condition:
    """One test on a property of the Thing, written `feature.path` (`thermal.temperature_zones`, `motor.current`).

    `op` compares the value with `value`; `within` holds when the value is at most `value` away from the
    property named by `of` (a setpoint). A list (temperature zones) holds when every element does.
    """

    property: str
    op: Literal[">", ">=", "<", "<=", "==", "!=", "within"] = ">"
    value: float = 0.0
    of: str = ""  # only for `within`: the reference property


@dataclass(frozen=True)
class TypeRules:
    """How the state and the counts of one equipment type are read from its properties."""

    running: tuple[Condition, ...] = ()  # all hold: running
    down: tuple[Condition, ...] = ()  # any holds: down (unplanned stop); checked before `running`
    state_property: str = ""  # a PLC state tag; when present in the Thing it decides the state
    state_map: Mapping[str, str] = field(default_factory=dict)  # tag value (as text) -> state
    good_counter: str = ""  # monotonic counter of good units, e.g. "production.good_count"
    reject_counter: str = ""  # monotonic counter of rejected units
    counter_modulus: float = 4294967296.0  # where the counters roll over to 0 (2^32)
    recipe_property: str = ""  # the recipe in production, e.g. "production.recipe"
    ideal_cycle_s: float = 0.0  # seconds per unit at the rated speed; 0: performance is not computed
    recipes: Mapping[str, float] = field(default_factory=dict)  # recipe -> ideal cycle seconds


@dataclass(frozen=True)
class MachineRules:
    """Per machine (equipment id): ideal cycle times that differ from its type's."""

    ideal_cycle_s: float = 0.0  # 0: the type's
    recipes: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Break:
    start: str  # "HH:MM", local time of `oee.timezone`
    end: str


@dataclass(frozen=True)
class Shift:
    """A shift of the site's calendar; `end` before `start` means it ends the next day."""

    name: str
    start: str  # "HH:MM"
    end: str
    days: tuple[str, ...] = WEEKDAYS  # the weekdays the shift starts on
    breaks: tuple[Break, ...] = ()


@dataclass(frozen=True)
class PlannedDowntime:
    """A planned stop of the whole site or line (maintenance, a holiday): not planned production time."""

    start: str  # ISO 8601, whole minutes
    end: str
    reason: str = "planned_maintenance"


@dataclass(frozen=True)
class OeeSection:
    """OEE, machine states and downtime at the gateway."""

    enabled: bool = False
    timezone: str = "UTC"  # the site's zone; shifts and days are in local time
    flush_interval_s: float = 2.0  # state events and period records are written this often
    offline_after_s: float = 60.0  # no reading for this long: the machine is offline
    startup_reject_s: float = 600.0  # rejects this soon after a changeover count as start-up (reduced yield)
    microstop_s: float = 300.0  # a down or offline stop shorter than this is a minor stop (six big losses)
    reasons: tuple[str, ...] = ("breakdown", "jam", "no_material", "no_operator", "cleaning", "quality_check",
                                "maintenance", "recipe_change", "other")
    types: Mapping[str, TypeRules] = field(default_factory=dict)  # equipment type -> rules
    machines: Mapping[str, MachineRules] = field(default_factory=dict)  # equipment id -> overrides
    shifts: tuple[Shift, ...] = ()  # none: every minute is planned production time
    planned_downtime: tuple[PlannedDowntime, ...] = ()
    keep_days: float = 400.0  # state events and period records older than this are deleted


def check(oee: OeeSection, fail: list[tuple[str, str]]) -> None:
    """What types cannot say about `[oee]`; every problem appended as (dotted key, message)."""
    from datetime import datetime
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(oee.timezone)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        fail.append(("oee.timezone", f"is not a known time zone (e.g. Europe/Istanbul), got {oee.timezone!r}"))
    for key in ("flush_interval_s", "offline_after_s"):
        if not 0 < getattr(oee, key) <= 3600:
            fail.append((f"oee.{key}", "must be > 0 and <= 3600 seconds"))
    if not 0 <= oee.microstop_s <= 3600:
        fail.append(("oee.microstop_s", "must be 0..3600 seconds"))
    if not 0 <= oee.startup_reject_s <= 86400:
        fail.append(("oee.startup_reject_s", "must be 0..86400 seconds"))
    if oee.keep_days <= 0:
        fail.append(("oee.keep_days", "must be > 0"))
    for i, reason in enumerate(oee.reasons):
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,62}", reason):
            fail.append((f"oee.reasons[{i}]", "must be a code of a-z, 0-9, '_', '-' (e.g. no_material)"))
    for name, rules in oee.types.items():
        if isinstance(rules, TypeRules):
            _check_type(f"oee.types.{name}", rules, fail)
    for name, m in oee.machines.items():
        if isinstance(m, MachineRules):
            _check_cycles(f"oee.machines.{name}", m.ideal_cycle_s, m.recipes, fail)
    names: set[str] = set()
    for i, s in enumerate(oee.shifts):
        if not isinstance(s, Shift):
            continue
        key = f"oee.shifts[{i}]"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9 _-]{0,31}", s.name) or s.name in names:
            fail.append((f"{key}.name", "must be a unique name of letters, digits, ' ', '_', '-'"))
        names.add(s.name)
        for part in ("start", "end"):
            if not CLOCK_RE.fullmatch(getattr(s, part)):
                fail.append((f"{key}.{part}", "must be a time of day HH:MM"))
        bad_days = [d for d in s.days if d not in WEEKDAYS]
        if bad_days or not s.days:
            fail.append((f"{key}.days", f"must be weekdays among {', '.join(WEEKDAYS)}"))
        for j, b in enumerate(s.breaks):
            for part in ("start", "end"):
                if isinstance(b, Break) and not CLOCK_RE.fullmatch(getattr(b, part)):
                    fail.append((f"{key}.breaks[{j}].{part}", "must be a time of day HH:MM"))
    for i, d in enumerate(oee.planned_downtime):
        if not isinstance(d, PlannedDowntime):
            continue
        try:
            start, end = (datetime.fromisoformat(x.replace("Z", "+00:00")) for x in (d.start, d.end))
        except (ValueError, AttributeError):
            fail.append((f"oee.planned_downtime[{i}]", "start and end must be ISO 8601 times"))
            continue
        if start.second or end.second or start.microsecond or end.microsecond:
            fail.append((f"oee.planned_downtime[{i}]", "start and end must be whole minutes"))
        if (start.tzinfo is None) != (end.tzinfo is None) or end <= start:
            fail.append((f"oee.planned_downtime[{i}].end", "must be after start (both with or both without a zone)"))


def _check_type(key: str, rules: TypeRules, fail: list[tuple[str, str]]) -> None:
    for group in ("running", "down"):
        for i, c in enumerate(getattr(rules, group)):
            if not isinstance(c, Condition):
                continue
            if not PATH_RE.fullmatch(c.property):
                fail.append((f"{key}.{group}[{i}].property", "must be feature.property, e.g. drive.speed_mps"))
            if c.op == "within" and not PATH_RE.fullmatch(c.of):
                fail.append((f"{key}.{group}[{i}].of", "`within` needs the reference property, e.g. thermal.setpoint"))
            if c.op == "within" and c.value < 0:
                fail.append((f"{key}.{group}[{i}].value", "must be >= 0 for `within`"))
    for part in ("state_property", "good_counter", "reject_counter", "recipe_property"):
        value = getattr(rules, part)
        if value and not PATH_RE.fullmatch(value):
            fail.append((f"{key}.{part}", "must be feature.property, e.g. production.good_count"))
    for tag, state in rules.state_map.items():
        if state not in STATES:
            fail.append((f"{key}.state_map.{tag}", f"must be one of {', '.join(STATES)}"))
    if rules.counter_modulus < 2:
        fail.append((f"{key}.counter_modulus", "must be >= 2"))
    _check_cycles(key, rules.ideal_cycle_s, rules.recipes, fail)


def _check_cycles(key: str, ideal: float, recipes: Mapping[str, float], fail: list[tuple[str, str]]) -> None:
    if not 0 <= ideal <= 86400:
        fail.append((f"{key}.ideal_cycle_s", "must be 0..86400 seconds (0: not set)"))
    for recipe, s in recipes.items():
        if not isinstance(s, float) or not 0 < s <= 86400:
            fail.append((f"{key}.recipes.{recipe}", "must be an ideal cycle time in seconds, > 0"))
