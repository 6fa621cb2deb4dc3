"""One machine's tracker under any sequence of readings, node status, operator states and ticks: its state
is always what its rules say of the values it has seen, every second between its first input and now is
accounted exactly once, and its units are the counters' increments priced at the recipe of their time.

The tracker skips work a reading cannot need (rules it does not touch, time accounted later in one go,
the ideal cycle time kept until the recipe changes); these properties hold whatever it skips."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.config import GatewayConfig, load_config
from gateway.oee.calendar import ShiftCalendar
from gateway.oee.machine import Counter, MachineTracker, OperatorState, Period
from gateway.oee.settings import Condition, MachineRules, TypeRules

MODULUS = 1000.0
RULES = TypeRules(
    running=(Condition("drive.speed", ">", 0.1), Condition("thermal.zones", "within", 5.0, of="thermal.setpoint")),
    down=(Condition("drive.fault", "==", 1.0),),
    state_property="production.state", state_map={"run": "running", "3": "down", "1": "changeover"},
    good_counter="production.good", reject_counter="production.rejected", counter_modulus=MODULUS,
    recipe_property="production.recipe", ideal_cycle_s=2.0, recipes={"a": 1.5})
MACHINE = MachineRules(recipes={"b": 3.0})
SECONDS = [name for name in Period.__dataclass_fields__ if name.endswith("_s") and not name.startswith("ideal")]


def ideal_of(recipe: Any) -> float:
    return 3.0 if recipe == "b" else 1.5 if recipe == "a" else 2.0


def calendar(tmp: Path) -> ShiftCalendar:
    cfg = load_config(GatewayConfig, None, environ={}, overrides={
        "gateway.site": "t-m", "gateway.line": "line-a", "gateway.id": "gw", "gateway.data_dir": str(tmp),
        "auth.open": True, "oee.enabled": True,
        "oee.shifts": [{"name": "early", "start": "06:00", "end": "06:05", "breaks": [{"start": "06:02",
                                                                                      "end": "06:03"}]}]})
    return ShiftCalendar(cfg.oee)


numbers = st.one_of(st.integers(-5, 1200), st.floats(-5, 1200, allow_nan=False), st.booleans(),
                    st.sampled_from(["7", None]))
counts = st.one_of(st.integers(0, 999), st.integers(0, 999).map(float), numbers)  # mostly counter readings
tags = st.sampled_from(["run", "RUN", "idle", "3", 3, 3.0, 1, 1.0, True, "true", "weird", None, 0.5, [1]])
production = st.tuples(st.just("production"), st.fixed_dictionaries({}, optional={
    "state": tags, "good": counts, "rejected": counts, "recipe": st.sampled_from(["a", "b", "c", 5, None]),
    "noise": numbers}))
readings = st.one_of(
    production, production, production,
    st.tuples(st.just("drive"), st.dictionaries(st.sampled_from(["speed", "fault", "noise"]),
                                                st.one_of(numbers, st.sampled_from([0, 1, 0.5])), max_size=3)),
    st.tuples(st.just("thermal"), st.dictionaries(
        st.sampled_from(["zones", "setpoint"]),
        st.one_of(st.lists(st.integers(150, 170), max_size=3), st.integers(150, 170)), max_size=2)),
    st.tuples(st.just("untracked"), st.just({"x": 1})),
)
steps = st.lists(st.tuples(
    st.one_of(st.floats(-30, 200, allow_nan=False), st.integers(0, 400).map(float)),  # seconds on
    st.one_of(readings, readings, readings, readings, st.tuples(st.just("status"), st.booleans()),
              st.tuples(st.just("operator"), st.sampled_from(["changeover", "planned_stop", None])),
              st.tuples(st.just("tick"), st.just(None)))), min_size=1, max_size=80)

START = 1_796_623_200.0  # 2026-12-07 06:00 UTC: the first inputs cross the short shift and its break


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=steps)
@example(script=[(0.0, ("production", {"good": 1, "recipe": "a"})), (5.0, ("production", {"good": 3})),
                 (5.0, ("production", {"recipe": "b"})), (5.0, ("production", {"good": 5, "recipe": "b"})),
                 (5.0, ("production", {"good": 7, "recipe": "c"}))])  # each unit at the recipe of its time
@example(script=[(0.0, ("production", {"state": True})), (5.0, ("production", {"state": 1})),
                 (5.0, ("production", {"state": 1.0})), (5.0, ("production", {"state": True}))])  # "true" ≠ "1"
@example(script=[(0.0, ("drive", {"speed": 1})), (400.0, ("tick", None)), (5.0, ("drive", {"noise": 1})),
                 (5.0, ("status", False)), (5.0, ("drive", {"speed": 1}))])  # back from offline
def test_state_time_and_units_hold_under_any_inputs(tmp_path: Path, script: list[tuple[float, Any]]) -> None:
    m = MachineTracker("t-m:x-1", "line-a", RULES, MACHINE, calendar(tmp_path), 60.0)
    t = START - 240
    first: float | None = None
    good_counter, reject_counter = Counter(MODULUS), Counter(MODULUS)
    good = rejected = 0
    ideal_good = 0.0
    recipe: Any = None
    periods: list[dict[Any, Period]] = []
    events: dict[str, Any] = {}
    for i, (dt, (kind, arg)) in enumerate(script):
        t += dt
        if kind == "status":
            m.connectivity(arg, t)
        elif kind == "operator":
            m.set_operator(None if arg is None else OperatorState(arg, "", "", "op"), t)
            first = m.clock if first is None else first
        elif kind == "tick":
            m.tick(t, 300.0)
        else:
            feature, props = kind, arg
            m.reading(feature, t, dict(props))
            if feature in m.features:
                first = m.clock if first is None else first
            if feature == "production":
                recipe = props.get("recipe", recipe)
                for name, counter in (("good", good_counter), ("rejected", reject_counter)):
                    v = props.get(name)
                    if isinstance(v, int | float) and not isinstance(v, bool) and v >= 0:
                        d = counter.delta(float(v))
                        if name == "good":
                            good += d
                            ideal_good += d * ideal_of(recipe)
                        else:
                            rejected += d
        if m.state:
            assert m.state == m.derive()[0], (i, m.state, m.derive(), m.values)
        if i % 7 == 3:  # a flush now and then: it holds every second up to the last input
            p, e, _c = m.take()
            periods.append(p)
            events.update({ev.id: ev for ev in e})
            seconds = sum(getattr(rec, s) for batch in periods for rec in batch.values() for s in SECONDS)
            assert math.isclose(seconds, 0.0 if first is None else m.clock - first, abs_tol=1e-6)
    end = max(t, m.clock) + 30
    m.tick(end, 300.0)
    p, e, _c = m.take()
    periods.append(p)
    events.update({ev.id: ev for ev in e})

    totals = Period()
    planned = 0.0
    for batch in periods:
        for key, rec in batch.items():
            totals.add(rec)
            if key.planned:
                planned += sum(getattr(rec, s) for s in SECONDS)
    assert (totals.good, totals.rejected) == (good, rejected)
    assert math.isclose(totals.ideal_good_s, ideal_good, abs_tol=1e-6)
    accounted = sum(getattr(totals, s) for s in SECONDS)
    if first is None:
        assert accounted == 0 and not events
        return
    assert math.isclose(accounted, m.clock - first, abs_tol=1e-6), (accounted, m.clock, first)
    assert math.isclose(sum(ev.end - ev.start for ev in events.values()), accounted, abs_tol=1e-6)
    assert math.isclose(sum(ev.planned_s for ev in events.values()), planned, abs_tol=1e-6)
    assert [ev for ev in events.values() if ev.open] == [m.event]
