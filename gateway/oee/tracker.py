"""OeeTracker: machine states, counts and OEE periods of the line, fed by the event bus.

It subscribes to the bus like any other consumer (nothing runs inside ingest), takes readings in
micro-batches, and writes state events and period records to `oee.sqlite` every
`oee.flush_interval_s` on its own SQLite thread. Operators set planned stops and changeovers, and
set or correct the reason of any state event, through its methods (the API calls them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway.bus import EventBus, StateChanged, Subscription, ThingLifecycle
from gateway.common.errors import Invalid, NotFound
from gateway.common.oee import Totals
from gateway.common.sqlite import SqliteWorker
from gateway.common.tasks import cancel_and_wait
from gateway.common.wire import OeeEventDoc, OeePeriodDoc
from gateway.oee import store
from gateway.oee.calendar import ShiftCalendar
from gateway.oee.machine import MachineTracker, OperatorState, Period, PeriodKey, StateEvent
from gateway.oee.settings import OPERATOR_STATES, MachineRules, OeeSection, TypeRules

log = logging.getLogger(__name__)
T = TypeVar("T")
CONNECTIVITY = "connectivity"
BATCH = 2000
TICK_S = 0.1  # readings are taken in micro-batches at least this often ...
WAKE_AT = 64  # ... and as soon as this many events are queued: taken young, they cost the garbage collector little


class OeeMetrics:
    """What the tracker exports at `/metrics`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.readings = Counter("egiz_oee_readings_total", "Readings seen by the OEE tracker", registry=registry)
        self.state_changes = Counter("egiz_oee_state_changes_total", "Machine state changes", ["state"],
                                     registry=registry)
        self.flush_errors = Counter("egiz_oee_flush_errors_total", "OEE writes to disk that failed", registry=registry)
        self.step_errors = Counter("egiz_oee_step_errors_total", "OEE tracker steps that failed (a bug; logged)",
                                   registry=registry)
        self.dropped = Counter("egiz_oee_dropped_events_total",
                               "Bus events the OEE tracker could not keep up with (counters catch up)",
                               registry=registry)
        self.machines = Gauge("egiz_oee_machines", "Machines whose state is tracked", registry=registry)


@dataclass(frozen=True)
class MachineStatus:
    """A machine's state now, for the API and the viewer."""

    thing_id: str
    line: str
    state: str
    since: float
    source: str
    reason: str
    event_id: str

    def to_json(self) -> dict[str, Any]:
        from gateway.common.timefmt import iso_utc

        return {"thingId": self.thing_id, "line": self.line, "state": self.state, "since": iso_utc(self.since),
                "source": self.source, "reason": self.reason, "eventId": self.event_id}


