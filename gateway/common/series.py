"""Series: one flattened property path of one Thing's feature, the unit every store keeps points in.

A path is `temperature`, `voltage.a` or `temperature_zones[1]` (DESIGN, contracts).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class SeriesKey:
    thing_id: str
    feature: str
    path: str


def flatten(properties: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """`{"voltage": {"a": 1}, "zones": [1, 2]}` → `("voltage.a", 1), ("zones[0]", 1), ("zones[1]", 2)`."""
    for name, value in properties.items():
        if isinstance(value, dict):
            for k, v in value.items():
                yield f"{name}.{k}", v
        elif isinstance(value, list):
            for i, v in enumerate(value):
                yield f"{name}[{i}]", v
        else:
            yield name, value


def base_name(path: str) -> str:
    """The property a flattened path belongs to: `voltage.a` → `voltage`, `zones[1]` → `zones`."""
    for i, ch in enumerate(path):
        if ch in ".[":
            return path[:i]
    return path


class SeriesCatalogue:
    """Which series id names which `SeriesKey`, the Thing type it was first seen with, and which
    series hold numbers: the one index the gateway's buffer and both central stores keep in memory.

    Series are looked up by key on every write and listed per Thing on every history read; the
    per-Thing index keeps that listing proportional to the Thing's own series, not to all of them.
    """

    def __init__(self) -> None:
        self.series_keys: dict[int, tuple[SeriesKey, str]] = {}
        self.numeric_series: set[int] = set()
        self.ids: dict[tuple[str, str, str], int] = {}
        self._of_thing: dict[str, dict[int, SeriesKey]] = {}

    def __len__(self) -> int:
        return len(self.series_keys)

    def __contains__(self, key: object) -> bool:
        return key in self.ids

    def get(self, key: tuple[str, str, str]) -> int | None:
        """The id of `(thing_id, feature, path)`, or None when it is new."""
        return self.ids.get(key)

    @property
    def next_id(self) -> int:
        return max(self.series_keys, default=0) + 1

    def remember(self, sid: int, key: SeriesKey, thing_type: str, numeric: bool) -> None:
        """Record a series (after the transaction that created it committed)."""
        self.ids[(key.thing_id, key.feature, key.path)] = sid
        self.series_keys[sid] = (key, thing_type or "")
        self._of_thing.setdefault(key.thing_id, {})[sid] = key
        if numeric:
            self.numeric_series.add(sid)

    def count_of(self, thing_id: str) -> int:
        """How many series a Thing has."""
        return len(self._of_thing.get(thing_id, ()))

    def series_of(self, thing_id: str, feature: str | None = None, prop: str | None = None) -> list[int]:
        """Series ids of a Thing, optionally of one feature and one property (exact path or base name)."""
        return sorted(sid for sid, k in list(self._of_thing.get(thing_id, {}).items())
                      if (feature is None or k.feature == feature)
                      and (prop is None or prop in (k.path, base_name(k.path))))


class SeriesIndexed:
    """The series lookups of a holder of a `SeriesCatalogue` (the `SeriesIndex` a history query reads)."""

    catalogue: SeriesCatalogue

    @property
    def series_keys(self) -> dict[int, tuple[SeriesKey, str]]:
        return self.catalogue.series_keys

    @property
    def numeric_series(self) -> set[int]:
        return self.catalogue.numeric_series

    def series_of(self, thing_id: str, feature: str | None = None, prop: str | None = None) -> list[int]:
        """Series ids of a Thing, optionally of one feature and one property (exact path or base name)."""
        return self.catalogue.series_of(thing_id, feature, prop)
