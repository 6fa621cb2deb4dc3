"""The JSON answers of `/api/v1/oee` and `/api/v1/downtime`, from summed totals and Pareto rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.common.timefmt import iso_utc
from gateway.oee.figures import Totals, figures, six_big_losses

STOP_STATES = ("down", "idle", "changeover", "offline")
UNASSIGNED = "unassigned"


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
                    pareto_rows: Sequence[tuple[str, str, float, int]]) -> dict[str, Any]:
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
            "sixBigLosses": six_big_losses(total), "plannedStopS": round(total.planned_stop_s, 3),
            "pareto": items, "stopS": round(all_s, 3)}
