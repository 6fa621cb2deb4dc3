"""One machine's state and counts over time, with no I/O and no clock of its own.

`MachineTracker` reads the properties its rules name from each reading, derives the machine state
(`running`, `idle`, `down`, `changeover`, `planned_stop`, `offline`), turns counter readings into
good and rejected units, and accounts every second of time to a `Period` (machine, hour, shift,
planned or not) and to the open `StateEvent`. The tracker that owns it writes both away in batches.
"""

from __future__ import annotations

import dataclasses
import math
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.common.oee import Totals
from gateway.oee.calendar import MINUTE, ShiftCalendar
from gateway.oee.settings import STATES, Condition, MachineRules, TypeRules

Accessor = Callable[[Mapping[str, Mapping[str, Any]]], Any]
_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_-]*)|\[(\d+)\]")
_MISSING = object()


def accessor(path: str) -> tuple[str, Accessor]:
    """`feature.name[.sub|[i]]...` → (feature, a function from {feature: properties} to the value or _MISSING)."""
    feature, _, rest = path.partition(".")
    head = re.match(r"[A-Za-z_][A-Za-z0-9_-]*", rest)
    name = head.group(0) if head else rest
    steps: list[str | int] = [m.group(1) if m.group(1) is not None else int(m.group(2))
                              for m in _STEP.finditer(rest[len(name):])]

    def get(features: Mapping[str, Mapping[str, Any]]) -> Any:
        value: Any = features.get(feature, {}).get(name, _MISSING)
        for step in steps:
            if isinstance(step, int):
                value = value[step] if isinstance(value, list) and step < len(value) else _MISSING
            else:
                value = value.get(step, _MISSING) if isinstance(value, dict) else _MISSING
        return value

    return feature, get


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


class Test:
    """A compiled `Condition`; `None` from `holds` means a property it needs is not known yet."""

    def __init__(self, c: Condition) -> None:
        self.op = c.op
        self.value = c.value
        self.feature, self.get = accessor(c.property)
        self.of = accessor(c.of)[1] if c.op == "within" else None
        self.features = {self.feature} | ({accessor(c.of)[0]} if self.of else set())

    def holds(self, features: Mapping[str, Mapping[str, Any]]) -> bool | None:
        raw = self.get(features)
        values = raw if isinstance(raw, list) else [raw]
        nums = [_number(v) for v in values]
        if raw is _MISSING or not nums or any(n is None for n in nums):
            return None
        if self.of is not None:
            ref = _number(self.of(features))
            return None if ref is None else all(abs(n - ref) <= self.value for n in nums if n is not None)
        return all(_compare(n, self.op, self.value) for n in nums if n is not None)


def _compare(a: float, op: str, b: float) -> bool:
    if op == ">":
        return a > b
    if op == ">=":
        return a >= b
    if op == "<":
        return a < b
    if op == "<=":
        return a <= b
    if op == "==":
        return a == b
    return a != b


# One machine's record of one hour, one shift and one planned/unplanned part: the same sums the queries add up.
Period = Totals


@dataclass(frozen=True, slots=True)
class PeriodKey:
    thing_id: str
    line: str
    hour: float  # epoch seconds at the start of the hour
    day: str  # the shift's local date
    shift: str
    planned: bool


@dataclass(slots=True)
class StateEvent:
    """One stretch of one state of one machine; `end` moves while it is open."""

    id: str
    thing_id: str
    line: str
    state: str
    start: float
    end: float
    source: str  # rules | plc | operator | offline
    reason: str = ""
    note: str = ""
    reason_by: str = ""
    planned_s: float = 0.0  # of its duration, the seconds in planned production time
    open: bool = True


@dataclass(slots=True)
class OperatorState:
    state: str
    reason: str
    note: str
    by: str


def new_event_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Counter:
    """A monotonic counter's last value; deltas handle rollover at `modulus` and resets to a small value."""

    modulus: float
    last: float | None = None

    def delta(self, value: float) -> int:
        """Units since the last reading. A drop is a rollover when the old value was in the top tenth
        of the range and the new one in the bottom tenth; any other drop is a reset (counting from 0)."""
        last, self.last = self.last, value
        if last is None:
            return 0
        if value >= last:
            return round(value - last)
        if last >= 0.9 * self.modulus and value <= 0.1 * self.modulus:
            return round(value + self.modulus - last)
        return round(value)


