"""OEE at the gateway against a day worked out by hand: states from rules, a shift calendar with a
break, a counter rollover and a reset, an offline node, an operator's changeover and planned stop;
reasons edited afterwards change the Pareto and never the durations."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from gateway.bus import EventBus, StateChanged, ThingLifecycle
from gateway.common.oee import Totals, downtime_answer, figures, six_big_losses
from gateway.config import GatewayConfig, load_config
from gateway.oee import store
from gateway.oee.calendar import ShiftCalendar
from gateway.oee.machine import Counter
from gateway.oee.tracker import OeeTracker
from gateway.twin.model import Thing

SITE = "t-oee"
DAY = "2026-12-07"  # a Monday


def at(clock: str, day: str = DAY) -> float:
    return datetime.fromisoformat(f"{day}T{clock}:00+00:00").timestamp()


def oee_config(tmp_path: Path, **more: Any) -> GatewayConfig:
    overrides: dict[str, Any] = {
        "gateway.site": SITE, "gateway.line": "line-a", "gateway.id": "gw-oee",
        "gateway.data_dir": str(tmp_path), "auth.open": True,
        "oee.enabled": True, "oee.offline_after_s": 3600.0, "oee.startup_reject_s": 600.0,
        "oee.types": {"filler": {
            "running": [{"property": "drive.speed", "op": ">", "value": 0.1}],
            "down": [{"property": "drive.fault", "op": "==", "value": 1}],
            "good_counter": "production.good", "reject_counter": "production.rejected",
            "counter_modulus": 10000.0, "ideal_cycle_s": 2.0}},
        "oee.shifts": [{"name": "early", "start": "06:00", "end": "14:00",
                        "breaks": [{"start": "10:00", "end": "10:30"}]}],
    }
    overrides.update(more)
    return load_config(GatewayConfig, None, environ={}, overrides=overrides)


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Line:
    """Publishes what a filler's node and its operator do, as the twin would, on a real bus."""

    def __init__(self, bus: EventBus, tracker: OeeTracker, clock: Clock) -> None:
        self.bus, self.tracker, self.clock = bus, tracker, clock
        self.thing = Thing(f"{SITE}:filler-1", "filler", metadata={"line": "line-a"})

    def read(self, clock: str, **values: float) -> None:
        ts = at(clock)
        self.clock.t = ts
        by_feature: dict[str, dict[str, float]] = {}
        for name, value in values.items():
            feature = "drive" if name in ("speed", "fault") else "production"
            by_feature.setdefault(feature, {})[name] = value
        for feature, props in by_feature.items():
            self.bus.publish(StateChanged(self.thing.id, self.thing, feature=feature, properties=props,
                                          timestamp=ts, samples=((ts, props),)))

    def status(self, clock: str, state: str) -> None:
        self.clock.t = at(clock)
        self.bus.publish(StateChanged(self.thing.id, self.thing, feature="connectivity",
                                      properties={"state": state}, timestamp=at(clock), source="status"))

    def operator(self, clock: str, state: str, reason: str = "") -> None:
        self.tracker._consume(self.tracker._sub.drain(limit=10**6)) if self.tracker._sub else None
        self.clock.t = at(clock)
        self.tracker.set_operator_state(self.thing, state, reason, "", "shift lead")


async def scripted_day(tmp_path: Path) -> tuple[OeeTracker, Line]:
    cfg = oee_config(tmp_path)
    bus = EventBus()
    clock = Clock(at("05:00"))
    tracker = OeeTracker(cfg.oee, tmp_path, "line-a", bus, CollectorRegistry(), clock=clock)
    await tracker.start()
    line = Line(bus, tracker, clock)
    line.read("05:30", speed=0, fault=0, good=9000, rejected=50)  # idle before the shift: not planned
    line.read("06:00", speed=1)                                     # running
    line.read("07:00", good=500, rejected=60)                       # good rolled over: +1500, +10
    line.read("08:00", fault=1, good=2100, rejected=70)              # down; +1600, +10
    line.read("08:20", fault=0)                                     # running again
    line.read("09:00", good=3400, rejected=75)                      # +1300, +5
    line.status("09:20", "offline")                                 # the node drops off
    line.status("09:30", "online")
    line.read("09:30", speed=1)
    line.read("09:59", good=4900, rejected=80)                      # +1500, +5
    line.read("10:00", speed=0)                                     # break: idle, not planned
    line.read("10:30", speed=1)
    line.read("11:00", good=30, rejected=2)                         # the PLC restarted its counters: +30, +2
    line.read("12:00", good=1630, rejected=12)                      # +1600, +10
    line.operator("12:00", "changeover", "recipe_change")
    line.operator("12:15", "auto")                                  # running; start-up until 12:25
    line.read("12:20", good=1830, rejected=17)                      # +200, +5 start-up rejects
    line.read("13:00", good=3030, rejected=19)                      # +1200, +2
    line.operator("13:00", "planned_stop", "cleaning")
    line.operator("13:30", "auto")
    line.read("13:59", good=3830, rejected=21)                      # +800, +2
    line.read("14:00", speed=0)                                     # after the shift: not planned
    clock.t = at("14:30")
    return tracker, line


