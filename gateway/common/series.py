"""Series: one flattened property path of one Thing's feature, the unit every store keeps points in.

A path is `temperature`, `voltage.a` or `temperature_zones[1]` (DESIGN, contracts).
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Iterator, Mapping
from typing import Any, NamedTuple


class SeriesKey(NamedTuple):
    """A series' name. A tuple, so the catalogue's index holds the key itself and finds it by a plain
    `(thing_id, feature, path)`."""

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

    A gateway with 10,000 Things keeps some 100,000 series, so the index is kept compact: ids are
    handed out one after the other, so a series' key, type and kind sit in lists indexed by its id
    (a pointer or a byte each, no dict entry or tuple per series), and names are interned (`temperature`
    is one string, however many Things have one). `series_keys` and `numeric_series` are read-only
    views of it.
    """

    def __init__(self) -> None:
        self.ids: dict[tuple[str, str, str], int] = {}  # keyed by the SeriesKey itself
        self._keys: list[SeriesKey | None] = [None]  # by id (0 is never one)
        self._types: list[str] = [""]
        self._numeric = bytearray(1)
        self._of_thing: dict[str, list[int]] = {}
        self.series_keys = SeriesKeys(self)
        self.numeric_series = NumericSeries(self)

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, key: object) -> bool:
        return key in self.ids

    def get(self, key: tuple[str, str, str]) -> int | None:
        """The id of `(thing_id, feature, path)`, or None when it is new."""
        return self.ids.get(key)

    @property
    def next_id(self) -> int:
        return len(self._keys)

    def key_of(self, sid: int) -> SeriesKey | None:
        return self._keys[sid] if 0 < sid < len(self._keys) else None

    def type_of(self, sid: int) -> str:
        return self._types[sid]

    def is_numeric(self, sid: int) -> bool:
        return 0 < sid < len(self._numeric) and self._numeric[sid] == 1

    def remember(self, sid: int, key: SeriesKey, thing_type: str, numeric: bool) -> None:
        """Record a series (after the transaction that created it committed)."""
        if sid < 1:
            raise ValueError(f"series ids start at 1, not {sid}")
        key = SeriesKey(sys.intern(key.thing_id), sys.intern(key.feature), sys.intern(key.path))
        if sid >= len(self._keys):
            grow = sid + 1 - len(self._keys)
            self._keys.extend([None] * grow)
            self._types.extend([""] * grow)
            self._numeric.extend(bytes(grow))
        old = self._keys[sid]
        if old is not None and old != key:
            del self.ids[old]
            self._of_thing[old.thing_id].remove(sid)
        self.ids[key] = sid
        if old != key:
            self._of_thing.setdefault(key.thing_id, []).append(sid)
        self._keys[sid] = key
        self._types[sid] = sys.intern(thing_type or "")
        self._numeric[sid] = 1 if numeric else 0

    def count_of(self, thing_id: str) -> int:
        """How many series a Thing has."""
        return len(self._of_thing.get(thing_id, ()))

    def series_of(self, thing_id: str, feature: str | None = None, prop: str | None = None) -> list[int]:
        """Series ids of a Thing, optionally of one feature and one property (exact path or base name)."""
        keys = self._keys
        out = []
        for sid in list(self._of_thing.get(thing_id, ())):
            k = keys[sid]
            if k is not None and (feature is None or k.feature == feature) \
                    and (prop is None or prop in (k.path, base_name(k.path))):
                out.append(sid)
        return sorted(out)


class SeriesKeys(Mapping[int, tuple[SeriesKey, str]]):
    """Series id → (key, Thing type), read from a catalogue."""

    def __init__(self, catalogue: SeriesCatalogue) -> None:
        self._c = catalogue

    def __getitem__(self, sid: int) -> tuple[SeriesKey, str]:
        key = self._c.key_of(sid) if isinstance(sid, int) else None
        if key is None:
            raise KeyError(sid)
        return key, self._c.type_of(sid)

    def __iter__(self) -> Iterator[int]:
        return iter(self._c.ids.values())

    def __len__(self) -> int:
        return len(self._c)

    def __contains__(self, sid: Any) -> bool:
        return isinstance(sid, int) and self._c.key_of(sid) is not None


class NumericSeries(Collection[int]):
    """The ids of a catalogue's series that hold numbers."""

    def __init__(self, catalogue: SeriesCatalogue) -> None:
        self._c = catalogue

    def __contains__(self, sid: object) -> bool:
        return isinstance(sid, int) and self._c.is_numeric(sid)

    def __iter__(self) -> Iterator[int]:
        return (sid for sid in self._c.ids.values() if self._c.is_numeric(sid))

    def __len__(self) -> int:
        return sum(1 for _ in self)


class SeriesIndexed:
    """The series lookups of a holder of a `SeriesCatalogue` (the `SeriesIndex` a history query reads)."""

    catalogue: SeriesCatalogue

    @property
    def series_keys(self) -> Mapping[int, tuple[SeriesKey, str]]:
        return self.catalogue.series_keys

    @property
    def numeric_series(self) -> Collection[int]:
        return self.catalogue.numeric_series

    def series_of(self, thing_id: str, feature: str | None = None, prop: str | None = None) -> list[int]:
        """Series ids of a Thing, optionally of one feature and one property (exact path or base name)."""
        return self.catalogue.series_of(thing_id, feature, prop)
