"""One machine's state and counts over time, with no I/O and no clock of its own.

`MachineTracker` reads the properties its rules name from each reading, derives the machine state
(`running`, `idle`, `down`, `changeover`, `planned_stop`, `offline`), turns counter readings into
good and rejected units, and accounts every second of time to a `Period` (machine, hour, shift,
planned or not) and to the open `StateEvent`. The tracker that owns it writes both away in batches.

A reading does only the work it can need, in one function per feature made once from the rules
(`readers`): the rules are evaluated again only when it changes a property they name (or the machine
comes back from offline), counters only when it carries them, the ideal cycle time is looked up again
only when the recipe changes, and while the state stays the same its time is accounted in one go at
the next change or `take`, not reading by reading.
"""

from __future__ import annotations

import dataclasses
import math
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.common.oee import Totals
from gateway.oee.calendar import MINUTE, ShiftCalendar
from gateway.oee.settings import STATES, Condition, MachineRules, TypeRules

Accessor = Callable[[Mapping[str, Mapping[str, Any]]], Any]
Samples = Sequence[tuple[float, Mapping[str, Any]]]  # one message's readings of one feature: (device time, properties)
Reader = Callable[[Samples], None]
_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_-]*)|\[(\d+)\]")
_MISSING = object()


def head(path: str) -> tuple[str, str]:
    """`feature.name[.sub|[i]]...` → (feature, name): the property a reading must carry to change the value."""
    feature, _, rest = path.partition(".")
    match = re.match(r"[A-Za-z_][A-Za-z0-9_-]*", rest)
    return feature, match.group(0) if match else rest


def accessor(path: str) -> tuple[str, Accessor]:
    """`feature.name[.sub|[i]]...` → (feature, a function from {feature: properties} to the value or _MISSING)."""
    feature, name = head(path)
    rest = path.partition(".")[2]
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
    if v.__class__ is int:  # the usual counter value; a bool is not an int here
        return float(v)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


_SCALARS = frozenset((str, int, float))


class Test:
    """A compiled `Condition`; `None` from `holds` means a property it needs is not known yet."""

    def __init__(self, c: Condition) -> None:
        self.op = c.op
        self.value = c.value
        self.feature, self.get = accessor(c.property)
        self.of = accessor(c.of)[1] if c.op == "within" else None
        self.features = {self.feature} | ({accessor(c.of)[0]} if self.of else set())
        self.heads = {head(c.property)} | ({head(c.of)} if self.of else set())

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


