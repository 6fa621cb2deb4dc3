"""SequenceTracker: which samples were already stored, across reboots, interleavings and restarts."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.common.readings import Sample, Telemetry
from gateway.ingest.sequence import MAX_BOOTS, WINDOW, SequenceTracker
from gateway.metrics import GatewayMetrics
from gateway.twin.model import message_rank


def msg(boot: str | None, *seqs: int) -> Telemetry:
    return Telemetry(boot, tuple(Sample("f", 1.7e9 + s, s, {"v": s}) for s in seqs))


def fresh(tr: SequenceTracker, boot: str | None, *seqs: int) -> list[int]:
    return [s.seq for s in tr.fresh("s:oven", msg(boot, *seqs)).samples if s.seq is not None]


def test_duplicates_gaps_and_reboots_are_counted() -> None:
    m = GatewayMetrics()
    tr = SequenceTracker(m)
    assert fresh(tr, "b1", 1, 2, 3) == [1, 2, 3]
    assert fresh(tr, "b1", 2, 3, 4) == [4]
    assert fresh(tr, "b1", 7) == [7]
    assert m.duplicates._value.get() == 2 and m.gaps._value.get() == 2
    assert fresh(tr, "b2", 1) == [1]
    assert m.reboots._value.get() == 1


def test_a_late_message_of_the_previous_boot_is_not_stored_again() -> None:
    tr = SequenceTracker(GatewayMetrics())
    assert fresh(tr, "old", 1, 2, 3) == [1, 2, 3]
    assert fresh(tr, "new", 1, 2) == [1, 2]
    # the broker redelivers a message of the old boot after the node rebooted
    assert fresh(tr, "old", 3) == []
    assert fresh(tr, "new", 2) == []
    assert fresh(tr, "new", 3) == [3]


def test_a_node_without_boot_id_is_still_deduplicated() -> None:
    tr = SequenceTracker(GatewayMetrics())
    assert fresh(tr, None, 1, 2) == [1, 2]
    assert fresh(tr, None, 2) == []
    got = tr.fresh("s:oven", msg(None, 3))
    assert got.mark is not None and got.mark[:2] == ("", 3) and len(got.samples) == 1


def test_messages_without_seq_are_always_fresh_and_leave_no_mark() -> None:
    tr = SequenceTracker(GatewayMetrics())
    tel = Telemetry("b", (Sample("f", 1.7e9, None, {"v": 1}),))
    got = tr.fresh("s:oven", tel)
    assert got.samples == [tel.samples[0]] and got.mark is None
    assert tr.fresh("s:oven", tel).samples == [tel.samples[0]]


def test_marks_load_from_storage_keep_only_the_newest_boots() -> None:
    tr = SequenceTracker(GatewayMetrics())
    tr.load([("s:oven", f"b{i}", 10 + i, float(i), None) for i in range(MAX_BOOTS + 2)])
    newest = f"b{MAX_BOOTS + 1}"
    assert tr.newest("s:oven") == (newest, 10 + MAX_BOOTS + 1)
    assert tr.last("s:oven", "b0") is None  # the oldest boots were let go
    assert fresh(tr, newest, 10 + MAX_BOOTS + 1) == []


def test_a_late_message_inside_the_window_is_applied_and_a_real_duplicate_dropped() -> None:
    m = GatewayMetrics()
    tr = SequenceTracker(m)
    # what a client that re-sends its queue only after CONNACK delivers after a reconnect
    assert fresh(tr, "b1", 284, 285, 286) == [284, 285, 286]
    assert fresh(tr, "b1", 289) == [289]
    assert fresh(tr, "b1", 287) == [287]
    assert fresh(tr, "b1", 288) == [288]
    assert fresh(tr, "b1", 290) == [290]
    assert fresh(tr, "b1", 287, 288, 289) == []  # the broker redelivers: real duplicates
    assert m.gaps._value.get() == 2 and m.seq_late._value.get() == 2  # lost = gap - late = 0
    assert m.duplicates._value.get() == 3


def test_below_the_window_is_dropped_and_counted() -> None:
    m = GatewayMetrics()
    tr = SequenceTracker(m)
    assert fresh(tr, "b1", 1) == [1]
    assert fresh(tr, "b1", 1 + WINDOW + 5) == [1 + WINDOW + 5]
    assert fresh(tr, "b1", 3) == []  # far too late to tell from a replay
    assert fresh(tr, "b1", 6 + 1) == [7]  # just inside the window
    assert m.seq_too_old._value.get() == 1 and m.seq_late._value.get() == 1


def test_the_window_survives_a_restart_through_its_stored_mark() -> None:
    tr = SequenceTracker(GatewayMetrics())
    for seq in (1, 2, 5):
        got = tr.fresh("s:oven", msg("b1", seq))
    assert got.mark is not None
    boot, top, seen = got.mark
    restarted = SequenceTracker(GatewayMetrics())
    restarted.load([("s:oven", boot, top, 1.0, seen)])
    assert fresh(restarted, "b1", 2, 5) == []
    assert fresh(restarted, "b1", 3, 4) == [3, 4]
    # a mark stored before windows existed means everything up to its seq was seen
    legacy = SequenceTracker(GatewayMetrics())
    legacy.load([("s:oven", "b1", 5, 1.0, None)])
    assert fresh(legacy, "b1", 3) == [] and fresh(legacy, "b1", 6) == [6]


def test_generations_order_a_late_boot_below_the_newest_boot() -> None:
    tr = SequenceTracker(GatewayMetrics())
    old = tr.fresh("s:oven", msg("old", 100)).generation
    new = tr.fresh("s:oven", msg("new", 1)).generation
    late_old = tr.fresh("s:oven", msg("old", 99)).generation
    assert old is not None and new is not None and late_old == old
    assert message_rank(late_old, 99) < message_rank(old, 100) < message_rank(new, 1)
    assert tr.newest("s:oven") == ("new", 1)


@given(st.integers(1, 300), st.integers(0, 2**32), st.integers(1, 60), st.floats(0.0, 0.5))
@settings(max_examples=150, deadline=None)
def test_any_bounded_reordering_with_redeliveries_stores_each_seq_once(n: int, seed: int, spread: int,
                                                                        dup_share: float) -> None:
    """Whatever order a client re-sends in (each message at most `spread` places from its own) and
    whatever the broker redelivers, every seq is stored exactly once and `gap - late` is 0."""
    rng = random.Random(seed)
    order = sorted(range(1, n + 1), key=lambda s: s + rng.uniform(0, spread))
    arrivals = [s for s in order for _ in range(2 if rng.random() < dup_share else 1)]
    m = GatewayMetrics()
    tr = SequenceTracker(m)
    stored = [s for seq in arrivals for s in fresh(tr, "b1", seq)]
    assert sorted(stored) == list(range(1, n + 1))
    assert m.gaps._value.get() == m.seq_late._value.get()
    assert m.duplicates._value.get() == len(arrivals) - n
