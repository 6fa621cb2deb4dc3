"""OEE by the standard definitions, shared by the gateway and the aggregator: the period fields that
travel upstream, the figures from summed period records, the six big losses, and the JSON answers of
`/api/v1/oee` and `/api/v1/downtime`.

- planned production time = the calendar's planned time minus planned stops (operator or PLC)
- availability = run time / planned production time
- performance = ideal time of the units made (count x ideal cycle time) / run time
- quality = ideal time of the good units / ideal time of all units (= good / total at one cycle time)
- OEE = availability x performance x quality = ideal time of the good units / planned production time

Summing the records of several machines, lines or sites and applying the same formulas gives the
time-weighted combination of their OEE: what a line, site or fleet figure means here. The gateway's and
the aggregator's SQLite tables share their columns (`oee_periods`: the period fields by thing_id, hour,
day, shift and planned; `oee_events`: state, start, "end", planned_s, reason), so both ask them the
same queries (`period_totals`, `stop_pareto`, `minor_stop_s`) with a WHERE clause of their own.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.common.timefmt import iso_utc
from gateway.common.wire import OEE_FIELDS

SUMMED = OEE_FIELDS
COUNTS = frozenset({"good", "rejected", "rejected_startup"})
STOP_STATES = ("down", "idle", "changeover", "offline")
UNASSIGNED = "unassigned"
Where = tuple[str, Sequence[Any]]  # a WHERE clause over the OEE tables (which machines) and its parameters
_FIRST = {"hour": "hour", "day": "day", "shift": "day", "none": "''"}  # the first key of a bucket
_GROUP = {"hour": "hour", "day": "day", "shift": "day, shift", "none": "''"}


@dataclass(slots=True)
class Totals:
    """Seconds by state and counts: of one machine within one hour, one shift and one planned/unplanned part
    (the tracker adds to that record in place as time passes, `add`), or summed over planned production
    minutes of one or more machines (`+`, a new record)."""

    running_s: float = 0.0
    idle_s: float = 0.0
    down_s: float = 0.0
    changeover_s: float = 0.0
    planned_stop_s: float = 0.0
    offline_s: float = 0.0
    good: int = 0
    rejected: int = 0
    rejected_startup: int = 0
    ideal_good_s: float = 0.0
    ideal_total_s: float = 0.0
    ideal_startup_reject_s: float = 0.0

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> Totals:
        values: dict[str, Any] = {k: (int(row[k] or 0) if k in COUNTS else float(row[k] or 0.0)) for k in SUMMED}
        return cls(**values)

    def __add__(self, other: Totals) -> Totals:
        return Totals(**{k: getattr(self, k) + getattr(other, k) for k in SUMMED})

    def add(self, other: Totals) -> None:
        """Add `other` to this record in place."""
        for k in SUMMED:
            setattr(self, k, getattr(self, k) + getattr(other, k))

    @property
    def planned_production_s(self) -> float:
        return self.running_s + self.idle_s + self.down_s + self.changeover_s + self.offline_s


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def _r(v: float | None, digits: int = 4) -> float | None:
    return None if v is None else round(v, digits)


def figures(t: Totals) -> dict[str, Any]:
    """The JSON figures of one scope and bucket: the three factors, OEE, and the times and counts behind them."""
    ppt = t.planned_production_s
    availability = _ratio(t.running_s, ppt)
    performance = _ratio(t.ideal_total_s, t.running_s) if t.ideal_total_s > 0 else None
    quality = _ratio(t.ideal_good_s, t.ideal_total_s) if t.ideal_total_s > 0 else _ratio(t.good, t.good + t.rejected)
    oee = _ratio(t.ideal_good_s, ppt) if t.ideal_total_s > 0 else None
    return {
        "availability": _r(availability), "performance": _r(performance), "quality": _r(quality), "oee": _r(oee),
        "plannedProductionS": round(ppt, 3), "runS": round(t.running_s, 3),
        "stopS": {"idle": round(t.idle_s, 3), "down": round(t.down_s, 3), "changeover": round(t.changeover_s, 3),
                  "offline": round(t.offline_s, 3), "plannedStop": round(t.planned_stop_s, 3)},
        "good": t.good, "rejected": t.rejected, "total": t.good + t.rejected,
        "idealGoodS": round(t.ideal_good_s, 3), "idealTotalS": round(t.ideal_total_s, 3),
    }


def six_big_losses(t: Totals, minor_stop_s: float = 0.0) -> dict[str, float]:
    """Seconds of planned production time lost, by Nakajima's six big losses; `minor_stop_s` of the down
    and offline time were stops shorter than the microstop limit (minor stops, not breakdowns)."""
    minor = min(max(minor_stop_s, 0.0), t.down_s + t.offline_s)
    return {
        "breakdowns": round(t.down_s + t.offline_s - minor, 3),
        "setupAndAdjustments": round(t.changeover_s, 3),
        "idlingAndMinorStops": round(t.idle_s + minor, 3),
        "reducedSpeed": round(max(0.0, t.running_s - t.ideal_total_s) if t.ideal_total_s > 0 else 0.0, 3),
        "processDefects": round(max(0.0, t.ideal_total_s - t.ideal_good_s - t.ideal_startup_reject_s), 3),
        "reducedYield": round(t.ideal_startup_reject_s, 3),
    }


def bucket_key(by: str, key: tuple[Any, ...]) -> dict[str, Any]:
    k1, k2, first_hour = key
    if by == "hour":
        return {"bucket": iso_utc(float(k1)), "start": iso_utc(float(k1))}
    if by == "day":
        return {"bucket": str(k1), "start": iso_utc(float(first_hour))}
    if by == "shift":
        return {"bucket": f"{k1}/{k2}", "day": k1, "shift": k2, "start": iso_utc(float(first_hour))}
    return {"bucket": "total"}


def oee_answer(scope: str, scope_id: str, start: float, end: float, by: str,
               rows: Sequence[tuple[tuple[Any, ...], Totals]]) -> dict[str, Any]:
    """Figures per bucket and for the whole range."""
    total = Totals()
    for _k, t in rows:
        total = total + t
    return {
        "scope": scope, "id": scope_id, "from": iso_utc(start), "to": iso_utc(end), "by": by,
        "total": figures(total),
        "buckets": [] if by == "none" else [{**bucket_key(by, k), **figures(t)} for k, t in rows],
    }


def downtime_answer(scope: str, scope_id: str, start: float, end: float, total: Totals,
                    pareto_rows: Sequence[tuple[str, str, float, int]], minor_stop_s: float = 0.0) -> dict[str, Any]:
    """The six big losses of the range and the stops by reason, largest first, with cumulative shares."""
    by_reason: dict[str, dict[str, Any]] = {}
    for reason, state, seconds, count in pareto_rows:
        r = by_reason.setdefault(reason or UNASSIGNED, {"reason": reason or UNASSIGNED, "seconds": 0.0, "events": 0,
                                                        "byState": {}})
        r["seconds"] += seconds
        r["events"] += count
        r["byState"][state] = round(r["byState"].get(state, 0.0) + seconds, 3)
    items = sorted(by_reason.values(), key=lambda r: (-r["seconds"], r["reason"]))
    all_s = sum(r["seconds"] for r in items)
    running = 0.0
    for r in items:
        running += r["seconds"]
        r["seconds"] = round(r["seconds"], 3)
        r["share"] = round(r["seconds"] / all_s, 4) if all_s else 0.0
        r["cumulativeShare"] = round(running / all_s, 4) if all_s else 0.0
    return {"scope": scope, "id": scope_id, "from": iso_utc(start), "to": iso_utc(end),
            "sixBigLosses": six_big_losses(total, minor_stop_s), "plannedStopS": round(total.planned_stop_s, 3),
            "pareto": items, "stopS": round(all_s, 3)}


def period_totals(conn: sqlite3.Connection, where: Where, start: float, end: float,
                  by: str) -> list[tuple[tuple[Any, ...], Totals]]:
    """Summed planned period records whose hour starts in [start, end), by `by` (hour, day, shift, none), in
    time order; each bucket's key is (hour or day, shift or None, its first hour)."""
    clause, args = where
    sums = ", ".join(f"SUM({k}) AS {k}" for k in SUMMED)
    cur = conn.execute(
        f"SELECT {_FIRST[by]} AS k1, {'shift' if by == 'shift' else 'NULL'} AS k2, MIN(hour) AS first_hour, {sums} "
        f"FROM oee_periods WHERE {clause} AND planned = 1 AND hour >= ? AND hour < ? "
        f"GROUP BY {_GROUP[by]} ORDER BY first_hour", (*args, start, end))
    names = [d[0] for d in cur.description]
    return [((r[0], r[1], r[2]), Totals.of(dict(zip(names, r, strict=True)))) for r in cur.fetchall()]


def stop_pareto(conn: sqlite3.Connection, where: Where, start: float, end: float,
                states: Sequence[str]) -> list[tuple[str, str, float, int]]:
    """(reason, state, planned seconds, events) of the stops that started in [start, end), largest first."""
    clause, args = where
    return [(r[0], r[1], r[2], r[3]) for r in conn.execute(
        f"SELECT reason, state, SUM(planned_s) AS s, COUNT(*) FROM oee_events WHERE {clause} AND start >= ? "
        f"AND start < ? AND state IN ({', '.join('?' for _ in states)}) AND planned_s > 0 "
        "GROUP BY reason, state ORDER BY s DESC", (*args, start, end, *states))]


def minor_stop_s(conn: sqlite3.Connection, where: Where, start: float, end: float, limit_s: float) -> float:
    """Planned seconds of the down and offline stops shorter than `limit_s` that started in [start, end)."""
    clause, args = where
    row = conn.execute(f"SELECT SUM(planned_s) FROM oee_events WHERE {clause} AND start >= ? AND start < ? "
                       "AND state IN ('down', 'offline') AND \"end\" - start < ?",
                       (*args, start, end, limit_s)).fetchone()
    return float(row[0] or 0.0)
