"""Remaining useful life on series whose answer is known: ramps up and down, flat noise, too little
data, a limit already crossed, accelerating wear, and whatever numbers a sensor may send."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gateway.detect.rul import RulEstimate, estimate_rul

NOW = 1_700_000_000.0


def ramp(slope_per_h: float, level_now: float, *, hours: float = 3.0, every_s: float = 60.0, noise: float = 1.0,
         seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A straight trend ending at `now`, with Gaussian noise."""
    t = NOW - hours * 3600 + np.arange(int(hours * 3600 / every_s) + 1) * every_s
    y = level_now + slope_per_h * (t - NOW) / 3600 + np.random.default_rng(seed).normal(0, noise, t.size)
    return t, y


def assert_ok_band(e: RulEstimate, true_hours: float) -> None:
    assert e.status == "ok", e.text
    assert e.hours is not None and e.lower_hours is not None and e.upper_hours is not None
    assert e.lower_hours <= true_hours <= e.upper_hours, (e, true_hours)
    assert e.lower_hours <= e.hours <= e.upper_hours


def test_a_rising_ramp_crosses_its_limit_when_the_line_says_and_the_band_holds_the_truth() -> None:
    t, y = ramp(2.0, 206.0)  # 54 to go at 2/h: 27 h
    e = estimate_rul(t, y, limit=260, now=NOW)
    assert_ok_band(e, 27.0)
    assert e.hours == pytest.approx(27.0, abs=2.0)
    assert e.slope_per_hour == pytest.approx(2.0, abs=0.2)
    assert e.points == t.size and e.r2 is not None and e.r2 > 0.5
    assert e.text.startswith("at this rate it crosses 260 in ~27 h (") and e.text.endswith(" h)")


@pytest.mark.parametrize("seed", range(5))
def test_the_band_is_honest_across_noise_draws(seed: int) -> None:
    t, y = ramp(-1.5, 80.0, noise=2.0, seed=seed)  # falls 30 to the lower limit 50 at 1.5/h: 20 h
    assert_ok_band(estimate_rul(t, y, limit=50, now=NOW), 20.0)


def test_a_falling_indicator_with_a_lower_limit_works_like_a_rising_one() -> None:
    t, y = ramp(2.0, 206.0)
    up = estimate_rul(t, y, limit=260, now=NOW)
    down = estimate_rul(t, -y, limit=-260, now=NOW)
    assert down.status == "ok" and down.slope_per_hour is not None and down.slope_per_hour < 0
    assert (down.hours, down.lower_hours, down.upper_hours) == pytest.approx((up.hours, up.lower_hours, up.upper_hours))


def test_a_flat_noisy_series_has_no_trend_toward_either_limit() -> None:
    t, y = ramp(0.0, 200.0, noise=3.0)
    for limit in (260.0, 150.0):
        e = estimate_rul(t, y, limit=limit, now=NOW)
        assert e.status == "no_trend", e.text
        assert e.hours is None and "no significant trend" in e.text


def test_a_trend_away_from_the_limit_is_no_trend() -> None:
    t, y = ramp(-2.0, 206.0)  # falling, limit above
    assert estimate_rul(t, y, limit=260, now=NOW).status == "no_trend"


@pytest.mark.parametrize(("points", "every_s", "has"), [(12, 60.0, "has 12 points over 11 min"),
                                                         (40, 10.0, "has 40 points over 6 min")])
def test_too_few_points_or_too_short_a_span_says_what_it_has_and_needs(points: int, every_s: float, has: str) -> None:
    t, y = ramp(2.0, 206.0, hours=(points - 1) * every_s / 3600, every_s=every_s)
    e = estimate_rul(t, y, limit=260, now=NOW)
    assert (e.status, e.points, e.hours) == ("insufficient_data", points, None)
    assert has in e.text and "needs 30 points over 10 min" in e.text


