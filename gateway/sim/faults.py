"""Fault injection specs and the labelled ground truth the detector is evaluated against.

Grammar (comma-separated items):  KIND:EQUIPMENT_ID@START[+DURATION]   or   random:PER_HOUR
START and DURATION are seconds from the start of the simulation (DURATION defaults to 60).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO

KINDS = ("drift", "spike", "stuck", "phase_imbalance", "overtemperature", "dropout")
_ITEM = re.compile(r"^(?P<kind>[a-z_]+):(?P<eid>[A-Za-z0-9][A-Za-z0-9._-]*)@(?P<start>\d+(\.\d+)?)"
                   r"(\+(?P<dur>\d+(\.\d+)?))?$")
_RANDOM = re.compile(r"^random:(?P<rate>\d+(\.\d+)?)$")


@dataclass(frozen=True)
class FaultSpec:
    """One fault on one node, in seconds from the start of the run."""

    kind: str
    equipment_id: str
    start_s: float
    duration_s: float = 60.0

    @property
    def end_s(self) -> float:
        return self.start_s + self.duration_s


@dataclass(frozen=True)
class RandomFaults:
    """Faults drawn at random (seeded) at `per_hour` per fleet-hour of simulated time."""

    per_hour: float


def parse_faults(spec: str) -> tuple[FaultSpec | RandomFaults, ...]:
    """Parse a fault spec; a bad item raises ValueError naming it."""
    out: list[FaultSpec | RandomFaults] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        m = _RANDOM.match(item)
        if m:
            out.append(RandomFaults(float(m.group("rate"))))
            continue
        m = _ITEM.match(item)
        if not m:
            raise ValueError(f"fault {item!r} is not KIND:EQUIPMENT_ID@START[+DURATION] or random:PER_HOUR")
        kind = m.group("kind")
        if kind not in KINDS:
            raise ValueError(f"fault {item!r}: unknown kind {kind!r} (known: {', '.join(KINDS)})")
        duration = float(m.group("dur")) if m.group("dur") else 60.0
        if duration <= 0:
            raise ValueError(f"fault {item!r}: duration must be > 0")
        out.append(FaultSpec(kind, m.group("eid"), float(m.group("start")), duration))
    return tuple(out)


class TruthWriter:
    """Appends one JSON line per fault when it ends: {thing, fault, start, end, feature, property}."""

    def __init__(self, path: Path | None) -> None:
        self._file: IO[str] | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", encoding="utf-8")

    def write(self, thing: str, fault: str, start: float, end: float, feature: str, prop: str) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps({"thing": thing, "fault": fault, "start": round(start, 3),
                                     "end": round(end, 3), "feature": feature, "property": prop}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
