"""In-process publish/subscribe between the twin and its consumers (WebSocket clients, detector, ...).

Each subscriber has its own bounded queue, so a slow consumer can never slow ingest: on overflow the
subscription either drops its oldest event (counted) or is marked overflowed so its owner can
disconnect it (WebSocket clients). Events are serialized to JSON once, not once per client.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from gateway.common.readings import dumps_utf8
from gateway.common.timefmt import iso_utc

log = logging.getLogger(__name__)


class Matchable(Protocol):
    """What a subscription filter needs to know about the Thing an event is about."""

    id: str
    type: str


class ThingPredicate(Protocol):
    def matches(self, thing: Any) -> bool: ...


@dataclass(slots=True, eq=False)
class Event:
    """Base of bus events; `thing` is the live Thing, used only for filter matching."""

    thing_id: str
    thing: Matchable | None
    _json: str | None = field(default=None, init=False, repr=False)
    _utf8: bytes | None = field(default=None, init=False, repr=False)

    def payload(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_json(self) -> str:
        if self._json is None:
            self._json = self.to_utf8().decode()
        return self._json

    def to_utf8(self) -> bytes:
        """The event's JSON, made once however many clients send it."""
        if self._utf8 is None:
            self._utf8 = dumps_utf8(self.payload())
        return self._utf8


@dataclass(slots=True, eq=False)
class StateChanged(Event):
    """A feature of a Thing changed; `properties` holds what changed (a partial view)."""

    feature: str = ""
    properties: dict[str, Any] = field(default_factory=dict)
    desired: dict[str, Any] | None = None
    version: int = 0
    timestamp: float = 0.0
    source: str = "telemetry"
    # telemetry: every sample of this feature in the message, (device ts, properties), in order — what
    # the detector scores one by one (the twin keeps only the newest)
    samples: tuple[tuple[float, dict[str, Any]], ...] = ()

    def payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "event": "StateChanged",
            "thingId": self.thing_id,
            "feature": self.feature,
            "properties": self.properties,
            "version": self.version,
            "timestamp": iso_utc(self.timestamp),
        }
        if self.desired:
            out["desiredProperties"] = self.desired
        return out


@dataclass(slots=True, eq=False)
class ThingLifecycle(Event):
    """A Thing was created, replaced or deleted through the registry."""

    kind: Literal["ThingCreated", "ThingUpdated", "ThingDeleted"] = "ThingCreated"
    version: int = 0
    timestamp: float = 0.0
    document: dict[str, Any] | None = None

    def payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "event": self.kind,
            "thingId": self.thing_id,
            "version": self.version,
            "timestamp": iso_utc(self.timestamp),
        }
        if self.document is not None:
            out["thing"] = self.document
        return out


@dataclass(slots=True, eq=False)
class AnomalyEvent(Event):
    """An anomaly of a Thing opened (AnomalyDetected), changed score, or changed state."""

    kind: Literal["AnomalyDetected", "AnomalyUpdated", "AnomalyAcknowledged", "AnomalyResolved"] = "AnomalyDetected"
    anomaly: dict[str, Any] = field(default_factory=dict)  # the anomaly's JSON document
    timestamp: float = 0.0

    def payload(self) -> dict[str, Any]:
        a = self.anomaly
        return {
            "event": self.kind, "thingId": self.thing_id, "anomalyId": a.get("id"),
            "anomalyType": a.get("anomalyType"), "severity": a.get("severity"), "state": a.get("state"),
            "confidence": a.get("confidence"), "explanation": a.get("explanation"), "score": a.get("score"),
            "topFeatures": a.get("topFeatures"), "falsePositive": a.get("falsePositive", False),
            "timestamp": iso_utc(self.timestamp),
        }


Overflow = Literal["drop_oldest", "disconnect"]