@dataclass(slots=True)
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
    clock: float = 0.0  # the state is known up to here (time is accounted up to here at a change or `take`)
    last_seen: float = 0.0
    connectivity_offline: bool = False
    operator: OperatorState | None = None
    startup_until: float = 0.0
    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    counters: dict[str, Counter] = field(default_factory=dict)
    on_change: Callable[[str], None] | None = None  # told each new state (the tracker counts them)
    # Made from the rules by __post_init__. Slots: the instance has more attributes than Python shares
    # the keys of, and the reading's attribute reads and writes are then dictionary look-ups.
    features: set[str] = field(init=False, repr=False)
    readers: dict[str, Reader] = field(init=False, repr=False)
    _running: list[Test] = field(init=False, repr=False)
    _down: list[Test] = field(init=False, repr=False)
    _state_tag: tuple[str, Accessor] | None = field(init=False, repr=False)
    _good: tuple[str, Accessor] | None = field(init=False, repr=False)
    _reject: tuple[str, Accessor] | None = field(init=False, repr=False)
    _recipe: tuple[str, Accessor] | None = field(init=False, repr=False)
    _state_names: dict[str, set[str]] = field(init=False, repr=False)
    _counting: dict[str, list[tuple[str, Accessor | None, Counter, bool]]] = field(init=False, repr=False)
    _recipe_names: dict[str, set[str]] = field(init=False, repr=False)
    _ideal: float | None = field(init=False, repr=False)
    _seconds: str = field(init=False, repr=False)
    _accounted: float = field(init=False, repr=False)
    _minute_end: float = field(init=False, repr=False)
    _minute_period: Period = field(init=False, repr=False)
    _minute_planned: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._running = [Test(c) for c in self.rules.running]
        self._down = [Test(c) for c in self.rules.down]
        self._state_tag = accessor(self.rules.state_property) if self.rules.state_property else None
        self._good = accessor(self.rules.good_counter) if self.rules.good_counter else None
        self._reject = accessor(self.rules.reject_counter) if self.rules.reject_counter else None
        self._recipe = accessor(self.rules.recipe_property) if self.rules.recipe_property else None
        self.features = set()
        for t in (*self._running, *self._down):
            self.features |= t.features
        for acc in (self._state_tag, self._good, self._reject, self._recipe):
            if acc is not None:
                self.features.add(acc[0])
        for path in (self.rules.good_counter, self.rules.reject_counter):
            if path and path not in self.counters:
                self.counters[path] = Counter(self.rules.counter_modulus)
        # Per feature, the properties that can change the state and the counters they feed: a reading
        # carrying none of them changes neither (the state is always what `derive` says of the values).
        self._state_names = {}
        heads = [h for t in (*self._running, *self._down) for h in t.heads]
        if self.rules.state_property:
            heads.append(head(self.rules.state_property))
        for feature, name in heads:
            self._state_names.setdefault(feature, set()).add(name)
        self._counting = {}
        for path, rejects in ((self.rules.good_counter, False), (self.rules.reject_counter, True)):
            if path:
                feature, name = head(path)
                nested = path != f"{feature}.{name}"  # else the value is read from the reading itself
                self._counting.setdefault(feature, []).append(
                    (name, accessor(path)[1] if nested else None, self.counters[path], rejects))
        self._recipe_names = {}
        if self.rules.recipe_property:
            feature, name = head(self.rules.recipe_property)
            self._recipe_names[feature] = {name}
        self._ideal = None  # the ideal cycle time of the recipe in production, once asked for
        self._seconds = ""  # the Period field the current state's time goes to
        self._accounted = 0.0  # time is accounted to periods and the open event up to here
        # the period of the minute last asked for (time and counts mostly go to the same minute)
        self._minute_end = -math.inf
        self._minute_period = Period()
        self._minute_planned = False
        self.readers = {f: self._reader(f) for f in sorted(self.features)}

    # ------------------------------------------------------------------ inputs
    def reading(self, feature: str, ts: float, props: Mapping[str, Any]) -> None:
        """One sample of one feature at device time `ts`."""
        read = self.readers.get(feature)
        if read is not None:
            read(((ts, props),))

    def _reader(self, feature: str) -> Reader:
        """The work of one message's samples of `feature` (one call for all of them), compiled once from the
        rules: it looks only at the properties they name in that feature (the state's, the recipe, the
        counters), keeps only those, and makes no call per rule. While the state stays the same its time is
        accounted later in one go."""
        state_names = self._state_names.get(feature, set())
        recipe_names = self._recipe_names.get(feature, set())
        counting = tuple(self._counting.get(feature, ()))
        nested = {name for name, get, _, _ in counting if get is not None}
        # the properties kept (all the rules read from `values`), each with what its change means
        kept = tuple((name, name in state_names, name in recipe_names)
                     for name in sorted(state_names | recipe_names | nested))
        values = self.values
        held = values.setdefault(feature, {})  # the kept values as last read; absent and empty read the same
        missing = _MISSING
        scalars = _SCALARS
        number = _number
        neg_inf = -math.inf

        def read(samples: Samples) -> None:
            for ts, props in samples:
                clock = self.clock
                at = clock if clock > ts else ts  # max(ts, clock), NaN included
                self.clock = at
                state = self.state
                if not state:
                    self._accounted = at
                self.last_seen = at  # never behind: the clock is never behind it
                changed = False
                for name, of_state, of_recipe in kept:
                    if name in props:  # a value of another type is a change: `1` and `True` read differently
                        new, old = props[name], held.get(name, missing)
                        if new is not old and (new.__class__ is not old.__class__ or new.__class__ not in scalars
                                               or new != old):
                            held[name] = new
                            if of_state:
                                changed = True
                            if of_recipe:
                                self._ideal = None
                switch = changed or not state
                if self.connectivity_offline:  # back from offline
                    self.connectivity_offline = False
                    switch = True
                if counting:  # the counters this reading carries (one it lacks has not moved)
                    good = rejected = 0
                    for name, get, counter, rejects in counting:
                        if name not in props:
                            continue
                        raw = props[name] if get is None else get(values)
                        value = float(raw) if raw.__class__ is int else number(raw)
                        if value is None or value < 0 or counter.last == value:
                            continue
                        units = counter.delta(value)
                        if rejects:
                            rejected += units
                        else:
                            good += units
                    if good or rejected:  # units belong to their own minute, even when late
                        t = ts if ts > neg_inf else at
                        ideal = self.ideal_cycle_s()
                        p = self._period(t)
                        p.good += good
                        p.rejected += rejected
                        p.ideal_good_s += good * ideal
                        p.ideal_total_s += (good + rejected) * ideal
                        if t < self.startup_until:
                            p.rejected_startup += rejected
                            p.ideal_startup_reject_s += rejected * ideal
                if switch:
                    self.advance(at)
                    self._switch(at)

        return read

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
            self.clock = self.last_seen = self._accounted = at
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
        if self._ideal is None:  # forgotten whenever a reading changes the recipe
            self._ideal = self._ideal_of(self._recipe[1](self.values) if self._recipe is not None else _MISSING)
        return self._ideal

    def _ideal_of(self, recipe: Any) -> float:
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
        if state != self.state and self.on_change is not None:
            self.on_change(state)
        self.state = state
        self._seconds = state + "_s"
        self.event = StateEvent(new_event_id(), self.thing_id, self.line, state, at, at, source,
                                reason=reason, note=note, reason_by=by)
        self.events[self.event.id] = self.event
        self.clock = max(self.clock, at)

    # ------------------------------------------------------------------ time
    def advance(self, to: float) -> None:
        """Account [accounted, to) to the current state, minute by minute of the calendar."""
        if to > self.clock:
            self.clock = to
        t = self._accounted
        if to <= t:
            return
        self._accounted = to
        if not self.state:
            return
        name = self._seconds
        event = self.event
        while t < to:
            p = self._period(t)
            end = self._minute_end
            piece = (to if to < end else end) - t
            setattr(p, name, getattr(p, name) + piece)
            if event is not None:
                event.end = t + piece
                if self._minute_planned:
                    event.planned_s += piece
            t += piece
        if event is not None:
            self.events[event.id] = event

    def _period(self, t: float) -> Period:
        """The record time and units at `t` go to (the one of the minute last asked for is kept at hand)."""
        if self._minute_end - MINUTE <= t < self._minute_end:
            return self._minute_period
        start = math.floor(t / MINUTE) * MINUTE
        info = self.calendar.minute(start)
        key = PeriodKey(self.thing_id, self.line, math.floor(t / 3600.0) * 3600.0, info.day, info.shift, info.planned)
        p = self.periods.get(key)
        if p is None:
            p = self.periods[key] = Period()
        self._minute_end, self._minute_period, self._minute_planned = start + MINUTE, p, info.planned
        return p

    def take(self) -> tuple[dict[PeriodKey, Period], list[StateEvent], dict[str, float]]:
        """What changed since the last call, for a flush: periods, events (copies), counter values."""
        self.advance(self.clock)
        periods, self.periods = self.periods, {}
        self._minute_end = -math.inf
        events = [dataclasses.replace(e) for e in self.events.values()]
        self.events = {}
        counters = {path: c.last for path, c in self.counters.items() if c.last is not None}
        return periods, events, counters
