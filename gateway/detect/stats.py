"""Tier 2: statistics per property, updated in O(1) per reading with no stored window.

Two views of each property: a z-score against an exponentially weighted rolling mean and variance
(sudden departures: spikes, jumps), and an EWMA control chart — a fast EWMA of the readings against
a slow baseline with control limits — for small sustained shifts (drift) a z-score misses. Nothing
alerts before `warmup` readings; readings far outside the limits teach the baseline only a clipped
amount, so an anomaly does not become the new normal while it lasts.

The state of every (Thing, property) is a row of one array (`StatArrays`). The detector hands a
tick's readings to `StatsTier.add` and they are advanced together at the tick (`StatsTier.flush`):
one numpy operation per step of the formulas for all of them, instead of a Python call per property
and reading. A property read several times in one tick is advanced once per reading, in order; where
too few properties share a step for arrays to pay (a handful of Things, batched samples), the same
formulas run on plain floats (`_advance` takes either).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gateway.common.compact import EMPTY, KeyedArray, Layout

CHART_LAMBDA = 0.2  # weight of the newest reading in the control chart's statistic
CLIP = 2.0  # readings teach the mean and variance at most this many standard deviations
LEARN_MARGIN = 1.5  # learned online from a short window: wider than a trained model's 1.25
VECTOR_MIN = 16  # properties a batch step must hold to be cheaper as arrays than one by one
CHART_SCALE = math.sqrt(CHART_LAMBDA / (2 - CHART_LAMBDA))  # its standard deviation relative to the readings'


@dataclass(frozen=True, slots=True)
class StatHit:
    """A property the statistics find unusual: how far, against what, and the tier's score for it."""

    key: str
    value: float
    usual: float
    z: float
    score: float
    chart: bool  # True: the sustained-shift chart, False: the sudden-departure z-score


@dataclass(frozen=True)
class StatsSettings:
    span: int = 60  # readings in the rolling window (exponentially weighted)
    baseline_span: int = 600  # readings in the slow baseline of the control chart
    warmup: int = 120  # readings before a property may alert
    learn: int = 1800  # without a trained model: readings after warm-up whose worst deviation sets the limits
    z_limit: float = 6.0  # |z| at which the tier's score reaches 0.5
    chart_limit: float = 5.0  # control limit of the EWMA chart, in its standard deviations


def group_of(key: str) -> str | None:
    """`thermal/temperature_zones[1]` → `thermal/temperature_zones[*]`, `electrical/voltage.a` →
    `electrical/voltage.*`; None for a property without sisters."""
    if key.endswith("]") and "[" in key:
        return sys.intern(key[: key.rindex("[")] + "[*]")
    feature, _, path = key.partition("/")
    if "." in path:
        return sys.intern(f"{feature}/{path.split('.', 1)[0]}.*")
    return None


class _Floats:
    """The element-wise operations of `_advance` and `_judge` on Python floats: one reading of one property."""

    max = staticmethod(max)
    min = staticmethod(min)
    abs = staticmethod(abs)
    sqrt = staticmethod(math.sqrt)

    @staticmethod
    def where(cond: Any, a: Any, b: Any) -> Any:
        return a if cond else b

    @staticmethod
    def no(cond: Any) -> Any:
        return not cond

    @staticmethod
    def clip(cond: Any, x: Any, limit: Any) -> Any:
        """`x` clipped to ±`limit` where `cond`."""
        return max(-limit, min(limit, x)) if cond else x

    @staticmethod
    def worst(cond: Any, worst: Any, x: Any) -> Any:
        """The larger of `worst` and |x| where `cond`."""
        return max(worst, abs(x)) if cond else worst


class _Arrays:
    """The same on arrays, one element per property. `max` and `min` are Python's `max(a, b)` and
    `min(a, b)` element-wise, NaN included (`b` only where `b > a`, resp. `b < a`), so a property whose
    state overflowed scores the same either way."""

    abs = staticmethod(np.abs)
    sqrt = staticmethod(np.sqrt)
    where = staticmethod(np.where)
    no = staticmethod(np.logical_not)

    @staticmethod
    def max(a: Any, b: Any) -> Any:
        return np.where(b > a, b, a)

    @staticmethod
    def min(a: Any, b: Any) -> Any:
        return np.where(b < a, b, a)

    @staticmethod
    def clip(cond: Any, x: Any, limit: Any) -> Any:
        return np.where(cond, _Arrays.max(-limit, _Arrays.min(limit, x)), x)

    @staticmethod
    def worst(cond: Any, worst: Any, x: Any) -> Any:
        return np.where(cond, _Arrays.max(worst, np.abs(x)), worst)


