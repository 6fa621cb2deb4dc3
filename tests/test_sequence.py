"""SequenceTracker: which samples were already stored, across reboots, interleavings and restarts."""

from __future__ import annotations

from gateway.common.readings import Sample, Telemetry
from gateway.ingest.sequence import MAX_BOOTS, SequenceTracker
from gateway.metrics import GatewayMetrics


def msg(boot: str | None, *seqs: int) -> Telemetry:
    return Telemetry(boot, tuple(Sample("f", 1.7e9 + s, s, {"v": s}) for s in seqs))


def fresh(tr: SequenceTracker, boot: str | None, *seqs: int) -> list[int]:
    samples, _mark = tr.fresh("s:oven", msg(boot, *seqs))
    return [s.seq for s in samples if s.seq is not None]


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
    samples, mark = tr.fresh("s:oven", msg(None, 3))
    assert mark == ("", 3) and len(samples) == 1


def test_messages_without_seq_are_always_fresh_and_leave_no_mark() -> None:
    tr = SequenceTracker(GatewayMetrics())
    tel = Telemetry("b", (Sample("f", 1.7e9, None, {"v": 1}),))
    assert tr.fresh("s:oven", tel) == ([tel.samples[0]], None)
    assert tr.fresh("s:oven", tel)[0] == [tel.samples[0]]


def test_marks_load_from_storage_keep_only_the_newest_boots() -> None:
    tr = SequenceTracker(GatewayMetrics())
    tr.load([("s:oven", f"b{i}", 10 + i, float(i)) for i in range(MAX_BOOTS + 2)])
    newest = f"b{MAX_BOOTS + 1}"
    assert tr.newest("s:oven") == (newest, 10 + MAX_BOOTS + 1)
    assert tr.last("s:oven", "b0") is None  # the oldest boots were let go
    assert fresh(tr, newest, 10 + MAX_BOOTS + 1) == []