# Hand-computed, planned time 06:00-14:00 less the 10:00-10:30 break = 27,000 s:
RUNNING = 7200 + 3600 + 1800 + 5400 + 2700 + 1800  # 06-08, 08:20-09:20, 09:30-10, 10:30-12, 12:15-13, 13:30-14
DOWN, OFFLINE, CHANGEOVER, PLANNED_STOP = 1200, 600, 900, 1800
PPT = 27000 - PLANNED_STOP
GOOD = 1500 + 1600 + 1300 + 1500 + 30 + 1600 + 200 + 1200 + 800
REJECTED = 10 + 10 + 5 + 5 + 2 + 10 + 5 + 2 + 2


async def test_a_scripted_day_gives_the_hand_computed_oee(tmp_path: Path) -> None:
    tracker, _line = await scripted_day(tmp_path)
    try:
        rows = await tracker.totals(store.Scope("machine", f"{SITE}:filler-1"), at("00:00"), at("23:59"), "shift")
        assert [k[:2] for k, _ in rows] == [(DAY, "early")]
        t = rows[0][1]
        assert (t.running_s, t.down_s, t.offline_s, t.changeover_s, t.planned_stop_s, t.idle_s) == \
            (RUNNING, DOWN, OFFLINE, CHANGEOVER, PLANNED_STOP, 0)
        assert (t.good, t.rejected, t.rejected_startup) == (GOOD, REJECTED, 5)
        f = figures(t)
        assert f["plannedProductionS"] == PPT == 25200
        assert f["availability"] == round(RUNNING / PPT, 4) == 0.8929
        assert f["performance"] == round(2 * (GOOD + REJECTED) / RUNNING, 4) == 0.8694
        assert f["quality"] == round(GOOD / (GOOD + REJECTED), 4) == 0.9948
        assert f["oee"] == round(2 * GOOD / PPT, 4) == 0.7722
        assert abs(f["availability"] * f["performance"] * f["quality"] - f["oee"]) < 1e-3
        losses = six_big_losses(t)
        assert losses == {"breakdowns": DOWN + OFFLINE, "setupAndAdjustments": CHANGEOVER,
                          "idlingAndMinorStops": 0, "reducedSpeed": RUNNING - 2 * (GOOD + REJECTED),
                          "processDefects": 2 * (REJECTED - 5), "reducedYield": 2 * 5}
        # the same figures for the line and the site, and by hour: 08:00-09:00 ran 40 min, down 20
        for scope in (store.Scope("line", "line-a"), store.Scope("site", SITE)):
            (_k, same), = await tracker.totals(scope, at("00:00"), at("23:59"), "none")
            assert same == t
        hours = dict((k[0], v) for k, v in await tracker.totals(store.Scope("line", "line-a"),
                                                                 at("00:00"), at("23:59"), "hour"))
        assert (hours[at("08:00")].running_s, hours[at("08:00")].down_s, hours[at("08:00")].good) == (2400, 1200, 1600)
        assert at("10:00") in hours and hours[at("10:00")].idle_s == 0  # the break is not planned time
    finally:
        await tracker.stop()


