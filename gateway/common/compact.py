"""Small mappings kept compactly: many objects with the same keys share one index of them.

The gateway keeps a few numbers per Thing by name (its series ids, its detector slots, its latest
readings), for 10,000 Things and more. A dict per Thing with an int or float object per entry costs
about 70 bytes an entry with nine entries; a `KeyedArray` keeps the numbers in an `array` and finds
them through a `Layout` (name → position) shared by every Thing whose names came in the same order:
about 25 bytes an entry, the array's own header included.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any, Generic, TypeVar, overload

K = TypeVar("K")
V = TypeVar("V", int, float)
D = TypeVar("D")

EMPTY: Mapping[Any, Any] = MappingProxyType({})  # what an owner hands out for a Thing with no mapping yet

SHARED_MAX = 64  # past this many keys a mapping's layout is its own: a chain of shared ones would grow as n²


class Layout(Generic[K]):
    """Keys in the order they were added, and each one's position. A shared layout is never changed:
    adding a key moves a mapping to the layout one key longer, made once for every mapping that goes
    the same way. A layout past `SHARED_MAX` keys belongs to one mapping and grows in place."""

    __slots__ = ("_next", "index", "keys", "shared")

    def __init__(self, index: dict[K, int], keys: list[K], shared: bool) -> None:
        self.index = index
        self.keys = keys
        self._next: dict[K, Layout[K]] = {}
        self.shared = shared

    def with_key(self, key: K) -> Layout[K]:
        """The layout of these keys and then `key`; itself (grown) when it is not shared."""
        if not self.shared:
            self.index[key] = len(self.keys)
            self.keys.append(key)
            return self
        nxt = self._next.get(key)
        if nxt is None:
            index = {**self.index, key: len(self.keys)}
            nxt = Layout(index, [*self.keys, key], len(index) <= SHARED_MAX)
            if nxt.shared:
                self._next[key] = nxt
        return nxt


class KeyedArray(Mapping[K, V]):
    """A mapping of keys to numbers of one array type (`"q"` or `"i"` for ids, `"d"` for floats), its keys in a
    `Layout` shared with the other mappings made from the same root.

    Reading from another thread while one thread adds keys sees each key with its own value: the value
    is stored before the layout that names it."""

    __slots__ = ("_layout", "_values")

    def __init__(self, root: Layout[K], typecode: str) -> None:
        self._layout = root
        self._values: Any = array(typecode)

    @staticmethod
    def root() -> Layout[K]:
        """A new empty layout, for the mappings of one owner."""
        return Layout({}, [], True)

    @overload
    def get(self, key: K, /) -> V | None: ...
    @overload
    def get(self, key: K, default: V | D, /) -> V | D: ...

    def get(self, key: K, default: Any = None) -> Any:
        pos = self._layout.index.get(key)
        return default if pos is None else self._values[pos]

    def __getitem__(self, key: K) -> V:
        pos = self._layout.index.get(key)
        if pos is None:
            raise KeyError(key)
        return self._values[pos]

    def __contains__(self, key: object) -> bool:
        return key in self._layout.index

    def __len__(self) -> int:
        return len(self._layout.keys)

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._layout.keys))  # a copy: a layout of its own grows in place

    def items(self) -> Any:
        """A list of (key, value), read at once."""
        layout, values = self._layout, self._values
        return list(zip(list(layout.keys), values, strict=False))

    def values(self) -> Any:
        return list(self._values[:len(self._layout.keys)])

    def __setitem__(self, key: K, value: V) -> None:
        pos = self._layout.index.get(key)
        if pos is None:
            layout = self._layout
            if layout.shared:  # a few keys, rarely added: an array of just their size (`append` keeps slack)
                self._values = self._values + array(self._values.typecode, (value,))
            else:
                self._values.append(value)
            self._layout = layout.with_key(key)  # after the value: a reader never finds a key without one
        else:
            self._values[pos] = value

    def without(self, key: K, root: Layout[K]) -> KeyedArray[K, V]:
        """A new mapping of the same entries but `key` (rare: a re-keyed series), laid out from `root`,
        the root this one was made from. A new object, not this one changed: the owner swaps it in with
        one assignment, so a reader on another thread sees either mapping whole, never a layout and
        values of two different ones."""
        layout = self._layout
        if key not in layout.index:
            raise KeyError(key)
        rest: KeyedArray[K, V] = KeyedArray(root, self._values.typecode)
        for k, v in zip(list(layout.keys), self._values, strict=False):
            if k != key:
                rest[k] = v
        return rest