class Subscription:
    """One consumer's bounded queue and what it wants to see.

    `wake_at` is how many queued events wake its consumer (`get`, `wait`): 1 wakes it for every event;
    a micro-batching consumer that waits for more is woken once per batch, and takes the events while
    they are young (events held long outlive the garbage collector's young generations, and every full
    collection of the process then walks them)."""

    def __init__(self, bus: EventBus, name: str, maxsize: int, overflow: Overflow, wake_at: int = 1) -> None:
        self.name = name
        self.overflow = overflow
        self.wake_at = wake_at
        self.everything = False
        self.thing_ids: set[str] = set()
        self.filters: list[ThingPredicate] = []
        self.dropped = 0
        self.overflowed = asyncio.Event()
        self._bus = bus
        self._items: collections.deque[Event] = collections.deque()
        self._maxsize = maxsize
        self._ready = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def broad(self) -> bool:
        return self.everything or bool(self.filters)

    def offer(self, event: Event) -> None:
        """Called by the bus; never blocks and never raises."""
        if self._closed:
            return
        if len(self._items) >= self._maxsize:
            if self.overflow == "disconnect":
                self.overflowed.set()
                self._bus.count_drop(self)
                return
            self._items.popleft()
            self._bus.count_drop(self)
        self._items.append(event)
        if len(self._items) == self.wake_at:  # set once on the way up: `get` and `wait` clear it only below
            self._ready.set()

    async def get(self) -> Event:
        """Wait for the next event."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()

    async def next(self) -> Event | None:
        """Wait for the next event; None when `nudge` ended the wait first (a consumer's own timer)."""
        if not self._items:
            self._ready.clear()
            await self._ready.wait()
            if not self._items:
                return None
        return self._items.popleft()

    def nudge(self) -> None:
        """Wake a consumer waiting in `next`, with or without events."""
        self._ready.set()

    async def wait(self, timeout: float) -> None:
        """Return once `wake_at` events are queued (at once if they are), or after `timeout` seconds at most.

        The timer of an earlier wait that ends sooner is kept rather than replaced: a consumer that waits
        again and again (woken by full batches in between) pays for one timer per `timeout`, not per wait."""
        if len(self._items) >= self.wake_at:
            return
        self._ready.clear()
        loop = asyncio.get_running_loop()
        timer = self._timer
        if timer is None or timer.when() > loop.time() + timeout:
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_later(timeout, self._time_up)
        await self._ready.wait()

    def _time_up(self) -> None:
        self._timer = None
        self._ready.set()

    def drain(self, limit: int = 1000) -> list[Event]:
        """Take up to `limit` queued events without waiting (for micro-batching consumers)."""
        out: list[Event] = []
        while self._items and len(out) < limit:
            out.append(self._items.popleft())
        return out

    def qsize(self) -> int:
        return len(self._items)

    def watch(self, *, thing_ids: Iterable[str] = (), predicate: ThingPredicate | None = None,
              everything: bool = False) -> None:
        self._bus._watch(self, set(thing_ids), predicate, everything)

    def unwatch(self, *, thing_ids: Iterable[str] = (), predicates: bool = False,
                everything: bool = False) -> None:
        self._bus._unwatch(self, set(thing_ids), predicates, everything)

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._bus._remove(self)


class EventBus:
    """Routes events to subscriptions by Thing id (an index) or by filter (checked per event)."""

    def __init__(self, on_drop: Callable[[str], None] | None = None) -> None:
        self._by_thing: dict[str, set[Subscription]] = {}
        self._broad: set[Subscription] = set()
        self._subs: set[Subscription] = set()
        self._on_drop = on_drop
        self.published = 0
        self.dropped = 0

    def subscribe(self, name: str, *, maxsize: int = 1024, overflow: Overflow = "drop_oldest",
                  wake_at: int = 1) -> Subscription:
        if maxsize < 1:
            raise ValueError("a subscription needs room for at least one event")
        if not 1 <= wake_at <= maxsize:
            raise ValueError("wake_at must be between 1 and maxsize")
        sub = Subscription(self, name, maxsize, overflow, wake_at)
        self._subs.add(sub)
        return sub

    @property
    def subscriber_count(self) -> int:
        return len(self._subs)

    def publish(self, event: Event) -> None:
        """Deliver to every interested subscription; O(subscribers of this Thing + broad ones)."""
        self.published += 1
        direct = self._by_thing.get(event.thing_id)
        if direct:
            for sub in direct:
                sub.offer(event)
        if self._broad:
            thing = event.thing
            broken: list[Subscription] = []
            for sub in self._broad:
                if direct and sub in direct:
                    continue
                try:
                    wanted = sub.everything or (thing is not None and any(f.matches(thing) for f in sub.filters))
                except Exception:  # a client's filter must never break delivery for everyone else
                    log.exception("subscription filter failed; disconnecting it", extra={"subscriber": sub.name})
                    broken.append(sub)
                    continue
                if wanted:
                    sub.offer(event)
            for sub in broken:
                sub.overflowed.set()  # its owner closes it, as for a client that cannot keep up
                self._unwatch(sub, set(), True, True)

    def count_drop(self, sub: Subscription) -> None:
        sub.dropped += 1
        self.dropped += 1
        if self._on_drop is not None:
            self._on_drop(sub.overflow)

    def _watch(self, sub: Subscription, ids: set[str], predicate: ThingPredicate | None, everything: bool) -> None:
        for tid in ids:
            sub.thing_ids.add(tid)
            self._by_thing.setdefault(tid, set()).add(sub)
        if predicate is not None:
            sub.filters.append(predicate)
        if everything:
            sub.everything = True
        if sub.broad:
            self._broad.add(sub)

    def _unwatch(self, sub: Subscription, ids: set[str], predicates: bool, everything: bool) -> None:
        for tid in ids:
            sub.thing_ids.discard(tid)
            subs = self._by_thing.get(tid)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._by_thing[tid]
        if predicates:
            sub.filters.clear()
        if everything:
            sub.everything = False
        if not sub.broad:
            self._broad.discard(sub)

    def _remove(self, sub: Subscription) -> None:
        self._unwatch(sub, set(sub.thing_ids), True, True)
        self._subs.discard(sub)
