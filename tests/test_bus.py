"""EventBus and Subscription: routing, bounded queues, overflow policies, and never blocking ingest."""

from __future__ import annotations

import asyncio
import json
import time
import tracemalloc

import pytest

from gateway.bus import EventBus, Overflow, StateChanged, Subscription, ThingLifecycle, iso_utc
from gateway.twin.model import Thing
from gateway.twin.query import ThingFilter

OVEN = Thing("izmir-bakery:oven-001", "oven", metadata={"line": "line-a"})
MIXER = Thing("izmir-bakery:mixer-001", "mixer", metadata={"line": "line-a"})
PRESS = Thing("izmir-bakery:press-001", "press", metadata={"line": "line-b"})


def changed(thing: Thing | None, n: int = 0, thing_id: str | None = None) -> StateChanged:
    return StateChanged(thing_id or (thing.id if thing else "izmir-bakery:ghost"), thing, feature="thermal",
                        properties={"n": n}, version=n, timestamp=1_700_000_000.0 + n)


def received(sub: Subscription) -> list[tuple[str, int]]:
    return [(e.thing_id, e.properties["n"]) for e in sub.drain() if isinstance(e, StateChanged)]


def publish_all(bus: EventBus) -> None:
    for i, thing in enumerate((OVEN, MIXER, PRESS)):
        bus.publish(changed(thing, i))


# ------------------------------------------------------------------ routing


def test_a_new_subscription_receives_nothing_until_it_watches() -> None:
    bus = EventBus()
    sub = bus.subscribe("idle")
    publish_all(bus)
    assert sub.qsize() == 0
    assert bus.published == 3


def test_routing_by_thing_id() -> None:
    bus = EventBus()
    sub = bus.subscribe("one")
    sub.watch(thing_ids=[MIXER.id, "izmir-bakery:not-there"])
    publish_all(bus)
    assert received(sub) == [(MIXER.id, 1)]


def test_routing_by_filter() -> None:
    bus = EventBus()
    sub = bus.subscribe("line-a")
    sub.watch(predicate=ThingFilter.parse({"metadata.line": "line-a"}))
    publish_all(bus)
    assert received(sub) == [(OVEN.id, 0), (MIXER.id, 1)]


def test_routing_of_everything() -> None:
    bus = EventBus()
    sub = bus.subscribe("all")
    sub.watch(everything=True)
    publish_all(bus)
    bus.publish(changed(None, 3))
    assert received(sub) == [(OVEN.id, 0), (MIXER.id, 1), (PRESS.id, 2), ("izmir-bakery:ghost", 3)]


def test_filters_need_the_thing_but_ids_do_not() -> None:
    bus = EventBus()
    by_filter = bus.subscribe("filter")
    by_filter.watch(predicate=ThingFilter.parse({}))
    by_id = bus.subscribe("id")
    by_id.watch(thing_ids=[OVEN.id])
    bus.publish(changed(None, 7, thing_id=OVEN.id))  # e.g. an event about a deleted Thing
    assert received(by_filter) == []
    assert received(by_id) == [(OVEN.id, 7)]


def test_an_event_is_delivered_once_even_when_it_matches_several_ways() -> None:
    bus = EventBus()
    sub = bus.subscribe("greedy")
    sub.watch(thing_ids=[OVEN.id])
    sub.watch(predicate=ThingFilter.parse({"type": "oven"}))
    sub.watch(predicate=ThingFilter.parse({"metadata.line": "line-a"}))
    sub.watch(everything=True)
    publish_all(bus)
    assert received(sub) == [(OVEN.id, 0), (MIXER.id, 1), (PRESS.id, 2)]


def test_each_subscription_gets_its_own_copy_of_the_stream() -> None:
    bus = EventBus()
    a, b = bus.subscribe("a"), bus.subscribe("b")
    a.watch(everything=True)
    b.watch(thing_ids=[OVEN.id])
    publish_all(bus)
    assert received(a) == [(OVEN.id, 0), (MIXER.id, 1), (PRESS.id, 2)]
    assert received(b) == [(OVEN.id, 0)]


async def test_get_waits_for_the_next_event() -> None:
    bus = EventBus()
    sub = bus.subscribe("waiter")
    sub.watch(everything=True)
    waiter = asyncio.create_task(sub.get())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    event = changed(OVEN, 1)
    bus.publish(event)
    assert await asyncio.wait_for(waiter, 1) is event


