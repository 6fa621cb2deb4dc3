"""Fault injection: the spec language, the schedule that starts and ends faults, and the ground-truth file.

Grammar (comma-separated items, blanks around items ignored)::

    KIND:EQUIPMENT_ID@START[+DURATION][=MAGNITUDE]
    random:PER_HOUR

START and DURATION are seconds of the simulated clock from the start of the run (DURATION defaults
to 60); MAGNITUDE is the size of the fault in the unit of the property it acts on. The ground truth
is what anomaly detectors are scored against, so it records when each fault really began and ended.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from gateway.common.errors import EgizError
from gateway.sim.equipment import ActiveFault, fault_target

KINDS = ("drift", "spike", "stuck", "phase_imbalance", "overtemperature", "dropout")
DEFAULT_DURATION_S = 60.0
_NO_MAGNITUDE = frozenset({"stuck", "dropout"})
_NUMBER = r"\d{1,12}(?:\.\d{1,9})?"
_ITEM = re.compile(
    rf"(?P<kind>[a-z_]{{1,32}}):(?P<eid>[A-Za-z0-9][A-Za-z0-9._-]{{0,63}})@(?P<start>{_NUMBER})"
    rf"(?:\+(?P<duration>{_NUMBER}))?(?:=(?P<magnitude>-?{_NUMBER}))?"
)
_RANDOM = re.compile(rf"random:(?P<rate>{_NUMBER})")


class SimError(EgizError, ValueError):
    """The simulator cannot run as asked: bad options, a bad fault spec, a broker that refuses it."""

    code = "sim_error"


class FaultSpecError(SimError):
    """A fault spec item that cannot be used; `item` is the offending text."""

    code = "invalid_fault_spec"

    def __init__(self, item: str, reason: str) -> None:
        super().__init__(f"fault {item!r}: {reason}", item=item, reason=reason)
        self.item = item
        self.reason = reason


@dataclass(frozen=True)
class FaultSpec:
    """One fault on one node, timed in simulated seconds from the start of the run."""

    kind: str
    equipment_id: str
    start_s: float
    duration_s: float = DEFAULT_DURATION_S
    magnitude: float | None = None  # None: the typical size for the node's type

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise FaultSpecError(str(self), f"unknown kind {self.kind!r} (known: {', '.join(KINDS)})")
        if not (math.isfinite(self.start_s) and self.start_s >= 0):
            raise FaultSpecError(str(self), "START must be a number of seconds >= 0")
        if not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise FaultSpecError(str(self), "DURATION must be a number of seconds > 0")
        if self.magnitude is not None:
            if self.kind in _NO_MAGNITUDE:
                raise FaultSpecError(str(self), f"{self.kind} takes no =MAGNITUDE")
            if not math.isfinite(self.magnitude):
                raise FaultSpecError(str(self), "MAGNITUDE must be a finite number")

    @property
    def end_s(self) -> float:
        return self.start_s + self.duration_s

    def __str__(self) -> str:
        text = f"{self.kind}:{self.equipment_id}@{_fmt(self.start_s)}+{_fmt(self.duration_s)}"
        return text if self.magnitude is None else f"{text}={_fmt(self.magnitude)}"


def _fmt(x: float) -> str:
    """A number as the spec grammar writes it (no exponent)."""
    return f"{x:.9f}".rstrip("0").rstrip(".") if math.isfinite(x) else str(x)


@dataclass(frozen=True)
class RandomFaults:
    """Faults on random nodes at `per_hour` per hour of simulated time across the fleet (seeded)."""

    per_hour: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.per_hour) and self.per_hour >= 0):
            raise FaultSpecError(f"random:{self.per_hour}", "PER_HOUR must be a number >= 0")


FaultItem = FaultSpec | RandomFaults


def parse_faults(spec: str) -> tuple[FaultItem, ...]:
    """Parse a fault spec; the first bad item raises FaultSpecError (a ValueError) naming it."""
    out: list[FaultItem] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        if item.startswith("random:"):
            m = _RANDOM.fullmatch(item)
            if m is None:
                raise FaultSpecError(item, "expected random:PER_HOUR, PER_HOUR a number of faults per hour")
            out.append(RandomFaults(float(m["rate"])))
            continue
        m = _ITEM.fullmatch(item)
        if m is None:
            raise FaultSpecError(item, "expected KIND:EQUIPMENT_ID@START[+DURATION][=MAGNITUDE] or random:PER_HOUR")
        try:
            out.append(FaultSpec(
                m["kind"], m["eid"], float(m["start"]),
                float(m["duration"]) if m["duration"] else DEFAULT_DURATION_S,
                float(m["magnitude"]) if m["magnitude"] else None,
            ))
        except FaultSpecError as exc:
            raise FaultSpecError(item, exc.reason) from None
    return tuple(out)


def check_faults(faults: Sequence[FaultItem], things: Sequence[tuple[str, str]]) -> None:
    """Every scheduled fault must name a node of this fleet and be possible on its type."""
    types = dict(things)
    for f in faults:
        if not isinstance(f, FaultSpec):
            continue
        etype = types.get(f.equipment_id)
        if etype is None:
            first, last = (things[0][0], things[-1][0]) if things else ("-", "-")
            raise FaultSpecError(str(f), f"no node {f.equipment_id!r} in this fleet ({first} … {last})")
        if fault_target(f.kind, etype) is None:
            raise FaultSpecError(str(f), f"{f.kind} cannot happen to a {etype}")


class FaultSchedule:
    """Decides, tick by tick, which faults start and which end; pure bookkeeping, no I/O."""

    def __init__(self, faults: Sequence[FaultItem], things: Sequence[tuple[str, str]], rng: random.Random) -> None:
        check_faults(faults, things)
        self._types = dict(things)
        self._pending = sorted((f for f in faults if isinstance(f, FaultSpec)), key=lambda f: f.start_s)
        self._per_hour = sum(f.per_hour for f in faults if isinstance(f, RandomFaults))
        self._rng = rng
        self._next_random_s = self._draw_gap() if self._per_hour > 0 else math.inf
        self.active: list[ActiveFault] = []

    def begin(self, fault: ActiveFault, faults: list[ActiveFault], silence: Callable[[bool], None]) -> None:
        """Put a started fault into effect on its machine: a dropout silences it (`silence(True)`), any
        other joins the faults its model applies to its readings (`faults`)."""
        if fault.kind == "dropout":
            silence(True)
        else:
            faults.append(fault)

    def finish(self, fault: ActiveFault, faults: list[ActiveFault], silence: Callable[[bool], None]) -> None:
        """Take an ended fault out of effect: the machine answers again (`silence(False)`) when no other
        dropout of it is still on; its model stops applying any other fault."""
        if fault.kind != "dropout":
            if fault in faults:
                faults.remove(fault)
        elif not any(f.kind == "dropout" and f.equipment_id == fault.equipment_id for f in self.active):
            silence(False)

    def _draw_gap(self) -> float:
        return self._rng.expovariate(self._per_hour / 3600.0)

    def update(self, elapsed_s: float, now: float) -> tuple[list[ActiveFault], list[ActiveFault]]:
        """Faults that start and faults that end at `elapsed_s` simulated seconds (wall clock `now`)."""
        ended = [f for f in self.active if f.end_s <= elapsed_s]
        self.active = [f for f in self.active if f.end_s > elapsed_s]
        started: list[ActiveFault] = []
        while self._pending and self._pending[0].start_s <= elapsed_s:
            spec = self._pending.pop(0)
            if spec.end_s <= elapsed_s:
                continue  # skipped over entirely (the sim was stalled); nothing happened on the line
            started.append(self._activate(spec.kind, spec.equipment_id, spec.start_s, spec.end_s,
                                          spec.magnitude, now))
        while self._next_random_s <= elapsed_s:
            fault = self._random(self._next_random_s, now)
            if fault is not None:
                started.append(fault)
            self._next_random_s += self._draw_gap()
        return started, ended

    def _random(self, start_s: float, now: float) -> ActiveFault | None:
        busy = {f.equipment_id for f in self.active}
        free = [eid for eid in self._types if eid not in busy]
        if not free:
            return None
        eid = self._rng.choice(free)
        kinds = [k for k in KINDS if fault_target(k, self._types[eid]) is not None]
        kind = self._rng.choice(kinds)
        duration = self._rng.uniform(10.0, 60.0) if kind == "dropout" else self._rng.uniform(60.0, 600.0)
        return self._activate(kind, eid, start_s, start_s + duration, None, now)

    def _activate(self, kind: str, eid: str, start_s: float, end_s: float, magnitude: float | None,
                  now: float) -> ActiveFault:
        target = fault_target(kind, self._types[eid])
        assert target is not None  # checked when the schedule was built or the kind was drawn
        default = 2 * target.scale if kind == "spike" else target.scale
        fault = ActiveFault(kind, eid, start_s, end_s, default if magnitude is None else magnitude, target,
                            started_at=now)
        self.active.append(fault)
        return fault


@dataclass(frozen=True)
class TruthRecord:
    """One line of the ground truth: which Thing had which fault, when, and where it shows."""

    thing: str
    fault: str
    start: float  # epoch seconds, the clock of the telemetry `ts`
    end: float
    feature: str
    property: str

    def to_json(self) -> str:
        return json.dumps(asdict(self))


class TruthWriter:
    """Appends one JSON line per finished fault, flushed at once so a crash keeps what was written."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def __enter__(self) -> Self:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def write(self, record: TruthRecord) -> None:
        if self._file is not None:
            self._file.write(record.to_json() + "\n")
            self._file.flush()
