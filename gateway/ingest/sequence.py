"""SequenceTracker: which samples of a device were already stored, by boot id and seq.

Nodes number their messages `seq` = 1, 2, ... per boot. The tracker keeps, per Thing, the last
stored seq of its few most recent boots, so a message the broker redelivers — also one from the
boot before a reboot, arriving late — is recognised and dropped. The marks are made durable in the
same DuckDB transaction as the points, which is why a redelivery after a crash is never stored twice.
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway.common.readings import Sample, Telemetry
from gateway.metrics import GatewayMetrics

MAX_BOOTS = 4


class SequenceTracker:
    """Per Thing: boot id → last accepted seq, newest boot last, at most `MAX_BOOTS` boots."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._m = metrics
        self._boots: dict[str, dict[str, int]] = {}

    def load(self, marks: Iterable[tuple[str, str, int, float]]) -> None:
        """Marks stored with the points: (thing, boot, last seq, when), oldest first after sorting."""
        for thing_id, boot, seq, _updated in sorted(marks, key=lambda m: m[3]):
            boots = self._boots.setdefault(thing_id, {})
            boots.pop(boot, None)
            boots[boot] = seq
            while len(boots) > MAX_BOOTS:
                del boots[next(iter(boots))]

    def last(self, thing_id: str, boot: str) -> int | None:
        return self._boots.get(thing_id, {}).get(boot)

    def newest(self, thing_id: str) -> tuple[str, int] | None:
        """The (boot, last seq) of the Thing's most recent boot."""
        boots = self._boots.get(thing_id)
        if not boots:
            return None
        boot = next(reversed(boots))
        return boot, boots[boot]

    def fresh(self, thing_id: str, telemetry: Telemetry) -> tuple[list[Sample], tuple[str, int] | None]:
        """The samples not seen before, and the (boot, last seq) mark to store with them.

        Messages without any `seq` cannot be recognised and are all fresh. A missing boot id
        counts as the boot `""`, so such nodes are still de-duplicated within one run.
        """
        samples = telemetry.samples
        if all(s.seq is None for s in samples):
            return list(samples), None
        boot = telemetry.boot or ""
        boots = self._boots.get(thing_id)
        if boots is None:
            boots = self._boots[thing_id] = {}
        last = boots.pop(boot, None)
        if last is None and boots:
            self._m.reboots.inc()
        fresh: list[Sample] = []
        accepted_here: int | None = None  # the older shape gives every feature of one message the same seq
        for s in samples:
            if s.seq is not None and s.seq != accepted_here:
                if last is not None and s.seq <= last:
                    self._m.duplicates.inc()
                    continue
                if last is not None and s.seq > last + 1:
                    self._m.gaps.inc(s.seq - last - 1)
                last = accepted_here = s.seq
            fresh.append(s)
        if last is not None:
            boots[boot] = last  # re-inserted: newest boot last
            while len(boots) > MAX_BOOTS:
                del boots[next(iter(boots))]
            return fresh, (boot, last)
        return fresh, None
