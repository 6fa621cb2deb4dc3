"""Tier 2: statistics per property, updated in O(1) per reading with no stored window.

Two views of each property: a z-score against an exponentially weighted rolling mean and variance
(sudden departures: spikes, jumps), and an EWMA control chart — a fast EWMA of the readings against
a slow baseline with control limits — for small sustained shifts (drift) a z-score misses. Nothing
alerts before `warmup` readings; readings far outside the limits teach the baseline only a clipped
amount, so an anomaly does not become the new normal while it lasts.
"""

from __future__ import annotations

import math
import sys
from array import array
from dataclasses import dataclass

CHART_LAMBDA = 0.2  # weight of the newest reading in the control chart's statistic
CLIP = 2.0  # readings teach the mean and variance at most this many standard deviations
LEARN_MARGIN = 1.5  # learned online from a short window: wider than a trained model's 1.25
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
        return key[: key.rindex("[")] + "[*]"
    feature, _, path = key.partition("/")
    if "." in path:
        return f"{feature}/{path.split('.', 1)[0]}.*"
    return None


# One property's state: 8 doubles in a row of an `array("d")` (no Python object or float per number:
# a gateway with 10,000 Things keeps some 100,000 of them)
N, MEAN, VAR, BASE, BASE_VAR, CHART, WORST_Z, WORST_C = range(8)
WIDTH = 8


def update_row(a: array[float], o: int, x: float, s: StatsSettings) -> tuple[float, float]:
    """Take one reading into the row at `a[o:o + WIDTH]`: EW mean/variance (fast and slow) and the control
    chart's statistic. Returns (z against the rolling window, chart deviation in control limits)."""
    n, mean, var, base, base_var, chart, worst_z, worst_c = a[o:o + WIDTH]
    if n == 0:
        a[o + N], a[o + MEAN], a[o + BASE], a[o + CHART] = 1.0, x, x, x
        return 0.0, 0.0
    # Until a window is full its average is the plain cumulative one, so early limits are not too tight.
    a_ = max(2.0 / (s.span + 1), 1.0 / (n + 1))
    b = max(2.0 / (s.baseline_span + 1), 1.0 / (n + 1))
    floor = 0.005 + 1e-4 * abs(base)  # sensors report to 2-3 decimals: no infinitely tight limits
    sd = max(math.sqrt(var), floor)
    base_sd = max(math.sqrt(base_var), floor)
    r = x - mean
    z = r / sd
    chart += CHART_LAMBDA * (x - chart)
    dev = (chart - base) / (s.chart_limit * base_sd * CHART_SCALE)
    warm = n >= s.warmup
    if warm:  # learn at most CLIP sd from an outlier: a fault's first readings must not widen the limits
        r = max(-CLIP * sd, min(CLIP * sd, r))
    mean += a_ * r
    var = (1 - a_) * (var + a_ * r * r)
    rb = x - base
    if warm:
        rb = max(-CLIP * base_sd, min(CLIP * base_sd, rb))
    base += b * rb
    base_var = (1 - b) * (base_var + b * rb * rb)
    n += 1
    if warm and n <= s.warmup + s.learn:  # what normal looks like, for limits when no model calibrated them
        worst_z = max(worst_z, abs(z))
        worst_c = max(worst_c, abs(dev))
    a[o:o + WIDTH] = array("d", (n, mean, var, base, base_var, chart, worst_z, worst_c))
    return (z, dev) if warm else (0.0, 0.0)


class PropertyStats:
    """The statistics of one property on their own (model training runs them per Thing and property)."""

    __slots__ = ("_row",)

    def __init__(self) -> None:
        self._row = array("d", bytes(8 * WIDTH))

    @property
    def n(self) -> int:
        return int(self._row[N])

    @property
    def mean(self) -> float:
        return self._row[MEAN]

    @property
    def base(self) -> float:
        return self._row[BASE]

    def update(self, x: float, s: StatsSettings) -> tuple[float, float]:
        """Take one reading; return (z against the rolling window, chart deviation in control limits)."""
        return update_row(self._row, 0, x, s)


class StatsTier:
    """Statistics for every (Thing, property) the detector sees.

    `limits` holds per (equipment type, property) limits learned from normal history when a model is
    trained (z limit, chart limit): a cycling mixer current needs wider limits than an oven probe."""

    def __init__(self, settings: StatsSettings) -> None:
        self.settings = settings
        self._rows = array("d")  # WIDTH numbers per property (see update_row)
        self._index: dict[str, dict[str, int]] = {}  # Thing → property → offset of its row
        self._free: list[int] = []  # rows of forgotten Things, for reuse
        self.limits: dict[tuple[str, str], tuple[float, float]] = {}
        self.group_limits: dict[tuple[str, str], float] = {}

    def calibrate(self, thing_type: str, keys: list[str], z_limits: list[float], chart_limits: list[float],
                  groups: dict[str, float] | None = None) -> None:
        for k in [k for k in self.limits if k[0] == thing_type]:
            del self.limits[k]
        for g in [g for g in self.group_limits if g[0] == thing_type]:
            del self.group_limits[g]
        for key, zl, cl in zip(keys, z_limits, chart_limits, strict=True):
            self.limits[(thing_type, key)] = (zl, cl)
        for group, limit in (groups or {}).items():
            self.group_limits[(thing_type, group)] = limit

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

    def __len__(self) -> int:
        return sum(len(props) for props in self._index.values())

    def forget(self, thing_id: str) -> None:
        for o in self._index.pop(thing_id, {}).values():
            self._rows[o:o + WIDTH] = array("d", bytes(8 * WIDTH))
            self._free.append(o)

    def _row(self, thing_id: str, key: str) -> int:
        props = self._index.get(thing_id)
        if props is None:
            props = self._index[thing_id] = {}
        o = props.get(key)
        if o is None:
            if self._free:
                o = self._free.pop()
            else:
                o = len(self._rows)
                self._rows.extend((0.0,) * WIDTH)
            props[sys.intern(key)] = o
        return o

    def update(self, thing_id: str, key: str, x: float, thing_type: str = "") -> tuple[StatHit | None, float, float]:
        """Take one reading: (a StatHit when the property is at least half-way to its limits, its z, its usual)."""
        o = self._row(thing_id, key)
        a = self._rows
        usual, base = a[o + MEAN], a[o + BASE]
        s = self.settings
        z, dev = update_row(a, o, x, s)
        limits = self.limits.get((thing_type, key))
        if limits is not None:
            z_limit, chart_limit = limits
        elif a[o + N] <= s.warmup + s.learn:
            return None, z, usual  # still learning this property's normal range
        else:
            z_limit, chart_limit = (max(s.z_limit, LEARN_MARGIN * a[o + WORST_Z]),
                                    max(1.0, LEARN_MARGIN * a[o + WORST_C]))
        zs = abs(z) / z_limit
        cs = abs(dev) / chart_limit
        score = 0.5 * max(zs, cs)
        if score < 0.25:
            return None, z, usual
        chart = cs > zs
        return StatHit(key, x, base if chart else usual, z, min(1.0, score), chart), z, usual