@dataclass
class MachineTracker:
    """State, counts and time accounting of one machine (see the module docstring)."""

    thing_id: str
    line: str
    rules: TypeRules
    machine: MachineRules
    calendar: ShiftCalendar
    startup_reject_s: float
    periods: dict[PeriodKey, Period] = field(default_factory=dict)  # accounted since the last flush
    events: dict[str, StateEvent] = field(default_factory=dict)  # changed since the last flush
    state: str = ""
    event: StateEvent | None = None
    clock: float = 0.0  # time is accounted up to here
    last_seen: float = 0.0
    connectivity_offline: bool = False
    operator: OperatorState | None = None
    startup_until: float = 0.0
    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    counters: dict[str, Counter] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._running = [Test(c) for c in self.rules.running]
        self._down = [Test(c) for c in self.rules.down]
        self._state_tag = accessor(self.rules.state_property) if self.rules.state_property else None
        self._good = accessor(self.rules.good_counter) if self.rules.good_counter else None
        self._reject = accessor(self.rules.reject_counter) if self.rules.reject_counter else None
        self._recipe = accessor(self.rules.recipe_property) if self.rules.recipe_property else None
        self.features: set[str] = set()
        for t in (*self._running, *self._down):
            self.features |= t.features
        for acc in (self._state_tag, self._good, self._reject, self._recipe):
            if acc is not None:
                self.features.add(acc[0])
        for path in (self.rules.good_counter, self.rules.reject_counter):
            if path and path not in self.counters:
                self.counters[path] = Counter(self.rules.counter_modulus)
        self._minute_end = -1.0
        self._minute_period: Period | None = None
        self._minute_planned = False

    # ------------------------------------------------------------------ inputs
    def reading(self, feature: str, ts: float, props: Mapping[str, Any]) -> None:
        """One sample of one feature at device time `ts`."""
        if feature not in self.features:
            return
        at = max(ts, self.clock)
        if self.state:
            self.advance(at)
        else:
            self.clock = at
        self.last_seen = max(self.last_seen, at)
        self.connectivity_offline = False
        self.values.setdefault(feature, {}).update(props)
        self._count(ts if math.isfinite(ts) else at)  # units belong to their own minute, even when late
        self._switch(at)

    def connectivity(self, online: bool, ts: float) -> None:
        """The node's status (its Last Will says offline when it drops off the broker)."""
        if not self.state:
            return
        at = max(ts, self.clock)
        self.advance(at)
        self.connectivity_offline = not online
        if online:
            self.last_seen = at
        self._switch(at)

    def set_operator(self, op: OperatorState | None, ts: float) -> None:
        """An operator starts a planned stop or changeover (`op`), or hands back to the rules (None)."""
        at = max(ts, self.clock)
        if self.state:
            self.advance(at)
        else:
            self.clock = self.last_seen = at
        self.operator = op
        self._switch(at, force=op is not None)

    def tick(self, now: float, offline_after_s: float) -> None:
        """Account time up to `now`; no reading for `offline_after_s` makes the machine offline then."""
        if not self.state:
            return
        if self.state != "offline" and self.operator is None and not self.connectivity_offline:
            silent_at = self.last_seen + offline_after_s
            if now >= silent_at:
                self.advance(max(silent_at, self.clock))
                self.connectivity_offline = True
                self._switch(self.clock)
        self.advance(now)

    # ------------------------------------------------------------------ derived
    def derive(self) -> tuple[str, str]:
        """(state, source) from what is known now."""
        if self.operator is not None:
            return self.operator.state, "operator"
        if self.connectivity_offline:
            return "offline", "offline"
        if self._state_tag is not None:
            tag = self._state_tag[1](self.values)
            if tag is not _MISSING and tag is not None:
                text = str(tag).lower() if not isinstance(tag, float) or not tag.is_integer() else str(int(tag))
                mapped = self.rules.state_map.get(text) or (text if text in STATES else None)
                if mapped:
                    return mapped, "plc"
        if any(t.holds(self.values) for t in self._down):
            return "down", "rules"
        if self._running and all(t.holds(self.values) for t in self._running):
            return "running", "rules"
        return "idle", "rules"

    def ideal_cycle_s(self) -> float:
        recipe = self._recipe[1](self.values) if self._recipe is not None else _MISSING
        if isinstance(recipe, str):
            for table in (self.machine.recipes, self.rules.recipes):
                if recipe in table:
                    return float(table[recipe])
        return self.machine.ideal_cycle_s or self.rules.ideal_cycle_s

    def _switch(self, at: float, *, force: bool = False) -> None:
        state, source = self.derive()
        if state == self.state and not force:
            return
        if self.event is not None:
            self.event.end = at
            self.event.open = False
            self.events[self.event.id] = self.event
            if self.event.state == "changeover" and state != "changeover":
                self.startup_until = at + self.startup_reject_s
        reason, note, by = "", "", ""
        if self.operator is not None:
            reason, note, by = self.operator.reason, self.operator.note, self.operator.by
        self.state = state
        self.event = StateEvent(new_event_id(), self.thing_id, self.line, state, at, at, source,
                                reason=reason, note=note, reason_by=by)
        self.events[self.event.id] = self.event
        self.clock = max(self.clock, at)

    def _count(self, at: float) -> None:
        good = self._delta(self._good, self.rules.good_counter)
        rejected = self._delta(self._reject, self.rules.reject_counter)
        if not good and not rejected:
            return
        ideal = self.ideal_cycle_s()
        p = self._period(at)
        p.good += good
        p.rejected += rejected
        p.ideal_good_s += good * ideal
        p.ideal_total_s += (good + rejected) * ideal
        if at < self.startup_until:
            p.rejected_startup += rejected
            p.ideal_startup_reject_s += rejected * ideal

    def _delta(self, acc: tuple[str, Accessor] | None, path: str) -> int:
        if acc is None:
            return 0
        value = _number(acc[1](self.values))
        if value is None or value < 0:
            return 0
        counter = self.counters[path]
        if counter.last == value:
            return 0
        return counter.delta(value)

    # ------------------------------------------------------------------ time
    def advance(self, to: float) -> None:
        """Account [clock, to) to the current state, minute by minute of the calendar."""
        t = self.clock
        if to <= t or not self.state:
            self.clock = max(self.clock, to)
            return
        name = self.state + "_s"
        event = self.event
        while t < to:
            if t >= self._minute_end or self._minute_period is None:
                self._enter_minute(t)
            piece = min(to, self._minute_end) - t
            assert self._minute_period is not None
            p = self._minute_period
            setattr(p, name, getattr(p, name) + piece)
            if event is not None:
                event.end = t + piece
                if self._minute_planned:
                    event.planned_s += piece
            t += piece
        self.clock = to
        if event is not None:
            self.events[event.id] = event

    def _enter_minute(self, t: float) -> None:
        start = math.floor(t / MINUTE) * MINUTE
        self._minute_end = start + MINUTE
        self._minute_period = None
        self._minute_period = self._period(t)
        self._minute_planned = self.calendar.minute(start).planned

    def _period(self, t: float) -> Period:
        if self._minute_period is not None and self._minute_end - MINUTE <= t < self._minute_end:
            return self._minute_period  # the minute time is being accounted to: the usual case
        start = math.floor(t / MINUTE) * MINUTE
        info = self.calendar.minute(start)
        key = PeriodKey(self.thing_id, self.line, math.floor(t / 3600.0) * 3600.0, info.day, info.shift, info.planned)
        p = self.periods.get(key)
        if p is None:
            p = self.periods[key] = Period()
            if start + MINUTE == self._minute_end:
                self._minute_period = p
        return p

    def take(self) -> tuple[dict[PeriodKey, Period], list[StateEvent], dict[str, float]]:
        """What changed since the last call, for a flush: periods, events (copies), counter values."""
        periods, self.periods = self.periods, {}
        self._minute_period = None
        events = [dataclasses.replace(e) for e in self.events.values()]
        self.events = {}
        counters = {path: c.last for path, c in self.counters.items() if c.last is not None}
        return periods, events, counters
