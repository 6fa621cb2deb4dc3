"""Offline simulation: the same equipment models and fault schedule as `egiz sim`, without a broker
or a wall clock, as fast as the CPU allows. Produces labelled data sets for training and evaluating
detectors (hours of a line in seconds) and the ground truth of the faults it injected.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from gateway.sim.clock import local_hour
from gateway.sim.equipment import Properties, make_model
from gateway.sim.faults import FaultItem, FaultSchedule, TruthRecord
from gateway.sim.fleet import FleetOptions, _seeded, fleet_things


@dataclass(frozen=True)
class Reading:
    """One feature reading of one node at simulated time `ts` (epoch seconds)."""

    ts: float
    thing_id: str
    thing_type: str
    feature: str
    properties: Properties


class Trace:
    """Readings of a whole fleet every 1/rate_hz seconds from `start` for `duration_s`, faults included.

    `truth` fills up as faults end (all of them once the readings are exhausted)."""

    def __init__(self, site: str, *, start: float, duration_s: float, nodes: int = 10, rate_hz: float = 1.0,
                 faults: tuple[FaultItem, ...] = (), seed: int = 0, types: tuple[str, ...] | None = None,
                 context_every_s: float = 300.0, start_index: int = 1) -> None:
        self.options = FleetOptions(site=site, nodes=nodes, rate_hz=rate_hz, faults=faults, seed=seed,
                                    context_every_s=context_every_s, start_index=start_index,
                                    types=types or FleetOptions.types)
        self.start = start
        self.duration_s = duration_s
        self.truth: list[TruthRecord] = []

    def __iter__(self) -> Iterator[Reading]:
        o = self.options
        things = fleet_things(o)
        models = {eid: make_model(etype, eid, _seeded(o.seed, eid), o.line) for eid, etype in things}
        schedule = FaultSchedule(o.faults, things, _seeded(o.seed, "faults"))
        down: set[str] = set()
        dt = 1.0 / o.rate_hz
        steps = math.floor(self.duration_s * o.rate_hz)
        for step in range(steps):
            elapsed = step * dt
            ts = self.start + elapsed
            started, ended = schedule.update(elapsed, ts)
            for f in ended:
                self._record(f.kind, f.equipment_id, f.started_at, ts, f.target.feature, f.target.property)
                if f.kind == "dropout":
                    down.discard(f.equipment_id)
                elif f in models[f.equipment_id].faults:
                    models[f.equipment_id].faults.remove(f)
            for f in started:
                if f.kind == "dropout":
                    down.add(f.equipment_id)
                else:
                    models[f.equipment_id].faults.append(f)
            hour = local_hour(ts)
            for eid, etype in things:
                if eid in down:
                    continue
                model = models[eid]
                tid = f"{o.site}:{eid}"
                ctx = model.business_context(elapsed, o.context_every_s)
                if ctx is not None:
                    yield Reading(ts, tid, etype, "business_context", ctx)
                for feature, props in model.read(hour, elapsed, dt).items():
                    yield Reading(ts, tid, etype, feature, props)
        end = self.start + steps * dt
        for f in schedule.active:
            self._record(f.kind, f.equipment_id, f.started_at, end, f.target.feature, f.target.property)
        schedule.active.clear()

    def _record(self, kind: str, eid: str, start: float, end: float, feature: str, prop: str) -> None:
        self.truth.append(TruthRecord(f"{self.options.site}:{eid}", kind, round(start, 3), round(end, 3), feature,
                                      prop))