async def test_reasons_edited_afterwards_change_the_pareto_not_the_durations(tmp_path: Path) -> None:
    tracker, _line = await scripted_day(tmp_path)
    scope = store.Scope("line", "line-a")
    span = (at("00:00"), at("23:59"))
    try:
        def pareto(conn: Any) -> dict[str, Any]:
            (_k, total), = store.totals(conn, scope, *span, "none")
            return downtime_answer("line", "line-a", *span, total,
                                   store.pareto(conn, scope, *span, ("down", "idle", "changeover", "offline")))

        before = await tracker.query(pareto)
        assert [(r["reason"], r["seconds"]) for r in before["pareto"]] == \
            [("unassigned", DOWN + OFFLINE), ("recipe_change", CHANGEOVER)]
        events = await tracker.query(lambda c: store.events(c, scope, *span))
        down = next(e for e in events if e["state"] == "down")
        assert (down["start"], down["end"]) == (at("08:00"), at("08:20"))
        with pytest.raises(Exception, match="not in this site's list"):
            await tracker.set_reason(down["id"], "gremlins", "", "shift lead")
        row = await tracker.set_reason(down["id"], "jam", "bottle jam at the capper", "shift lead")
        assert (row["reason"], row["reason_by"], row["start"], row["end"]) == \
            ("jam", "shift lead", at("08:00"), at("08:20"))
        after = await tracker.query(pareto)
        assert [(r["reason"], r["seconds"], r["cumulativeShare"]) for r in after["pareto"]] == \
            [("jam", DOWN, round(DOWN / 2700, 4)), ("recipe_change", CHANGEOVER, round(2100 / 2700, 4)),
             ("unassigned", OFFLINE, 1.0)]
        assert after["sixBigLosses"] == before["sixBigLosses"]
        events_after = await tracker.query(lambda c: store.events(c, scope, *span))
        assert [(e["id"], e["start"], e["end"], e["planned_s"]) for e in events_after] == \
            [(e["id"], e["start"], e["end"], e["planned_s"]) for e in events]
    finally:
        await tracker.stop()


async def test_short_stops_are_minor_stops_not_breakdowns(tmp_path: Path) -> None:
    tracker, line = await scripted_day(tmp_path)
    try:
        line.read("14:10", speed=1)  # after the shift: nothing planned changes
        span = (at("00:00"), at("23:59"))
        scope = store.Scope("machine", f"{SITE}:filler-1")
        # the 20-minute breakdown and the 10-minute offline spell are breakdowns at the default 300 s limit ...
        minor = await tracker.query(lambda c: store.minor_stops(c, scope, *span, 300.0))
        assert minor == 0.0
        # ... and minor stops when the limit is 25 minutes
        minor = await tracker.query(lambda c: store.minor_stops(c, scope, *span, 1500.0))
        assert minor == DOWN + OFFLINE
        (_k, t), = await tracker.totals(scope, *span, "none")
        losses = six_big_losses(t, minor)
        assert (losses["breakdowns"], losses["idlingAndMinorStops"]) == (0, DOWN + OFFLINE)
        assert six_big_losses(t, 10**9)["breakdowns"] == 0  # never more than the stops there were
    finally:
        await tracker.stop()


async def test_counts_and_open_states_survive_a_restart(tmp_path: Path) -> None:
    """Counter baselines are stored: a restart neither loses nor doubles units."""
    tracker, _line = await scripted_day(tmp_path)
    await tracker.stop()
    cfg = oee_config(tmp_path)
    bus = EventBus()
    clock = Clock(at("14:40"))
    again = OeeTracker(cfg.oee, tmp_path, "line-a", bus, CollectorRegistry(), clock=clock)
    await again.start()
    try:
        line2 = Line(bus, again, clock)
        line2.read("14:40", speed=1, fault=0)
        line2.read("14:50", good=3930, rejected=21)  # +100 since 13:59, after the shift
        rows = await again.query(lambda c: c.execute(
            "SELECT SUM(good), SUM(rejected) FROM oee_periods").fetchone())
        assert rows == (GOOD + 100 + 0, REJECTED)  # the 14:00 reading had counted nothing new
    finally:
        await again.stop()


async def test_a_thing_whose_type_gets_rules_is_tracked_from_then_on(tmp_path: Path) -> None:
    """Things of types without rules are skipped cheaply, but not for good: replaced by a Thing of a type
    with rules (ThingUpdated), it is tracked from its next reading."""
    bus = EventBus()
    tracker = OeeTracker(oee_config(tmp_path).oee, tmp_path, "line-a", bus, CollectorRegistry(),
                         clock=Clock(at("06:30")))
    await tracker.start()
    mixer, filler = Thing(f"{SITE}:filler-9", "mixer"), Thing(f"{SITE}:filler-9", "filler")
    try:
        for clock, thing in (("06:00", mixer), ("06:10", mixer), ("06:20", filler)):
            if thing is filler:
                bus.publish(ThingLifecycle(thing.id, thing, kind="ThingUpdated"))
            bus.publish(StateChanged(thing.id, thing, feature="drive", properties={"speed": 1.0},
                                     timestamp=at(clock), samples=((at(clock), {"speed": 1.0}),)))
            await tracker.query(lambda c: None)
            assert [s.state for s in tracker.status(thing.id)] == (["running"] if thing is filler else [])
    finally:
        await tracker.stop()