async def test_a_batching_subscriber_is_woken_once_its_batch_is_queued_or_when_its_time_is_up() -> None:
    bus = EventBus()
    sub = bus.subscribe("batcher", wake_at=3)
    sub.watch(everything=True)
    waiter = asyncio.create_task(sub.wait(60))
    bus.publish(changed(OVEN, 0))
    bus.publish(changed(OVEN, 1))
    await asyncio.sleep(0.05)
    assert not waiter.done()  # two of three
    bus.publish(changed(OVEN, 2))
    await asyncio.wait_for(waiter, 10)
    await asyncio.wait_for(sub.wait(60), 10)  # three are queued: at once
    assert len(sub.drain()) == 3
    bus.publish(changed(OVEN, 3))
    t0 = time.monotonic()
    await asyncio.wait_for(sub.wait(0.05), 10)  # one: when the time is up
    assert time.monotonic() - t0 >= 0.04
    assert received(sub) == [(OVEN.id, 3)]
    with pytest.raises(ValueError):
        bus.subscribe("too-big", maxsize=10, wake_at=11)


def test_drain_takes_at_most_limit_in_order() -> None:
    bus = EventBus()
    sub = bus.subscribe("batch")
    sub.watch(everything=True)
    for i in range(5):
        bus.publish(changed(OVEN, i))
    assert [e.version for e in sub.drain(limit=3) if isinstance(e, StateChanged)] == [0, 1, 2]
    assert sub.qsize() == 2
    assert [e.version for e in sub.drain() if isinstance(e, StateChanged)] == [3, 4]
    assert sub.drain() == []


# ------------------------------------------------------------------ overflow


def test_drop_oldest_keeps_the_newest_and_counts_drops() -> None:
    policies: list[str] = []
    bus = EventBus(on_drop=policies.append)
    sub = bus.subscribe("slow", maxsize=3, overflow="drop_oldest")
    sub.watch(everything=True)
    for i in range(5):
        bus.publish(changed(OVEN, i))
    assert sub.qsize() == 3
    assert received(sub) == [(OVEN.id, 2), (OVEN.id, 3), (OVEN.id, 4)]
    assert sub.dropped == 2
    assert bus.dropped == 2
    assert policies == ["drop_oldest", "drop_oldest"]
    assert not sub.overflowed.is_set()


def test_disconnect_policy_marks_the_subscription_overflowed() -> None:
    policies: list[str] = []
    bus = EventBus(on_drop=policies.append)
    sub = bus.subscribe("ws-client", maxsize=2, overflow="disconnect")
    sub.watch(everything=True)
    bus.publish(changed(OVEN, 0))
    bus.publish(changed(OVEN, 1))
    assert not sub.overflowed.is_set()
    bus.publish(changed(OVEN, 2))
    assert sub.overflowed.is_set()
    assert sub.dropped == 1
    assert policies == ["disconnect"]
    assert received(sub) == [(OVEN.id, 0), (OVEN.id, 1)]  # the owner closes it; nothing is reordered


@pytest.mark.parametrize("maxsize", [0, -1])
@pytest.mark.parametrize("overflow", ["drop_oldest", "disconnect"])
def test_a_subscription_needs_room_for_at_least_one_event(maxsize: int, overflow: Overflow) -> None:
    bus = EventBus()
    with pytest.raises(ValueError, match="at least one"):
        bus.subscribe("nowhere", maxsize=maxsize, overflow=overflow)
    assert bus.subscriber_count == 0  # nothing half-registered
    bus.publish(changed(OVEN, 0))  # and publishing still works


def test_a_subscription_of_one_event_keeps_the_newest() -> None:
    bus = EventBus()
    sub = bus.subscribe("tiny", maxsize=1)
    sub.watch(everything=True)
    for i in range(3):
        bus.publish(changed(OVEN, i))
    assert received(sub) == [(OVEN.id, 2)]
    assert sub.dropped == 2


def test_overflow_of_one_subscription_does_not_touch_another() -> None:
    bus = EventBus()
    slow = bus.subscribe("slow", maxsize=1)
    fast = bus.subscribe("fast", maxsize=100)
    slow.watch(everything=True)
    fast.watch(everything=True)
    for i in range(10):
        bus.publish(changed(OVEN, i))
    assert slow.dropped == 9
    assert fast.dropped == 0
    assert [n for _, n in received(fast)] == list(range(10))


# ------------------------------------------------------------------ unsubscribe and close


def test_unwatch_by_id() -> None:
    bus = EventBus()
    sub = bus.subscribe("s")
    sub.watch(thing_ids=[OVEN.id, MIXER.id])
    sub.unwatch(thing_ids=[OVEN.id])
    publish_all(bus)
    assert received(sub) == [(MIXER.id, 1)]
    assert sub.thing_ids == {MIXER.id}


def test_unwatch_filters() -> None:
    bus = EventBus()
    sub = bus.subscribe("s")
    sub.watch(predicate=ThingFilter.parse({"type": "oven"}))
    sub.watch(thing_ids=[PRESS.id])
    sub.unwatch(predicates=True)
    publish_all(bus)
    assert received(sub) == [(PRESS.id, 2)]
    assert not sub.broad


