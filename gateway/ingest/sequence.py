"""SequenceTracker: which samples of a device were already stored, by boot id and an anti-replay window.

Nodes number their messages `seq` = 1, 2, ... per boot. Messages do not always arrive in that order:
an MQTT client re-sends its queued messages only after the broker's CONNACK but sends new ones as
soon as the socket is open, so after a broker restart 289 may come before 287 and 288. The tracker
therefore keeps, per Thing and for its few most recent boots, a window of the last `WINDOW` seqs as
IPsec and DTLS do (RFC 4303 section 3.4.3, RFC 6347 section 4.1.2.6): the highest seq seen and a
bitmap of which seqs below it were seen.

- a seq above the highest moves the window up (the seqs it skipped are counted as a gap);
- a seq inside the window not seen yet is a late message: it is stored and counted (`late`);
- a seq inside the window already seen is a duplicate (a redelivery): dropped and counted;
- a seq below the window cannot be told from a duplicate: dropped and counted (`too_old`).

So the messages a node really lost are `gap - late` (a late seq below the first one seen of a boot
counts in both, as it was never counted as a gap). The windows are made durable in the same
DuckDB transaction as the points, which is why a redelivery after a crash is never stored twice.

Each boot also has a generation (the order in which the gateway first saw the Thing's boots): with
the seq it orders a node's messages, which the twin uses to keep the newest value of a feature when
a late message arrives after a newer one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from gateway.common.readings import Sample, Telemetry
from gateway.metrics import GatewayMetrics

MAX_BOOTS = 4
WINDOW = 512  # seqs below the highest one that are still recognised (late or duplicate)
_FULL = (1 << WINDOW) - 1

# A durable mark: (boot, highest seq, bitmap) with bit i set when seq `highest - i` was seen.
Mark = tuple[str, int, int]


@dataclass(slots=True)
class _BootWindow:
    generation: int  # first-seen order of the Thing's boots: the newest boot has the highest
    top: int
    seen: int
    floor: int = 0  # the first seq of this boot seen since the start: nothing below it was counted as a gap


class Fresh(NamedTuple):  # a tuple, not a frozen dataclass: one per message, on the hot path
    """The samples of one message to apply and store, their boot's generation (None without seq),
    and the mark to store with them."""

    samples: list[Sample]
    generation: int | None
    mark: Mark | None


class SequenceTracker:
    """Per Thing: boot id → its anti-replay window, at most `MAX_BOOTS` boots (the newest kept)."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._m = metrics
        self._boots: dict[str, dict[str, _BootWindow]] = {}

    def load(self, marks: Iterable[tuple[str, str, int, float, int | None]]) -> None:
        """Marks stored with the points: (thing, boot, highest seq, when, bitmap), sorted oldest first here.
        No bitmap (a mark written before windows existed) means every seq below was seen."""
        for thing_id, boot, seq, _updated, seen in sorted(marks, key=lambda m: m[3]):
            boots = self._boots.setdefault(thing_id, {})
            boots.pop(boot, None)
            boots[boot] = _BootWindow(self._next_generation(boots), seq, _FULL if seen is None else seen & _FULL)
            self._trim(boots)

    def last(self, thing_id: str, boot: str) -> int | None:
        """The highest seq seen of this boot."""
        w = self._boots.get(thing_id, {}).get(boot)
        return None if w is None else w.top

    def newest(self, thing_id: str) -> tuple[str, int] | None:
        """The (boot, highest seq) of the Thing's most recent boot."""
        boots = self._boots.get(thing_id)
        if not boots:
            return None
        boot, w = max(boots.items(), key=lambda kv: kv[1].generation)
        return boot, w.top

    def fresh(self, thing_id: str, telemetry: Telemetry) -> Fresh:
        """The samples not seen before, and the mark to store with them.

        Messages without any `seq` cannot be recognised and are all fresh. A missing boot id
        counts as the boot `""`, so such nodes are still de-duplicated within one run.
        """
        samples = telemetry.samples
        if all(s.seq is None for s in samples):
            return Fresh(list(samples), None, None)
        boot = telemetry.boot or ""
        boots = self._boots.get(thing_id)
        if boots is None:
            boots = self._boots[thing_id] = {}
        w = boots.get(boot)
        fresh: list[Sample] = []
        accepted_here: int | None = None  # the older shape gives every feature of one message the same seq
        m = self._m
        for s in samples:
            seq = s.seq
            if seq is not None and seq != accepted_here:
                if w is None:
                    if boots:
                        m.reboots.inc()
                    w = boots[boot] = _BootWindow(self._next_generation(boots), seq, 1, seq)
                    self._trim(boots)
                elif seq > w.top:
                    shift = seq - w.top
                    if shift > 1:
                        m.gaps.inc(shift - 1)
                    w.seen = 1 if shift >= WINDOW else ((w.seen << shift) | 1) & _FULL
                    w.top = seq
                else:
                    behind = w.top - seq
                    if behind >= WINDOW:
                        m.seq_too_old.inc()
                        continue
                    bit = 1 << behind
                    if w.seen & bit:
                        m.duplicates.inc()
                        continue
                    w.seen |= bit
                    m.seq_late.inc()
                    if seq < w.floor:  # skipped before the boot's first message: a gap found late
                        m.gaps.inc()
                accepted_here = seq
            fresh.append(s)
        if w is None:
            return Fresh(fresh, None, None)
        return Fresh(fresh, w.generation, (boot, w.top, w.seen))

    @staticmethod
    def _next_generation(boots: dict[str, _BootWindow]) -> int:
        return max((w.generation for w in boots.values()), default=0) + 1

    @staticmethod
    def _trim(boots: dict[str, _BootWindow]) -> None:
        while len(boots) > MAX_BOOTS:
            oldest = min(boots, key=lambda b: boots[b].generation)
            del boots[oldest]