async def test_every_sample_of_a_message_is_read_and_every_state_change_counted(tmp_path: Path) -> None:
    """A message's samples are taken in one call, each one in turn: the states they pass through get their
    time and units, and `egiz_oee_state_changes_total` counts each change, the one to offline after a
    silence included."""
    bus, registry = EventBus(), CollectorRegistry()
    clock = Clock(at("06:00"))
    tracker = OeeTracker(oee_config(tmp_path).oee, tmp_path, "line-a", bus, registry, clock=clock)
    await tracker.start()
    filler = Thing(f"{SITE}:filler-7", "filler")
    samples = tuple((at(t), props) for t, props in (
        ("06:00", {"speed": 1.0, "good": 100}), ("06:10", {"speed": 0.0, "good": 400}),
        ("06:20", {"speed": 1.0, "good": 400}), ("06:30", {"speed": 1.0, "good": 700})))
    try:
        for feature in ("drive", "production"):
            mine = tuple((ts, {k: v for k, v in props.items() if (k == "speed") == (feature == "drive")})
                         for ts, props in samples)
            bus.publish(StateChanged(filler.id, filler, feature=feature, properties={}, timestamp=at("06:30"),
                                     samples=mine))
        clock.t = at("08:00")  # silent for more than `offline_after_s` (an hour) since 06:30
        rows = await tracker.query(lambda c: c.execute(
            "SELECT SUM(running_s), SUM(idle_s), SUM(offline_s), SUM(good) FROM oee_periods").fetchone())
        assert rows == (1200.0 + 3600.0, 600.0, 1800.0, 600)
        changes = {state: registry.get_sample_value("egiz_oee_state_changes_total", {"state": state})
                   for state in ("running", "idle", "offline")}
        assert changes == {"running": 2.0, "idle": 1.0, "offline": 1.0}
        assert registry.get_sample_value("egiz_oee_readings_total") == 8.0
    finally:
        await tracker.stop()


def test_counter_rollover_and_reset() -> None:
    c = Counter(modulus=65536.0)
    assert [c.delta(v) for v in (65000, 65500, 100, 400, 20, 20)] == [0, 500, 136, 300, 20, 0]


def test_the_calendar_knows_shifts_breaks_night_shifts_and_planned_downtime(tmp_path: Path) -> None:
    cfg = oee_config(tmp_path, **{
        "oee.timezone": "Europe/Istanbul",
        "oee.shifts": [{"name": "early", "start": "06:00", "end": "14:00", "days": ["mon", "tue"],
                        "breaks": [{"start": "10:00", "end": "10:30"}]},
                       {"name": "night", "start": "22:00", "end": "06:00", "breaks": [{"start": "02:00",
                                                                                       "end": "02:15"}]}],
        "oee.planned_downtime": [{"start": "2026-12-08T06:00:00", "end": "2026-12-08T08:00:00"}]})
    cal = ShiftCalendar(cfg.oee)
    local = lambda day, clock: datetime.fromisoformat(f"{day}T{clock}:00+03:00").timestamp()  # noqa: E731
    assert cal.minute(local(DAY, "06:00")) == cal.minute(local(DAY, "09:59"))
    assert cal.minute(local(DAY, "06:00")).planned and cal.minute(local(DAY, "06:00")).shift == "early"
    assert not cal.minute(local(DAY, "10:15")).planned and cal.minute(local(DAY, "10:15")).shift == "early"
    assert cal.minute(local(DAY, "14:00")).shift == ""
    night = cal.minute(local("2026-12-08", "01:00"))
    assert night.planned and (night.shift, night.day) == ("night", DAY)  # belongs to the day it started
    assert not cal.minute(local("2026-12-08", "02:10")).planned
    assert not cal.minute(local("2026-12-08", "07:00")).planned  # planned downtime on Tuesday morning
    assert cal.minute(local("2026-12-09", "07:00")).shift == ""  # no early shift on Wednesdays
    assert Totals() + Totals(running_s=1.0) == Totals(running_s=1.0)
