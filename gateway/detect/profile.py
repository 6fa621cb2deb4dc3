"""The operating profile: where each property of a Thing normally sits, learned from a short normal history.

Real equipment is noisy reading by reading and drifts slowly (a motor warms up for an hour). The
profile therefore looks at each property through an exponentially weighted average of its readings
(a few seconds), not at single readings, and judges a property that drifted during training (its two
halves differ by many times its reading-to-reading noise) by its departure from its own slow average
rather than by its level, which a short history cannot bound. Each property's deviation is measured
in its own training standard deviations and divided by its limit: the `quantile` of the same
deviation on the last `holdout` share of the training rows, which the means and spreads did not see
(a split conformal calibration, taken in time order so that the held-out part also shows how far
normal operation wanders from where it was). The profile's ratio is the largest property's; the
detector scores `margin` times the limit as 0.5 (an anomaly opens) and the anomaly clears once the
ratio falls below `exit_ratio` times that. Scoring is a handful of vector operations per row
(numpy); the state per Thing is two vectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

FAST_HALF_LIFE = 6.5  # readings: the smoothing of the levels (weight 0.1 per reading)
SLOW_HALF_LIFE = 140.0  # readings: the baseline a drifting property is judged against
DRIFT_RATIO = 5.0  # mean shift between the training halves, in reading-to-reading noise, that marks drift
QUANTILE = 0.99
HOLDOUT = 0.25
MARGIN = 4.0  # the limit times this opens an anomaly ...
EXIT_RATIO = 0.8  # ... and this share of it counts as clear again
SKIP = 50  # the first training rows only settle the averages
SETTLE = 30  # live: rows before a Thing's profile may score (the first reading's weight is then below 5 %)
# the score is 0.5 * (ratio / margin) ** POWER: 0.5 at the margin, 0.3 (the detector's exit) at EXIT_RATIO
POWER = math.log(0.6) / math.log(EXIT_RATIO)


def _weight(half_life: float, dt: float) -> float:
    return 1.0 - 0.5 ** (dt / half_life)


@dataclass(frozen=True)
class Profile:
    """A trained profile (what the model version's manifest holds under `profile`)."""

    period_s: float  # the median time between training rows: the averages advance per this much device time
    drifting: tuple[bool, ...]
    mean: tuple[float, ...]  # of the smoothed level (or departure, for drifting properties)
    std: tuple[float, ...]
    limit: tuple[float, ...]  # the calibrated |z| of each property
    margin: float = MARGIN
    decides: bool = False  # trained on a short history: the profile alone decides (models.SHORT_HISTORY_ROWS)

    def to_json(self) -> dict[str, Any]:
        return {"period_s": self.period_s, "drifting": list(self.drifting), "mean": list(self.mean),
                "std": list(self.std), "limit": list(self.limit), "margin": self.margin, "decides": self.decides,
                "fast_half_life": FAST_HALF_LIFE, "slow_half_life": SLOW_HALF_LIFE}

    @classmethod
    def from_json(cls, doc: dict[str, Any], d: int) -> Profile:
        p = cls(float(doc["period_s"]), tuple(bool(v) for v in doc["drifting"]),
                tuple(float(v) for v in doc["mean"]), tuple(float(v) for v in doc["std"]),
                tuple(float(v) for v in doc["limit"]), float(doc.get("margin", MARGIN)), bool(doc.get("decides")))
        if any(len(a) != d for a in (p.drifting, p.mean, p.std, p.limit)) or p.period_s <= 0:
            raise ValueError("profile does not match the features")
        return p

    def score(self, ratio: float) -> float:
        """A ratio (largest deviation / its limit) on the detector's 0..1 scale."""
        return min(1.0, 0.5 * (max(ratio, 0.0) / self.margin) ** POWER)


class ProfileState:
    """The averages of one Thing: advanced by each scored row, in device time. Until they have settled
    (`SETTLE` rows after the first, as after a restart) the ratios are zero."""

    __slots__ = ("fast", "n", "slow", "ts")

    def __init__(self) -> None:
        self.fast: np.ndarray | None = None
        self.slow: np.ndarray | None = None
        self.ts = 0.0
        self.n = 0

    def update(self, profile: Profile, x: np.ndarray, ts: float) -> np.ndarray:
        """Take one row of raw values; return each property's deviation as a multiple of its limit."""
        if self.fast is None or self.slow is None:
            self.fast, self.slow, self.ts = x.copy(), x.copy(), ts
        else:
            steps = min(max((ts - self.ts) / profile.period_s, 0.0), 1e6)
            self.ts = max(self.ts, ts)
            self.fast += _weight(FAST_HALF_LIFE, steps) * (x - self.fast)
            self.slow += _weight(SLOW_HALF_LIFE, steps) * (x - self.slow)
        self.n += 1
        if self.n <= SETTLE:
            return np.zeros(len(x))
        return ratios(profile, self.fast, self.slow)

    def expected(self, profile: Profile) -> np.ndarray:
        """Where each property normally sits now: its trained level, or its slow average for a drifting one."""
        mean = np.asarray(profile.mean)
        if self.slow is None:
            return mean
        return np.where(np.asarray(profile.drifting), self.slow + mean, mean)


def ratios(profile: Profile, fast: np.ndarray, slow: np.ndarray) -> np.ndarray:
    level = np.where(np.asarray(profile.drifting), fast - slow, fast)
    z = (level - np.asarray(profile.mean)) / np.asarray(profile.std)
    return np.abs(z) / np.asarray(profile.limit)


def _smooth(block: np.ndarray, half_life: float) -> np.ndarray:
    out = np.empty_like(block)
    a = _weight(half_life, 1.0)
    m = block[0].copy()
    for i, row in enumerate(block):
        m += a * (row - m)
        out[i] = m
    return out


def fit_profile(blocks: list[np.ndarray], period_s: float, *, quantile: float = QUANTILE,
                holdout: float = HOLDOUT, margin: float = MARGIN, decides: bool = False) -> Profile:
    """Fit on the time-ordered rows of one or more Things (each block: rows x features, raw units)."""
    usable = [b for b in blocks if len(b) >= 40]
    if not usable:
        raise ValueError("a profile needs at least 40 time-ordered rows of one Thing")
    d = usable[0].shape[1]
    shift = np.zeros(d)
    for b in usable:
        h = len(b) // 2
        noise = np.std(np.diff(b, axis=0), axis=0) / math.sqrt(2) + 1e-12
        shift = np.maximum(shift, np.abs(b[h:].mean(axis=0) - b[:h].mean(axis=0)) / noise)
    drifting = shift > DRIFT_RATIO
    fit_rows, held_rows = [], []
    for b in usable:
        level = np.where(drifting, _smooth(b, FAST_HALF_LIFE) - _smooth(b, SLOW_HALF_LIFE), _smooth(b, FAST_HALF_LIFE))
        cut = int(len(b) * (1 - holdout))
        skip = min(SKIP, cut // 4)
        fit_rows.append(level[skip:cut])
        held_rows.append(level[cut:])
    fit, held = np.concatenate(fit_rows), np.concatenate(held_rows)
    mean = fit.mean(axis=0)
    scale = np.maximum(np.abs(mean), 1.0)
    std = np.maximum(fit.std(axis=0), 1e-6 * scale)
    limit = np.maximum(np.quantile(np.abs((held - mean) / std), quantile, axis=0),
                       np.quantile(np.abs((fit - mean) / std), quantile, axis=0))
    limit = np.maximum(limit, 1.0)
    return Profile(float(period_s), tuple(bool(v) for v in drifting), tuple(mean.tolist()), tuple(std.tolist()),
                   tuple(limit.tolist()), float(margin), decides)