# the rows of `StatArrays.state`
N, MEAN, VAR, BASE, BASE_VAR, CHART, WORST_Z, WORST_C = range(8)


def _advance(v: Any, x: Any, s: StatsSettings, on: Any) -> tuple[tuple[Any, ...], Any, Any]:
    """Take one reading `x` into the state `v` (the rows of `StatArrays.state`) of a property that has had
    at least one, or of many at once: `on` is `_Floats` or `_Arrays`. Returns (the state after, z against
    the rolling window, the chart's deviation in control limits); both are 0 during warm-up. Until a window
    is full its average is the plain cumulative one, so early limits are not too tight."""
    n, mean, var, base, base_var, chart, worst_z, worst_c = v
    top, root, clip, where = on.max, on.sqrt, on.clip, on.where
    a = top(2.0 / (s.span + 1), 1.0 / (n + 1))
    b = top(2.0 / (s.baseline_span + 1), 1.0 / (n + 1))
    floor = 0.005 + 1e-4 * on.abs(base)  # sensors report to 2-3 decimals: no infinitely tight limits
    sd = top(root(var), floor)
    base_sd = top(root(base_var), floor)
    chart = chart + CHART_LAMBDA * (x - chart)
    warm = n >= s.warmup
    z = where(warm, (x - mean) / sd, 0.0)
    dev = where(warm, (chart - base) / (s.chart_limit * base_sd * CHART_SCALE), 0.0)
    # once warm, learn at most CLIP sd from an outlier: a fault's first readings must not widen the limits
    r = clip(warm, x - mean, CLIP * sd)
    rb = clip(warm, x - base, CLIP * base_sd)
    learning = warm & (n + 1 <= s.warmup + s.learn)  # what normal looks like, for limits when no model set them
    after = (n + 1, mean + a * r, (1 - a) * (var + a * r * r), base + b * rb, (1 - b) * (base_var + b * rb * rb),
             chart, on.worst(learning, worst_z, z), on.worst(learning, worst_c, dev))
    return after, z, dev


def _judge(limited: Any, z_limit: Any, chart_limit: Any, worst_z: Any, worst_c: Any, z: Any, dev: Any, n: Any,
           s: StatsSettings, on: Any) -> tuple[Any, Any, Any]:
    """(score, chart, hit) of readings after `_advance`: against the limits a model calibrated for the
    (type, property) where `limited`, else — once the property has learned — the limits it learned."""
    z_limit = on.where(limited, z_limit, on.max(s.z_limit, LEARN_MARGIN * worst_z))
    chart_limit = on.where(limited, chart_limit, on.max(1.0, LEARN_MARGIN * worst_c))
    zs = on.abs(z) / z_limit
    cs = on.abs(dev) / chart_limit
    score = 0.5 * on.max(zs, cs)
    hit = on.no(score < 0.25) & (limited | (n > s.warmup + s.learn))
    return on.min(1.0, score), cs > zs, hit


@dataclass(frozen=True, slots=True)
class Step:
    """What one reading per slot did, one array element per reading."""

    z: np.ndarray  # against the rolling window (0 during warm-up)
    dev: np.ndarray  # the chart's deviation, in control limits (0 during warm-up)
    usual: np.ndarray  # the rolling mean before the reading
    base: np.ndarray  # the chart's baseline before the reading
    n: np.ndarray  # readings taken, this one included