def test_a_series_already_past_the_limit_is_crossed() -> None:
    t, y = ramp(2.0, 206.0)  # started near 200, rose through 203
    e = estimate_rul(t, y, limit=203, now=NOW)
    assert (e.status, e.hours) == ("crossed", 0.0)
    assert "already beyond 203" in e.text


def test_an_estimate_past_the_horizon_is_not_given_as_hours() -> None:
    t, y = ramp(0.5, 206.0, noise=0.2)  # 108 h to go
    e = estimate_rul(t, y, limit=260, now=NOW, horizon_h=72)
    assert (e.status, e.hours) == ("beyond_horizon", None)
    assert "within 72 h" in e.text
    assert estimate_rul(t, y, limit=260, now=NOW, horizon_h=200).status == "ok"


def test_nan_and_inf_points_are_dropped_not_fatal() -> None:
    t, y = ramp(2.0, 206.0)
    clean = estimate_rul(t, y, limit=260, now=NOW)
    y_bad, t_bad = y.copy(), t.copy()
    y_bad[::9], y_bad[5], t_bad[7] = np.nan, np.inf, np.nan
    dirty = estimate_rul(t_bad, y_bad, limit=260, now=NOW)
    assert dirty.points == t.size - len(range(0, t.size, 9)) - 2
    assert dirty.status == "ok" and dirty.hours == pytest.approx(clean.hours, rel=0.1)


def test_accelerating_wear_is_fitted_by_the_curve_which_crosses_sooner_than_the_line() -> None:
    t = NOW - 3 * 3600 + np.arange(181) * 60.0
    x = (t - NOW) / 3600
    y = 200 + 10 * np.expm1(0.5 * x) / 0.5 + np.random.default_rng(3).normal(0, 0.3, t.size)  # slope 10/h now
    true_hours = math.log1p(0.5 * 40 / 10) / 0.5  # to 240
    e = estimate_rul(t, y, limit=240, now=NOW)
    assert e.model == "exponential"
    assert_ok_band(e, true_hours)
    assert e.hours is not None and e.hours < 40 / 10  # what a straight line at today's slope would say


def test_to_json_uses_camel_case_and_only_json_numbers() -> None:
    t, y = ramp(2.0, 206.0)
    doc = estimate_rul(t, y, limit=260, now=NOW).to_json()
    assert set(doc) == {"status", "hours", "lowerHours", "upperHours", "slopePerHour", "r2", "points", "model", "text"}
    json.dumps(doc, allow_nan=False)


finite = st.floats(-1e6, 1e6, allow_nan=False)
sensor_value = st.one_of(finite, st.sampled_from([math.nan, math.inf, -math.inf]))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 80), data=st.data(), limit=finite, offset_s=st.floats(-3600, 7200),
       slope=st.floats(-100, 100), confidence=st.floats(0.5, 0.99))
def test_never_raises_and_an_ok_band_always_brackets_its_estimate(n: int, data: st.DataObject, limit: float,
                                                                   offset_s: float, slope: float,
                                                                   confidence: float) -> None:
    gaps = data.draw(hnp.arrays(np.float64, n, elements=st.floats(0, 600)))
    t = NOW - 7200 + np.cumsum(gaps)
    noise = data.draw(hnp.arrays(np.float64, n, elements=sensor_value))
    y = slope * (t - NOW) / 3600 + noise
    if n and data.draw(st.booleans()):
        t[data.draw(st.integers(0, n - 1))] = math.nan
    e = estimate_rul(t, y, limit=limit, now=NOW + offset_s, min_points=5, min_span_s=60, confidence=confidence)
    json.dumps(e.to_json(), allow_nan=False)
    assert e.points <= n and e.text
    if e.status == "ok":
        assert e.hours is not None and e.lower_hours is not None and e.upper_hours is not None
        assert 0 <= e.lower_hours <= e.hours <= e.upper_hours
        assert e.hours <= 72.0
