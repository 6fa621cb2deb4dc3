"""The simulator's production (PLC state, counters, recipes, scrap) against its ground truth, and what
the gateway's OEE makes of it: the same units, the same states, a believable OEE."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from pathlib import Path

from gateway.common.oee import Totals, figures
from gateway.config import GatewayConfig, load_config
from gateway.oee.calendar import ShiftCalendar
from gateway.oee.machine import MachineTracker
from gateway.oee.settings import MachineRules
from gateway.sim import FleetOptions, run_fleet
from gateway.sim.equipment import EQUIPMENT_TYPES
from gateway.sim.production import COUNTER_MODULUS, IDEAL_CYCLE_S, ProductionModel, oee_rules
from tests.helpers import GatewayFactory, unique_site

DAY_S = 86400
STEP_S = 4  # a reading every 4 s


def config(tmp_path: Path, site: str = "t-sim") -> GatewayConfig:
    return load_config(GatewayConfig, None, environ={}, overrides={
        "gateway.site": site, "gateway.line": "line-a", "gateway.id": "gw", "gateway.data_dir": str(tmp_path),
        "auth.open": True, "oee.enabled": True, "oee.types": oee_rules(EQUIPMENT_TYPES)})


def test_a_simulated_day_gives_believable_oee_that_the_tracker_reproduces(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    t0 = 1_800_000_000.0
    for etype in EQUIPMENT_TYPES:
        model = ProductionModel(etype, random.Random(f"day:{etype}"))
        m = MachineTracker(f"t-sim:{etype}-1", "line-a", cfg.oee.types[etype], MachineRules(),
                           ShiftCalendar(cfg.oee), cfg.oee.startup_reject_s)
        m.reading("production", t0, model.step(0.0, STEP_S))
        base_good, base_rejected = model.truth.good, model.truth.rejected  # the counters' baseline
        states = set()
        for s in range(STEP_S, DAY_S, STEP_S):
            props = model.step(float(s), STEP_S)
            states.add(props["state"])
            m.reading("production", t0 + s, props)
        m.tick(t0 + DAY_S, 3600.0)
        total = Totals()
        for p in m.periods.values():
            total = total + Totals(**{k: getattr(p, k) for k in Totals.__dataclass_fields__})
        truth = model.truth
        assert states == {"running", "down", "idle", "changeover"}, etype
        # units: exactly what the machine made after its first reading, through rollovers
        assert (total.good, total.rejected) == (truth.good - base_good, truth.rejected - base_rejected), etype
        ideal = IDEAL_CYCLE_S[etype]
        truth_oee = truth.good * ideal / DAY_S
        assert 0.60 <= truth_oee <= 0.85, (etype, truth_oee)
        f = figures(total)
        assert abs(f["oee"] - truth_oee) < 0.005, (etype, f, truth_oee)
        assert abs(total.running_s - truth.seconds["running"]) <= STEP_S * (truth.stops + 1), etype
        assert f["availability"] < 0.95 and 0.85 <= f["performance"] <= 1.0 and f["quality"] > 0.95, (etype, f)


def test_the_counters_roll_over_like_a_plc_word() -> None:
    model = ProductionModel("conveyor", random.Random("rollover"))
    start = model.good_count
    values = [int(model.step(float(s), 1.0)["good_count"]) for s in range(1, 2 * 3600 * 24)]
    assert max(values) < COUNTER_MODULUS and any(b < a for a, b in itertools.pairwise(values))
    assert (values[-1] - start) % COUNTER_MODULUS == model.truth.good % COUNTER_MODULUS


async def test_the_gateway_counts_what_the_simulated_plcs_made(mosquitto, start_gateway: GatewayFactory,
                                                                tmp_path: Path) -> None:
    site = unique_site()
    gw = await start_gateway(mosquitto, **{
        "gateway.site": site, "oee.enabled": True, "oee.types": oee_rules(EQUIPMENT_TYPES),
        "oee.flush_interval_s": 0.2})
    opts = FleetOptions(site=site, nodes=5, rate_hz=5.0, host=mosquitto[0], port=mosquitto[1], duration_s=3.0,
                        seed=7, production=True, time_scale=20.0)
    stats = await run_fleet(opts)
    assert stats.production and sum(t.good for t in stats.production.values()) > 100

    async def counted() -> dict[str, tuple[int, int]]:
        out = {}
        for eid in stats.production:
            status, body = await gw.get("/api/v1/oee", params={"scope": "machine", "id": gw.thing_id(eid),
                                                               "by": "none"})
            out[eid] = (body["total"]["good"], body["total"]["rejected"]) if status == 200 else (-1, -1)
        return out

    deadline = time.monotonic() + 20
    while True:
        got = await counted()
        # all but the first reading's units: that reading is the counters' baseline
        if all(0 <= t.good - got[eid][0] <= 20 and 0 <= t.rejected - got[eid][1] <= 2
               for eid, t in stats.production.items()):
            break
        assert time.monotonic() < deadline, (got, stats.production)
        await asyncio.sleep(0.2)