class StatArrays:
    """EW mean/variance (fast and slow), the control chart's statistic and, while learning, the worst |z|
    and chart deviation of many properties: row `slot` of `state` (columns N, MEAN, ... WORST_C)."""

    def __init__(self, settings: StatsSettings, size: int = 0) -> None:
        self.settings = settings
        self.state = np.zeros((size, 8))

    def __len__(self) -> int:
        return len(self.state)

    def grow(self, size: int) -> None:
        """Room for at least `size` slots; new slots start empty."""
        if size > len(self):
            more = max(size, len(self) * 5 // 4, 64) - len(self)  # a quarter more: amortised, little slack
            self.state = np.concatenate([self.state, np.zeros((more, 8))])

    def clear(self, slot: int) -> None:
        """Empty a slot for reuse."""
        self.state[slot] = 0.0

    def step(self, slots: np.ndarray, x: np.ndarray) -> Step:
        """Take one reading `x[i]` into each slot `slots[i]` (no slot twice), all at once."""
        v = self.state[slots].T
        after, z, dev = _advance(v, x, self.settings, _Arrays)
        state = np.array(after)
        first = v[N] == 0
        if first.any():  # a property's first reading only sets its averages
            state[:, first] = 0.0
            state[N, first] = 1.0
            state[MEAN, first] = state[BASE, first] = state[CHART, first] = x[first]
            z = np.where(first, 0.0, z)
            dev = np.where(first, 0.0, dev)
        self.state[slots] = state.T
        return Step(z, dev, v[MEAN], v[BASE], state[N])

    def step_many(self, slots: list[int], xs: list[float]) -> list[tuple[float, float, float, float, float]]:
        """Take the readings one by one as plain floats, in order (a slot may come again): per reading (z, chart
        deviation, usual before, baseline before, readings). Each slot's state is read and written once."""
        s, state = self.settings, self.state
        held: dict[int, Any] = {}
        out = []
        for slot, x in zip(slots, xs, strict=True):
            v = held.get(slot)
            if v is None:
                v = state[slot].tolist()
            if v[N] == 0:  # its first reading only sets its averages
                held[slot] = (1.0, x, 0.0, x, 0.0, x, 0.0, 0.0)
                out.append((0.0, 0.0, v[MEAN], v[BASE], 1.0))
            else:
                after, z, dev = _advance(v, x, s, _Floats)
                held[slot] = after
                out.append((z, dev, v[MEAN], v[BASE], after[N]))
        for slot, v in held.items():
            state[slot] = v
        return out


@dataclass(frozen=True, slots=True)
class _Reading:
    """One reading handed to `StatsTier.add`: its properties are `StatsTier`'s pending entries start..end."""

    owner: Any
    ts: float
    thing_type: str
    start: int
    end: int


class StatsTier:
    """Statistics for every (Thing, property) the detector sees.

    `limits` holds per (equipment type, property) limits learned from normal history when a model is
    trained (z limit, chart limit): a cycling mixer current needs wider limits than an oven probe."""

    def __init__(self, settings: StatsSettings) -> None:
        self.settings = settings
        self.limits: dict[tuple[str, str], tuple[float, float]] = {}
        self.group_limits: dict[tuple[str, str], float] = {}
        self._arrays = StatArrays(settings)
        self._slots: dict[str, KeyedArray[str, int]] = {}  # Thing → property → its slot
        self._root: Layout[str] = KeyedArray.root()  # where a Thing keeps each slot, shared by Things alike
        self._key: list[str] = []  # per slot: the property, its sisters' group, the type whose limits apply
        self._group: list[str | None] = []
        self._type: list[str] = []
        self.types: Sequence[str] = self._type  # read-only: the type each slot's limits are of
        self._free: list[int] = []
        self._limited = np.zeros(0, dtype=bool)  # per slot: calibrated limits, and what they are
        self._z_limit = np.zeros(0)
        self._chart_limit = np.zeros(0)
        self._grouped: set[str] = set()  # types with limits for sister groups
        self._pending_slots: list[int] = []
        self._pending_x: list[float] = []
        self._pending: list[_Reading] = []
        self._hits: list[tuple[Any, float, StatHit]] = []

    def __len__(self) -> int:
        return sum(len(slots) for slots in self._slots.values())

    # ----------------------------------------------------------------- slots and limits
    def calibrate(self, thing_type: str, keys: list[str], z_limits: list[float], chart_limits: list[float],
                  groups: dict[str, float] | None = None) -> None:
        self.settle()  # what arrived before is judged by the limits it arrived under
        for k in [k for k in self.limits if k[0] == thing_type]:
            del self.limits[k]
        for g in [g for g in self.group_limits if g[0] == thing_type]:
            del self.group_limits[g]
        for key, zl, cl in zip(keys, z_limits, chart_limits, strict=True):
            self.limits[(thing_type, key)] = (zl, cl)
        for group, limit in (groups or {}).items():
            self.group_limits[(thing_type, group)] = limit
        self._grouped = {t for t, _g in self.group_limits}
        for slot in (slot for slots in self._slots.values() for slot in slots.values()):
            if self._type[slot] == thing_type:
                self._set_limits(slot)

    def _set_limits(self, slot: int) -> None:
        limits = self.limits.get((self._type[slot], self._key[slot]))
        self._limited[slot] = limits is not None
        self._z_limit[slot], self._chart_limit[slot] = limits if limits is not None else (math.nan, math.nan)

    def slots_of(self, thing_id: str) -> Mapping[str, int]:
        """A Thing's slots by property (empty for a Thing with none; a new Thing's first `slot` makes a
        mapping of its own, so ask again after it)."""
        return self._slots.get(thing_id, EMPTY)

    def slot(self, thing_id: str, key: str, thing_type: str) -> int:
        """The slot of a (Thing, property), made on first sight; `thing_type` says whose limits apply."""
        of_thing = self._slots.get(thing_id)
        if of_thing is None:
            of_thing = self._slots[thing_id] = KeyedArray(self._root, "i")
        slot = of_thing.get(key)
        if slot is None:
            key = sys.intern(key)  # one string per property name, not one per Thing
            if self._free:
                slot = self._free.pop()
                self._key[slot], self._group[slot], self._type[slot] = key, group_of(key), thing_type
            else:
                slot = len(self._key)
                self._key.append(key)
                self._group.append(group_of(key))
                self._type.append(thing_type)
                if slot >= len(self._arrays):
                    self._arrays.grow(slot + 1)
                    more = len(self._arrays) - len(self._limited)
                    self._limited = np.concatenate([self._limited, np.zeros(more, dtype=bool)])
                    self._z_limit = np.concatenate([self._z_limit, np.zeros(more)])
                    self._chart_limit = np.concatenate([self._chart_limit, np.zeros(more)])
            of_thing[key] = slot
            self._set_limits(slot)
        elif self._type[slot] != thing_type:  # the Thing changed its type: other limits from now on
            self.settle()
            self._type[slot] = thing_type
            self._set_limits(slot)
        return slot

    def forget(self, thing_id: str) -> None:
        self.settle()
        for slot in self._slots.pop(thing_id, {}).values():
            self._arrays.clear(slot)
            self._free.append(slot)

    # ----------------------------------------------------------------- readings
    def add(self, owner: Any, ts: float, thing_type: str, slots: list[int], xs: list[float]) -> None:
        """One reading's properties (their slots and values), judged at the next `flush`; its hits are
        returned with `owner` and `ts`."""
        if slots:
            start = len(self._pending_slots)
            self._pending_slots += slots
            self._pending_x += xs
            self._pending.append(_Reading(owner, ts, thing_type, start, start + len(slots)))

    def flush(self) -> list[tuple[Any, float, StatHit]]:
        """Advance every pending reading; the hits (owner, ts, hit) in the order the readings arrived,
        within a reading its properties' hits before its sister groups'."""
        self.settle()
        hits, self._hits = self._hits, []
        return hits

    def update(self, thing_id: str, key: str, x: float, thing_type: str = "") -> tuple[StatHit | None, float, float]:
        """Take one reading at once: (a StatHit when the property is at least half-way to its limits, its z,
        its usual)."""
        self.settle()
        slot = self.slot(thing_id, key, thing_type)
        [(z, _dev, usual, base, _n)] = steps = self._arrays.step_many([slot], [float(x)])
        [(score, chart, hit)] = self._judge_floats([slot], steps)
        return (StatHit(key, float(x), base if chart else usual, z, score, chart) if hit else None), z, usual

    def _judge_floats(self, slots: list[int], steps: list[tuple[float, float, float, float, float]]) -> list[Any]:
        """`_judge` of readings stepped one by one."""
        state, limited, z_limit, chart_limit, s = (self._arrays.state, self._limited, self._z_limit,
                                                   self._chart_limit, self.settings)
        learned = s.warmup + s.learn
        out: list[Any] = []
        for slot, (z, dev, _usual, _base, n) in zip(slots, steps, strict=True):
            if n <= learned and not limited.item(slot):
                out.append((0.0, False, False))  # still learning its normal range: never a hit
            else:
                out.append(_judge(limited.item(slot), z_limit.item(slot), chart_limit.item(slot),
                                  state.item(slot, WORST_Z), state.item(slot, WORST_C), z, dev, n, s, _Floats))
        return out

    def settle(self) -> None:
        """Advance the pending readings now (before limits or slots change under them)."""
        if not self._pending:
            return
        slots, xs, readings = self._pending_slots, self._pending_x, self._pending
        self._pending_slots, self._pending_x, self._pending = [], [], []
        if len(slots) < VECTOR_MIN:  # a few readings: as plain floats, no array set-up
            steps = self._arrays.step_many(slots, xs)
            z, _dev, usual, base, _n = (list(column) for column in zip(*steps, strict=True))
            score, chart, hit = (list(column) for column in zip(*self._judge_floats(slots, steps), strict=True))
        else:
            with np.errstate(all="ignore"):
                step = self._advance(slots, xs)
                at, arr = np.array(slots, dtype=np.intp), self._arrays
                judged = _judge(self._limited[at], self._z_limit[at], self._chart_limit[at], arr.state[at, WORST_Z],
                                arr.state[at, WORST_C], step.z, step.dev, step.n, self.settings, _Arrays)
            if not self._grouped and not judged[2].any():
                return
            z, usual, base = step.z.tolist(), step.usual.tolist(), step.base.tolist()
            score, chart, hit = (a.tolist() for a in judged)
        grouped, keys, groups = self._grouped, self._key, self._group
        for r in readings:
            sisters: dict[str, list[tuple[str, float, float, float]]] | None = {} if r.thing_type in grouped else None
            for j in range(r.start, r.end):
                if hit[j]:
                    key, on_chart = keys[slots[j]], chart[j]
                    self._hits.append((r.owner, r.ts, StatHit(key, xs[j], base[j] if on_chart else usual[j], z[j],
                                                              score[j], on_chart)))
                if sisters is not None and z[j]:
                    g = groups[slots[j]]
                    if g is not None:
                        sisters.setdefault(g, []).append((keys[slots[j]], xs[j], usual[j], z[j]))
            for g, members in (sisters or {}).items():
                if len(members) > 1:
                    gh = self.group(r.thing_type, g, members)
                    if gh is not None:
                        self._hits.append((r.owner, r.ts, gh))

    def _advance(self, slots: list[int], xs: list[float]) -> Step:
        """Step every reading in arrival order. A slot read k times in the batch takes part in k rounds, one
        reading a round; a round of at least VECTOR_MIN slots is one array step, the readings of smaller
        rounds (a few properties read many times: batched samples) go one by one."""
        at, x = np.array(slots, dtype=np.intp), np.array(xs, dtype=np.float64)
        if len(set(slots)) == len(slots):
            return self._arrays.step(at, x)
        seen: dict[int, int] = {}
        ranks = []
        for slot in slots:  # how many readings of the same slot came before in the batch
            k = seen[slot] = seen.get(slot, -1) + 1
            ranks.append(k)
        rank = np.array(ranks, dtype=np.intp)
        size = np.bincount(rank)  # slots per round, falling
        if size[0] < VECTOR_MIN:  # too few properties for any round: all one by one
            columns = zip(*self._arrays.step_many(slots, xs), strict=True)
            return Step(*(np.array(column) for column in columns))
        z, dev, usual, base, n = (np.empty(len(x)) for _ in range(5))
        k = 0
        while k < len(size) and size[k] >= VECTOR_MIN:
            sel = np.flatnonzero(rank == k)
            st = self._arrays.step(at[sel], x[sel])
            z[sel], dev[sel], usual[sel], base[sel], n[sel] = st.z, st.dev, st.usual, st.base, st.n
            k += 1
        rest = [j for j, r in enumerate(ranks) if r >= k]  # in arrival order: each slot's readings in order
        if rest:
            columns = zip(*self._arrays.step_many([slots[j] for j in rest], [xs[j] for j in rest]), strict=True)
            for out, column in zip((z, dev, usual, base, n), columns, strict=True):
                out[rest] = column
        return Step(z, dev, usual, base, n)

    def group(self, thing_type: str, group: str, members: list[tuple[str, float, float, float]]) -> StatHit | None:
        """Sister properties (`temperature_zones[0..2]`, `voltage.a..c`) that move together: their joint z
        (sum / sqrt(n)) sees a shift of all of them before any one alone crosses its limit.
        `members`: (key, value, usual, z) of one reading."""
        limit = self.group_limits.get((thing_type, group))
        if limit is None:
            return None  # sisters may move together normally (phase currents): only a trained limit counts
        joint = sum(m[3] for m in members) / math.sqrt(len(members))
        score = 0.5 * abs(joint) / limit
        if score < 0.25:
            return None
        key, value, usual, _z = max(members, key=lambda m: abs(m[3]))
        return StatHit(key, value, usual, joint, min(1.0, score), False)
