"""From accepted samples to columnar points: flattening, series ids, deadband.

A point is one flattened property value (`temperature`, `voltage.a`, `temperature_zones[1]`) of one
Thing's feature at one device time. Points are collected column by column so a commit hands DuckDB
one batch of NumPy columns; nothing here touches the disk.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from gateway.common.readings import Sample
from gateway.common.series import SeriesKey, base_name, flatten
from gateway.config import DeadbandRule


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

    def columns(self, first_id: int) -> dict[str, np.ndarray]:
        """The points as the columns of the `points` table (id, series, ts, recv, seq, value, text), for
        DuckDB to read in one scan. A missing seq, value or text is NULL."""
        n = len(self.series)
        return {
            "id": np.arange(first_id, first_id + n, dtype=np.int64),
            "series": np.array(self.series, np.int32),
            "ts": np.array(self.ts, np.float64),
            "recv": np.array(self.recv, np.float64),
            "seq": nullable_int64(self.seq),
            "value": np.array(self.value, np.float64),  # None becomes NaN, which DuckDB reads as NULL
            "text": np.array(self.text, object),
        }


def nullable_int64(values: list[int | None]) -> np.ndarray:
    """64-bit integers with None as a masked (NULL) element."""
    if None not in values:
        return np.array(values, np.int64)
    return np.ma.masked_array([0 if v is None else v for v in values], mask=[v is None for v in values],
                              dtype=np.int64)


def sample_points(sample: Sample) -> Iterator[tuple[str, float | None, str | None]]:
    """One sample's points as (path, number, text); booleans are stored as 1.0 / 0.0."""
    for path, v in flatten(sample.properties):
        if isinstance(v, str):
            yield path, None, v
        else:
            yield path, float(v), None
