"""Remaining useful life: when a health indicator's trend will cross its limit, with an honest band.

A straight line is fitted to the indicator and, with enough points, a curved model that nests it,
`y = a + b*(exp(k*x) - 1)/k` (x in hours from now): `a` is the level now, `b` the slope now and `k`
how fast the slope grows (k > 0, wear that accelerates) or fades (k < 0, an approach to an
asymptote). k -> 0 is the line again; the curve is kept when the AIC prefers it and k is significant.

The trend counts only when the slope's confidence interval (Student t) lies wholly toward the limit.
Earliest and latest crossings are where the trend's confidence band meets the limit. The band grows
with the slope's standard error times the distance from now, and it also carries the level's error
and, for the curve, the curvature's. For a line this is Fieller's interval, whose coverage is exact
under Gaussian noise; varying the slope alone covered 82 % (line) and 57 % (curve) at a nominal 90 %.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy import optimize, stats

Status = Literal["ok", "insufficient_data", "no_trend", "crossed", "beyond_horizon"]

_CURVE_MIN_POINTS = 12  # a three-parameter fit on fewer points is noise
_MAX_K_SPAN = 20.0  # |k| times the window length at most: exp(20) is curvature no indicator has
_CURVE_CONFIDENCE = 0.99  # the curve is kept only when its curvature is this sure (else 1 line in 6 bends)
_SEARCH_STEPS = 256  # grid steps when looking for where the band meets the limit
_SEARCH_FACTOR = 1000.0  # a latest crossing further than this many times the estimate is "never"


@dataclass(frozen=True)
class RulEstimate:
    """An estimate and a sentence an operator understands; `upper_hours` is inf when the band never crosses."""

    status: Status
    hours: float | None
    lower_hours: float | None
    upper_hours: float | None
    slope_per_hour: float | None
    r2: float | None
    points: int
    model: str | None
    text: str

    def to_json(self) -> dict[str, Any]:
        """camelCase keys; non-finite numbers become null, which JSON can carry."""
        return {
            "status": self.status, "hours": _json_number(self.hours), "lowerHours": _json_number(self.lower_hours),
            "upperHours": _json_number(self.upper_hours), "slopePerHour": _json_number(self.slope_per_hour),
            "r2": _json_number(self.r2), "points": self.points, "model": self.model, "text": self.text,
        }


@dataclass(frozen=True)
class _Fit:
    model: str
    params: np.ndarray  # a, b (line) or a, b, k (curve)
    cov: np.ndarray
    dof: int
    rss: float

    @property
    def a(self) -> float:
        return float(self.params[0])

    @property
    def b(self) -> float:
        return float(self.params[1])

    @property
    def k(self) -> float:
        return float(self.params[2]) if self.params.size > 2 else 0.0

    @property
    def se_b(self) -> float:
        return math.sqrt(float(self.cov[1, 1]))

    def mean(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.a + self.b * _growth(x, self.k))

    def se(self, x: np.ndarray) -> np.ndarray:
        """Standard error of the fitted trend at x (delta method over the parameters' covariance)."""
        jac = [np.ones_like(x), _growth(x, self.k)]
        if self.params.size > 2:
            jac.append(self.b * _growth_dk(x, self.k))
        j = np.stack(jac, axis=-1)
        return np.asarray(np.sqrt(np.maximum(np.einsum("...i,ij,...j->...", j, self.cov, j), 0.0)))


def estimate_rul(t: np.ndarray, y: np.ndarray, *, limit: float, now: float, min_points: int = 30,
                 min_span_s: float = 600.0, horizon_h: float = 72.0, confidence: float = 0.9) -> RulEstimate:
    """Hours until the trend of `y` (at epoch seconds `t`) crosses `limit`, seen from `now`.

    The limit is approached from the side the fitted trend started on, so a trend that has passed it
    is "crossed". Non-finite points are dropped; invalid arguments (not data) raise ValueError.
    """
    if not (math.isfinite(limit) and math.isfinite(now)):
        raise ValueError(f"limit and now must be finite, not {limit!r} and {now!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie between 0 and 1, not {confidence!r}")
    if not horizon_h > 0:
        raise ValueError(f"horizon_h must be positive, not {horizon_h!r}")
    t = np.asarray(t, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if t.shape != y.shape:
        raise ValueError(f"t and y differ in length: {t.size} and {y.size}")
    keep = np.isfinite(t) & np.isfinite(y)
    order = np.argsort(t[keep], kind="stable")
    t, y = t[keep][order], y[keep][order]
    n = int(t.size)
    span_s = float(t[-1] - t[0]) if n else 0.0
    need_points = max(min_points, 3)
    if n < need_points or span_s < min_span_s or span_s <= 0:
        return RulEstimate("insufficient_data", None, None, None, None, None, n, None,
                           f"not enough data for a trend: has {n} points over {_duration(span_s)}, "
                           f"needs {need_points} points over {_duration(min_span_s)}")
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # overflow and ill-conditioning end as a non-finite fit, handled below
        return _estimate((t - now) / 3600.0, y, limit, horizon_h, confidence)


def _estimate(x: np.ndarray, y: np.ndarray, limit: float, horizon_h: float, confidence: float) -> RulEstimate:
    n = int(x.size)
    fit = _line(x, y)
    if fit is None:
        return RulEstimate("no_trend", None, None, None, None, None, n, None, "no trend can be fitted to these values")
    curve = _curve(x, y, fit) if n >= _CURVE_MIN_POINTS else None
    if curve is not None and _aic(curve, n) < _aic(fit, n) and _curvature_is_real(curve):
        fit = curve
    tss = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - fit.rss / tss if tss > 0 else None
    lim = f"{limit:g}"

    def result(status: Status, text: str, hours: float | None = None, lower: float | None = None,
               upper: float | None = None) -> RulEstimate:
        return RulEstimate(status, hours, lower, upper, fit.b, r2, n, fit.model, text)

    start = float(fit.mean(x[:1])[0])
    toward = float(np.sign(limit - start)) or float(np.sign(limit - fit.a))  # +1: the limit lies above
    if toward == 0 or toward * (limit - fit.a) <= 0:
        return result("crossed", f"already beyond {lim}: the trend stands at {fit.a:.4g} now", hours=0.0)

    t_q = float(stats.t.ppf(0.5 + confidence / 2, fit.dof))
    slope = f"{fit.b:+.3g}/h ± {t_q * fit.se_b:.2g}"
    if not toward * fit.b - t_q * fit.se_b > 0:  # the interval includes zero or points away
        return result("no_trend", f"no significant trend toward {lim} (slope {slope} at {confidence:.0%})")

    hours = _crossing(fit.a, fit.b, fit.k, limit)
    if not hours <= horizon_h:
        return result("beyond_horizon", f"at this rate it does not cross {lim} within {horizon_h:g} h "
                                        f"(slope {slope})")

    def gap(sign: float) -> Callable[[np.ndarray], np.ndarray]:
        """Distance left to the limit from the near (sign -1) or far (+1) edge of the band."""
        return lambda xs: toward * (limit - fit.mean(xs)) + sign * t_q * fit.se(xs)

    # The near edge is at or past the limit by `hours`, the far edge only there or later.
    lower = min(hours, _first_root(gap(-1.0), 0.0, hours))
    upper = max(hours, _first_root(gap(+1.0), hours, hours * _SEARCH_FACTOR))
    band = _band_text(lower, upper) if math.isfinite(upper) else f"{_hours(lower)} or later"
    return result("ok", f"at this rate it crosses {lim} in ~{_hours(hours)} ({band})",
                  hours=hours, lower=lower, upper=upper)


def _line(x: np.ndarray, y: np.ndarray) -> _Fit | None:
    if np.ptp(x) <= 0:
        return None
    r = stats.linregress(x, y)
    a, b = float(r.intercept), float(r.slope)
    rss = float(np.sum((y - (a + b * x)) ** 2))
    # Our own covariance: linregress gives NaN errors for a series that never changes, whose slope is surely 0.
    design = np.stack([np.ones_like(x), x], axis=1)
    cov = rss / (x.size - 2) * np.linalg.inv(design.T @ design)
    if not (math.isfinite(a) and math.isfinite(b) and np.all(np.isfinite(cov))):
        return None
    return _Fit("linear", np.array([a, b]), cov, x.size - 2, rss)


def _curve(x: np.ndarray, y: np.ndarray, line: _Fit) -> _Fit | None:
    """The curved model, or None when it does not converge to something usable."""
    k_max = _MAX_K_SPAN / float(np.ptp(x))
    try:
        # A quadratic's curvature starts k near the answer: b*k/2 is the x^2 coefficient.
        c2, c1, _ = np.polyfit(x, y, 2)
        k0 = float(np.clip(2 * c2 / c1, -k_max / 2, k_max / 2)) if c1 != 0 and math.isfinite(c2 / c1) else 0.0
        popt, pcov = optimize.curve_fit(
            lambda xs, a, b, k: a + b * _growth(xs, k), x, y, p0=(line.a, line.b, k0),
            bounds=([-np.inf, -np.inf, -k_max], [np.inf, np.inf, k_max]), maxfev=2000)
    except (RuntimeError, ValueError):  # no convergence, or values the solver cannot take
        return None
    params, cov = np.asarray(popt, dtype=float), np.asarray(pcov, dtype=float)
    if not (np.all(np.isfinite(params)) and np.all(np.isfinite(cov)) and np.all(np.diag(cov) >= 0)):
        return None
    rss = float(np.sum((y - (params[0] + params[1] * _growth(x, float(params[2])))) ** 2))
    return _Fit("exponential", params, cov, x.size - 3, rss) if math.isfinite(rss) else None


def _growth(x: np.ndarray, k: float) -> np.ndarray:
    """(exp(k*x) - 1)/k, which is x itself as k -> 0."""
    return x if abs(k) < 1e-12 else np.asarray(np.expm1(k * x) / k)


def _growth_dk(x: np.ndarray, k: float) -> np.ndarray:
    """d/dk of `_growth`; its series x^2/2 + k*x^3/3 where the closed form cancels badly."""
    series = x * x / 2 + k * x**3 / 3
    if abs(k) < 1e-12:
        return np.asarray(series)
    exact = (x * np.exp(k * x) - np.expm1(k * x) / k) / k
    return np.asarray(np.where(np.abs(k * x) < 1e-4, series, exact))


def _crossing(a: float, b: float, k: float, limit: float) -> float:
    """Hours until a + b*(exp(k*x) - 1)/k reaches `limit`; inf when it never does (b points toward it)."""
    at_this_rate = (limit - a) / b
    if abs(k) < 1e-12:
        return at_this_rate
    arg = k * at_this_rate
    return math.log1p(arg) / k if arg > -1 else math.inf


def _first_root(f: Callable[[np.ndarray], np.ndarray], lo: float, hi: float) -> float:
    """The first x in [lo, hi] where f falls to zero or below; inf when it does not."""
    grid = np.geomspace(lo, hi, _SEARCH_STEPS + 1) if lo > 0 else np.linspace(lo, hi, _SEARCH_STEPS + 1)
    values = f(grid)
    below = np.flatnonzero(values <= 0)
    if below.size == 0:
        return math.inf
    i = int(below[0])
    if i == 0:
        return float(grid[0])
    try:
        return float(optimize.brentq(lambda v: float(f(np.array([v]))[0]), float(grid[i - 1]), float(grid[i])))
    except (ValueError, RuntimeError):  # a non-finite value at the bracket's far end: the grid point will do
        return float(grid[i])


def _curvature_is_real(curve: _Fit) -> bool:
    """k's interval excludes 0 at _CURVE_CONFIDENCE: a curve extrapolated past the window must earn it."""
    se_k = math.sqrt(float(curve.cov[2, 2]))
    return abs(curve.k) > float(stats.t.ppf(0.5 + _CURVE_CONFIDENCE / 2, curve.dof)) * se_k


def _aic(fit: _Fit, n: int) -> float:
    return n * math.log(max(fit.rss, 1e-300) / n) + 2 * fit.params.size


def _hours(h: float) -> str:
    if h < 1:
        return f"{h * 60:.0f} min"
    return f"{h:.1f} h" if h < 10 else f"{h:.0f} h"


def _band_text(lower: float, upper: float) -> str:
    lo, hi = _hours(lower), _hours(upper)
    lo_value, lo_unit = lo.split(" ")
    return f"{lo_value}-{hi}" if hi.endswith(" " + lo_unit) else f"{lo}-{hi}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _json_number(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None
