"""Series: one flattened property path of one Thing's feature, the unit every store keeps points in.

A path is `temperature`, `voltage.a` or `temperature_zones[1]` (DESIGN, contracts).
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Iterator, Mapping
from typing import Any, NamedTuple

from gateway.common.compact import EMPTY, KeyedArray, Layout


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

    A gateway with 10,000 Things keeps some 100,000 series, so the index is kept compact: each Thing
    has its series ids in a `KeyedArray` keyed by `(feature, path)`, a pair shared by every Thing that
    has that series (no tuple and no int object per series), its positions shared by every Thing whose
    series came in the same order; ids are handed out one after the other, so a series' Thing,
    name, type and kind sit in lists indexed by its id (a pointer or a byte each), and names are
    interned (`temperature` is one string, however many Things have one). A `SeriesKey` is made when
    one is asked for. `series_keys` and `numeric_series` are read-only views of it.
    """

    def __init__(self) -> None:
        self._of_thing: dict[str, KeyedArray[tuple[str, str], int]] = {}  # Thing → (feature, path) → id
        self._root: Layout[tuple[str, str]] = KeyedArray.root()
        self._names: dict[tuple[str, str], tuple[str, str]] = {}  # each (feature, path) pair once
        self._thing: list[str | None] = [None]  # by id (0 is never one)
        self._name: list[tuple[str, str]] = [("", "")]
        self._types: list[str] = [""]
        self._numeric = bytearray(1)
        self._count = 0
        self.series_keys = SeriesKeys(self)
        self.numeric_series = NumericSeries(self)

    def __len__(self) -> int:
        return self._count

    def __contains__(self, key: object) -> bool:
        return isinstance(key, tuple) and len(key) == 3 and self.get(key) is not None

    def get(self, key: tuple[str, str, str]) -> int | None:
        """The id of `(thing_id, feature, path)`, or None when it is new."""
        of = self._of_thing.get(key[0])
        return None if of is None else of.get((key[1], key[2]))

    def ids_of(self, thing_id: str) -> Mapping[tuple[str, str], int]:
        """A Thing's series ids by `(feature, path)` (empty for a Thing with none; a new Thing's first
        series go into a mapping of their own, so ask again after `remember`)."""
        return self._of_thing.get(thing_id, EMPTY)

    @property
    def next_id(self) -> int:
        return len(self._thing)

    def key_of(self, sid: int) -> SeriesKey | None:
        thing = self._thing[sid] if 0 < sid < len(self._thing) else None
        return None if thing is None else SeriesKey(thing, *self._name[sid])

    def type_of(self, sid: int) -> str:
        return self._types[sid]

    def is_numeric(self, sid: int) -> bool:
        return 0 < sid < len(self._numeric) and self._numeric[sid] == 1

    def ids(self) -> Iterator[int]:
        """Every series id the index finds by its key, Thing by Thing."""
        return (sid for of in list(self._of_thing.values()) for sid in list(of.values()))

    def remember(self, sid: int, key: SeriesKey, thing_type: str, numeric: bool) -> None:
        """Record a series (after the transaction that created it committed)."""
        if sid < 1:
            raise ValueError(f"series ids start at 1, not {sid}")
        thing = sys.intern(key.thing_id)
        name = (key.feature, key.path)
        shared = self._names.get(name)
        if shared is None:
            shared = self._names[name] = (sys.intern(key.feature), sys.intern(key.path))
        if sid >= len(self._thing):
            grow = sid + 1 - len(self._thing)
            self._thing.extend([None] * grow)
            self._name.extend([("", "")] * grow)
            self._types.extend([""] * grow)
            self._numeric.extend(bytes(grow))
        old = self._thing[sid]
        if old is not None and (old, self._name[sid]) != (thing, shared):
            of_old = self._of_thing[old].without(self._name[sid], self._root)
            self._count -= 1
            if of_old:
                self._of_thing[old] = of_old  # one assignment: readers see the old mapping or this one
            else:
                del self._of_thing[old]
            old = None
        if old is None:
            of = self._of_thing.get(thing)
            if of is None:
                of = self._of_thing[thing] = KeyedArray(self._root, "q")
            if of.get(shared) is None:
                self._count += 1
            of[shared] = sid
        self._thing[sid] = thing
        self._name[sid] = shared
        self._types[sid] = sys.intern(thing_type or "")
        self._numeric[sid] = 1 if numeric else 0

    def count_of(self, thing_id: str) -> int:
        """How many series a Thing has."""
        return len(self._of_thing.get(thing_id, ()))

    def series_of(self, thing_id: str, feature: str | None = None, prop: str | None = None) -> list[int]:
        """Series ids of a Thing, optionally of one feature and one property (exact path or base name)."""
        return sorted(sid for (f, path), sid in list(self._of_thing.get(thing_id, EMPTY).items())
                      if (feature is None or f == feature) and (prop is None or prop in (path, base_name(path))))



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
        return self._c.ids()

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
        return (sid for sid in self._c.ids() if self._c.is_numeric(sid))

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
