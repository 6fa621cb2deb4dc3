"""From accepted samples to columnar points: flattening, series ids, deadband.

A point is one flattened property value (`temperature`, `voltage.a`, `temperature_zones[1]`) of one
Thing's feature at one device time. Points are collected column by column so a commit hands DuckDB
one Arrow batch; nothing here touches the disk.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from gateway.common.readings import Sample
from gateway.common.series import SeriesKey, base_name, flatten
from gateway.config import DeadbandRule

POINT_SCHEMA = pa.schema([
    ("id", pa.int64()),
    ("series", pa.int32()),
    ("ts", pa.float64()),
    ("recv", pa.float64()),
    ("seq", pa.int64()),
    ("value", pa.float64()),
    ("text", pa.string()),
])


class Deadband:
    """Decides per series whether a numeric value is stored raw; state lives in memory only."""

    __slots__ = ("_last", "_last_ts", "_rule")

    def __init__(self, rule: DeadbandRule) -> None:
        self._rule = rule
        self._last: float | None = None
        self._last_ts = 0.0

    def keep(self, value: float, ts: float) -> bool:
        last, r = self._last, self._rule
        if last is None or (r.max_interval_s and ts - self._last_ts >= r.max_interval_s):
            keep = True
        else:
            delta = abs(value - last)
            keep = (r.absolute > 0 and delta > r.absolute) or (r.percent > 0 and delta > abs(last) * r.percent / 100)
        if keep:
            self._last, self._last_ts = value, ts
        return keep


def deadband_for(rules: Iterable[DeadbandRule], thing_type: str, key: SeriesKey) -> Deadband | None:
    """The first rule matching a series (type, feature, path or its base name), as a fresh state."""
    base = base_name(key.path)
    for r in rules:
        if r.type and r.type != thing_type:
            continue
        if r.feature and r.feature != key.feature:
            continue
        if r.property in (key.path, base):
            return Deadband(r)
    return None


@dataclass
class PointBatch:
    """Points and sequence marks waiting for one commit, column by column."""

    series: list[int] = field(default_factory=list)
    ts: list[float] = field(default_factory=list)
    recv: list[float] = field(default_factory=list)
    seq: list[int | None] = field(default_factory=list)
    value: list[float | None] = field(default_factory=list)
    text: list[str | None] = field(default_factory=list)
    new_series: list[tuple[int, SeriesKey, str, bool]] = field(default_factory=list)  # id, key, type, numeric
    # (thing, boot) → (highest seq, anti-replay bitmap as stored)
    seq_marks: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.series)

    def to_arrow(self, first_id: int) -> pa.Table:
        n = len(self.series)
        return pa.table(
            [
                pa.array(range(first_id, first_id + n), pa.int64()),
                pa.array(self.series, pa.int32()),
                pa.array(self.ts, pa.float64()),
                pa.array(self.recv, pa.float64()),
                pa.array(self.seq, pa.int64()),
                pa.array(self.value, pa.float64()),
                pa.array(self.text, pa.string()),
            ],
            schema=POINT_SCHEMA,
        )


def sample_points(sample: Sample) -> Iterator[tuple[str, float | None, str | None]]:
    """One sample's points as (path, number, text); booleans are stored as 1.0 / 0.0."""
    for path, v in flatten(sample.properties):
        if isinstance(v, str):
            yield path, None, v
        else:
            yield path, float(v), None
