"""Scoring a detector against labelled ground truth (the simulator's fault file, or an operator's).

Scored on fault events, as operators experience them: a fault is found when an anomaly of the same
Thing opens between its start and its end plus a grace period; an anomaly that matches no fault is a
false alarm. Precision and recall count anomalies and faults; the false-positive rate counts the
normal windows (per Thing, `window_s` long, no fault near) in which a false alarm was open; the
detection delay is from the fault's start to the first matching anomaly. Dropouts are connectivity,
not anomalies: they are neither faults to find nor normal time.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gateway.common.errors import EgizError

NOT_SCORED = frozenset({"dropout"})


class TruthError(EgizError, ValueError):
    code = "invalid_truth"


@dataclass(frozen=True)
class Truth:
    thing: str
    fault: str
    start: float
    end: float


@dataclass(frozen=True)
class Detection:
    thing: str
    opened: float
    closed: float  # resolved, or the end of the evaluated range


@dataclass
class KindReport:
    faults: int = 0
    found: int = 0
    delays: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"faults": self.faults, "found": self.found, "recall": _ratio(self.found, self.faults),
                "median_delay_s": round(float(np.median(self.delays)), 2) if self.delays else None}


@dataclass
class Report:
    faults: int
    found: int
    anomalies: int
    matched: int
    normal_windows: int
    false_windows: int
    per_kind: dict[str, KindReport]
    delays: list[float]

    @property
    def precision(self) -> float:
        return _ratio(self.matched, self.anomalies)

    @property
    def recall(self) -> float:
        return _ratio(self.found, self.faults)

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 0.0 if p + r == 0 else 2 * p * r / (p + r)

    @property
    def false_positive_rate(self) -> float:
        return self.false_windows / self.normal_windows if self.normal_windows else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"precision": round(self.precision, 4), "recall": round(self.recall, 4), "f1": round(self.f1, 4),
                "false_positive_rate": round(self.false_positive_rate, 5),
                "median_delay_s": round(float(np.median(self.delays)), 2) if self.delays else None,
                "faults": self.faults, "found": self.found, "anomalies": self.anomalies, "matched": self.matched,
                "normal_windows": self.normal_windows, "false_windows": self.false_windows,
                "per_fault": {k: v.to_json() for k, v in sorted(self.per_kind.items())}}


def _ratio(a: int, b: int) -> float:
    return a / b if b else 1.0


def read_truth(path: Path) -> list[Truth]:
    """The JSON-lines ground truth `egiz sim --truth` writes: thing, fault, start, end (epoch seconds)."""
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise TruthError(f"cannot read {path}: {exc.strerror}", path=str(path)) from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            out.append(Truth(str(doc["thing"]), str(doc["fault"]), float(doc["start"]), float(doc["end"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise TruthError(f"{path}:{n}: not a truth record ({exc})", path=str(path), line=n) from None
    return out


def score(truth: Sequence[Truth], detections: Iterable[Detection], *, things: Iterable[str], start: float,
          end: float, window_s: float = 60.0, grace_s: float = 30.0) -> Report:
    """Match detections to faults and count what operators would have seen."""
    dets = sorted(detections, key=lambda d: d.opened)
    faults = [t for t in truth if t.fault not in NOT_SCORED]
    per_kind: dict[str, KindReport] = {}
    matched_ids: set[int] = set()
    delays: list[float] = []
    found = 0
    for f in faults:
        rep = per_kind.setdefault(f.fault, KindReport())
        rep.faults += 1
        hits = [i for i, d in enumerate(dets) if d.thing == f.thing and f.start <= d.opened <= f.end + grace_s]
        matched_ids.update(hits)
        if hits:
            found += 1
            rep.found += 1
            delay = dets[hits[0]].opened - f.start
            rep.delays.append(delay)
            delays.append(delay)
    # anomalies during an unscored event (a dropout and its return) are neither right nor wrong
    excused = {i for i, d in enumerate(dets) for t in truth
               if t.fault in NOT_SCORED and t.thing == d.thing and t.start - grace_s <= d.opened <= t.end + grace_s}
    false = [d for i, d in enumerate(dets) if i not in matched_ids and i not in excused]
    busy: dict[str, list[tuple[float, float]]] = {}
    for t in truth:
        busy.setdefault(t.thing, []).append((t.start - grace_s, t.end + grace_s))
    normal = false_windows = 0
    edges = np.arange(start, end, window_s)
    for thing in things:
        spans = busy.get(thing, [])
        mine = [d for d in false if d.thing == thing]
        for w0 in edges:
            w1 = w0 + window_s
            if any(a < w1 and w0 < b for a, b in spans):
                continue
            normal += 1
            if any(d.opened < w1 and w0 < d.closed for d in mine):
                false_windows += 1
    scored = len(dets) - len(excused - matched_ids)
    return Report(len(faults), found, scored, len(matched_ids), normal, false_windows, per_kind, delays)


Reading = tuple[float, str, str, str, list[tuple[str, Any]]]  # ts, thing id, type, feature, flattened values


def replay(core: Any, readings: Iterable[Reading], *, tick_s: float = 1.0) -> list[Any]:
    """Drive a DetectorCore with time-ordered readings, ticking every `tick_s` of data time, as the live
    detector ticks on its clock; returns every anomaly it opened (resolved or still active)."""
    anomalies: dict[str, Any] = {}
    next_tick = None
    for ts, thing, ttype, feature, values in readings:
        if next_tick is None:
            next_tick = ts + tick_s
        elif ts >= next_tick:
            for tr in core.tick():
                anomalies[tr.anomaly.id] = tr.anomaly
            next_tick = ts + tick_s
        core.add(thing, ttype, feature, ts, values)
    for tr in core.tick():
        anomalies[tr.anomaly.id] = tr.anomaly
    return list(anomalies.values())