def test_unwatch_everything_keeps_filters() -> None:
    bus = EventBus()
    sub = bus.subscribe("s")
    sub.watch(everything=True)
    sub.watch(predicate=ThingFilter.parse({"type": "mixer"}))
    sub.unwatch(everything=True)
    publish_all(bus)
    assert received(sub) == [(MIXER.id, 1)]
    sub.unwatch(predicates=True)
    publish_all(bus)
    assert received(sub) == []


def test_close_stops_delivery_and_forgets_the_subscription() -> None:
    bus = EventBus()
    closing, staying = bus.subscribe("closing"), bus.subscribe("staying")
    for sub in (closing, staying):
        sub.watch(thing_ids=[OVEN.id], predicate=ThingFilter.parse({}), everything=True)
    assert bus.subscriber_count == 2
    closing.close()
    assert bus.subscriber_count == 1
    publish_all(bus)
    assert closing.qsize() == 0
    closing.offer(changed(OVEN, 9))  # even a direct offer is ignored once closed
    assert closing.qsize() == 0
    assert len(received(staying)) == 3


# ------------------------------------------------------------------ event payloads


def test_state_changed_payload_and_json_is_serialized_once() -> None:
    event = StateChanged(OVEN.id, OVEN, feature="thermal", properties={"temperature": 181.5}, version=7,
                         timestamp=1_700_000_000.25, desired={"setpoint": 200})
    doc = json.loads(event.to_json())
    assert doc == {"event": "StateChanged", "thingId": OVEN.id, "feature": "thermal",
                   "properties": {"temperature": 181.5}, "version": 7,
                   "timestamp": "2023-11-14T22:13:20.250Z", "desiredProperties": {"setpoint": 200}}
    assert event.to_json() is event.to_json()  # one serialization shared by every client
    plain = StateChanged(OVEN.id, OVEN, feature="thermal", properties={"a": 1})
    assert "desiredProperties" not in plain.payload()


def test_lifecycle_payload() -> None:
    created = ThingLifecycle(OVEN.id, OVEN, kind="ThingCreated", version=1, timestamp=0.0,
                             document=OVEN.to_document())
    assert created.payload() == {"event": "ThingCreated", "thingId": OVEN.id, "version": 1,
                                 "timestamp": "1970-01-01T00:00:00.000Z", "thing": OVEN.to_document()}
    deleted = ThingLifecycle(OVEN.id, OVEN, kind="ThingDeleted", version=3, timestamp=0.0)
    assert "thing" not in deleted.payload()
    assert deleted.payload()["event"] == "ThingDeleted"


def test_iso_utc_has_milliseconds_and_z() -> None:
    assert iso_utc(0.0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc(1_700_000_000.5) == "2023-11-14T22:13:20.500Z"


# ------------------------------------------------------------------ a slow subscriber never blocks publish

N_EVENTS = 100_000


@pytest.mark.parametrize("overflow", ["drop_oldest", "disconnect"])
def test_a_subscriber_that_never_reads_costs_bounded_time_and_memory(overflow: Overflow) -> None:
    bus = EventBus()
    never_reads = bus.subscribe("stuck", maxsize=1024, overflow=overflow)
    never_reads.watch(everything=True)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        start = time.perf_counter()
        for i in range(N_EVENTS):
            bus.publish(StateChanged(OVEN.id, OVEN, feature="thermal", properties={"temperature": float(i)},
                                     version=i, timestamp=1_700_000_000.0))
        elapsed = time.perf_counter() - start
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert never_reads.qsize() == 1024
    assert never_reads.dropped == N_EVENTS - 1024
    # Traced, 100k publishes take under a second here; unbounded they would also keep ~35 MB.
    assert elapsed < 15.0, f"publishing {N_EVENTS} events took {elapsed:.2f} s"
    assert grown < 2_000_000, f"memory grew by {grown} bytes for a queue of 1024"


def test_a_failing_filter_is_disconnected_and_never_breaks_delivery() -> None:
    class Exploding:
        def matches(self, thing: object) -> bool:
            raise RuntimeError("boom")

    bus = EventBus()
    bad = bus.subscribe("bad")
    good = bus.subscribe("good")
    bad.watch(predicate=Exploding())
    good.watch(everything=True)
    thing = Thing("s:oven-001", "oven")
    for _ in range(3):
        bus.publish(StateChanged(thing.id, thing, feature="f", properties={"a": 1}, version=1, timestamp=1.0))
    assert good.qsize() == 3
    assert bad.overflowed.is_set() and bad.qsize() == 0 and not bad.broad