class OeeTracker:
    """Machine states and OEE periods of every Thing whose type has rules in `[oee.types]`."""

    def __init__(self, section: OeeSection, data_dir: Path, line: str, bus: EventBus,
                 registry: CollectorRegistry, clock: Callable[[], float] = time.time) -> None:
        self.section = section
        self.line = line
        self.calendar = ShiftCalendar(section)
        self.metrics = OeeMetrics(registry)
        self._bus = bus
        self._clock = clock
        self._sqlite = SqliteWorker(Path(data_dir) / "oee.sqlite")
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._machines: dict[str, MachineTracker] = {}
        self._untracked: set[str] = set()  # Things whose type has no rules, until they are created or changed again
        self._counters: dict[str, dict[str, float]] = {}
        self._flush_lock = asyncio.Lock()
        self._last_flush = 0.0
        self._last_prune = 0.0
        self._orphans: list[MachineTracker] = []  # deleted Things whose last state is not written yet
        self._unwritten: tuple[dict[PeriodKey, Period], list[StateEvent]] = ({}, [])  # a failed flush's
        self.flush_errors = 0

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self._sqlite.open()
        now = self._clock()
        await self._sqlite.call(lambda db: store.init(db.conn, now))
        self._counters = await self._sqlite.call(lambda db: store.counters(db.conn))
        self._sub = self._bus.subscribe("oee", maxsize=65536, wake_at=WAKE_AT)
        self._sub.watch(everything=True)
        self._task = asyncio.create_task(self._run(), name="oee-tracker")

    async def stop(self) -> None:
        """Take what is queued, close every open state at now, write everything, close the file."""
        await cancel_and_wait(self._task)
        self._task = None
        if self._sub is not None:
            self._consume(self._sub.drain(limit=10**9))
            self._sub.close()
            self._sub = None
        now = self._clock()
        for m in self._machines.values():
            m.tick(now, self.section.offline_after_s)
            if m.event is not None:
                m.event.open = False
                m.events[m.event.id] = m.event
        await self.flush()
        await self._sqlite.close()

    async def _run(self) -> None:
        """Micro-batches: wake every TICK_S or at WAKE_AT queued events, take them, flush when due."""
        assert self._sub is not None
        sub = self._sub
        while True:
            await sub.wait(TICK_S)
            try:
                while sub.qsize():
                    self._consume(sub.drain(limit=BATCH))
                if sub.dropped:
                    self.metrics.dropped.inc(sub.dropped)
                    sub.dropped = 0
                now = self._clock()
                if now - self._last_flush >= self.section.flush_interval_s:
                    for m in self._machines.values():
                        m.tick(now, self.section.offline_after_s)
                    await self.flush()
            except Exception:  # a bug must not end state tracking for good: logged, counted, next tick
                self.metrics.step_errors.inc()
                log.exception("OEE tracker step failed")

    # ------------------------------------------------------------------ inputs
    def _consume(self, events: list[Any]) -> None:
        readings = 0
        machines, untracked = self._machines, self._untracked
        for ev in events:
            if isinstance(ev, StateChanged):
                m = machines.get(ev.thing_id)
                if m is None:
                    if ev.thing_id in untracked:
                        continue
                    m = self._machine_for(ev.thing)
                    if m is None:
                        if ev.thing is not None:
                            untracked.add(ev.thing_id)
                        continue
                feature = ev.feature
                if feature == CONNECTIVITY:
                    state = ev.properties.get("state")
                    if state in ("online", "offline"):
                        m.connectivity(state == "online", ev.timestamp)
                    continue
                read = m.readers.get(feature)
                if read is None:
                    continue
                samples = ev.samples or ((ev.timestamp, ev.properties),)
                readings += len(samples)
                read(samples)  # a message's samples in one call
            elif isinstance(ev, ThingLifecycle):
                untracked.discard(ev.thing_id)
                if ev.kind != "ThingDeleted":
                    continue
                m = machines.pop(ev.thing_id, None)
                self.metrics.machines.set(len(machines))
                if m is not None and m.event is not None:
                    m.tick(self._clock(), self.section.offline_after_s)
                    m.event.open = False
                    m.events[m.event.id] = m.event
                    self._orphans.append(m)
        if readings:
            self.metrics.readings.inc(readings)

    def _state_changed(self, state: str) -> None:
        self.metrics.state_changes.labels(state).inc()

    def _rules(self, thing_type: str, equipment_id: str) -> tuple[TypeRules, MachineRules] | None:
        rules = self.section.types.get(thing_type)
        if rules is None:
            return None
        return rules, self.section.machines.get(equipment_id, MachineRules())

    def _machine_for(self, thing: Any) -> MachineTracker | None:
        if thing is None or not hasattr(thing, "type"):
            return None
        found = self._rules(thing.type, thing.id.split(":", 1)[-1])
        if found is None:
            return None
        line = str((getattr(thing, "metadata", None) or {}).get("line") or self.line)
        m = MachineTracker(thing.id, line, found[0], found[1], self.calendar, self.section.startup_reject_s,
                           on_change=self._state_changed)
        for path, value in self._counters.get(thing.id, {}).items():
            if path in m.counters:
                m.counters[path].last = value
        self._machines[thing.id] = m
        self.metrics.machines.set(len(self._machines))
        return m

    # ------------------------------------------------------------------ operator
    def set_operator_state(self, thing: Any, state: str, reason: str, note: str, by: str) -> MachineStatus:
        """Start a planned stop or changeover (`state`), or `auto` to hand back to the rules."""
        if state != "auto" and state not in OPERATOR_STATES:
            raise Invalid(f"state must be one of {', '.join((*OPERATOR_STATES, 'auto'))}")
        if reason and reason not in self.section.reasons:
            raise Invalid(f"reason {reason!r} is not in this site's list ({', '.join(self.section.reasons)})")
        m = self._machines.get(thing.id) or self._machine_for(thing)
        if m is None:
            raise Invalid(f"{thing.type} has no OEE rules ([oee.types.{thing.type}])")
        op = None if state == "auto" else OperatorState(state, reason, note, by)
        m.set_operator(op, self._clock())
        return self._status(m)

    def status(self, thing_id: str | None = None) -> list[MachineStatus]:
        """The current state of one machine or of every machine tracked."""
        ms = [self._machines[thing_id]] if thing_id in self._machines else [] if thing_id else \
            list(self._machines.values())
        return [self._status(m) for m in ms if m.state]

    def _status(self, m: MachineTracker) -> MachineStatus:
        e = m.event
        return MachineStatus(m.thing_id, m.line, m.state, e.start if e else m.clock, e.source if e else "",
                             e.reason if e else "", e.id if e else "")

    async def set_reason(self, event_id: str, reason: str, note: str, by: str) -> dict[str, Any]:
        """Set or correct the reason of a state event; its times never change."""
        if reason not in self.section.reasons:
            raise Invalid(f"reason {reason!r} is not in this site's list ({', '.join(self.section.reasons)})")
        for m in self._machines.values():
            if m.event is not None and m.event.id == event_id:  # the open one: keep memory in step
                m.event.reason, m.event.note, m.event.reason_by = reason, note, by
        await self.flush()
        now = self._clock()
        row = await self._sqlite.call(lambda db: store.set_reason(db.conn, event_id, reason, note, by, now))
        if row is None:
            raise NotFound(f"no state event {event_id}")
        return row

    # ------------------------------------------------------------------ storage
    async def flush(self) -> None:
        """Write what changed since the last flush (one transaction)."""
        async with self._flush_lock:
            self._last_flush = self._clock()
            periods, events = self._unwritten
            self._unwritten = ({}, [])
            counters: list[tuple[str, str, float]] = []
            machines = [*self._machines.values(), *self._orphans]
            self._orphans = []
            for m in machines:
                p, e, c = m.take()
                for k, v in p.items():
                    periods.setdefault(k, Period()).add(v)
                events += e
                counters += [(m.thing_id, path, value) for path, value in c.items()]
                self._counters.setdefault(m.thing_id, {}).update(c)
            if not periods and not events:
                return
            try:
                written = self._clock()
                await self._sqlite.call(lambda db: store.write(db.conn, periods, events, counters, written))
            except Exception:
                self.flush_errors += 1
                self.metrics.flush_errors.inc()
                log.exception("OEE flush failed; kept for the next one",
                              extra={"periods": len(periods), "events": len(events)})
                if len(periods) < 100_000:  # bounded: a disk that stays broken does not eat memory
                    self._unwritten = (periods, events[-10_000:])
                return
            if self._last_flush - self._last_prune > 3600:
                self._last_prune = self._last_flush
                cutoff = self._last_flush - self.section.keep_days * 86400
                await self._sqlite.call(lambda db: store.prune(db.conn, cutoff))

    async def query(self, fn: Callable[[Any], T]) -> T:
        """Run `fn(connection)` on the OEE file's thread after a flush, so answers include the last readings."""
        if self._sub is not None:
            self._consume(self._sub.drain(limit=10**9))
        now = self._clock()
        for m in self._machines.values():
            m.tick(now, self.section.offline_after_s)
        await self.flush()
        return await self._sqlite.call(lambda db: fn(db.conn))

    async def changed_since(self, since: float) -> tuple[list[OeePeriodDoc], list[OeeEventDoc], float]:
        """What the uplink still has to send: records written after `since`, and the newest write time."""
        await self.flush()
        return await self._sqlite.call(lambda db: store.changed_since(db.conn, since))

    async def read(self, fn: Callable[[Any], T]) -> T:
        """Run `fn(connection)` on the OEE file's thread as it is (no flush first)."""
        return await self._sqlite.call(lambda db: fn(db.conn))

    async def totals(self, scope: store.Scope, start: float, end: float,
                     by: str) -> list[tuple[tuple[Any, ...], Totals]]:
        return await self.query(lambda conn: store.totals(conn, scope, start, end, by))
