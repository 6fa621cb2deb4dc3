"""The Thing filter language shared by `GET /things?filter=`, `POST /query` and WebSocket filters.

A filter is a JSON object; every key must match (AND). Keys are dotted paths:
`id`, `type`, `metadata.<key>[.<key>...]`, `features.<feature>.<property>[.<sub>|[<index>]]`
(reported properties) and `features.<feature>.desired.<property>`. A value is either a literal
(equality) or an object of operators: `$eq $ne $gt $gte $lt $lte $in $nin $exists $prefix`.
`{"$or": [filter, ...]}` matches when any of the given filters does. See docs/api.md.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.common.errors import Invalid
from gateway.twin.model import Thing

_MISSING = object()
_INDEX_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\[(\d+)\]\Z")
OPERATORS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists", "$prefix")


def _ordered(op: str) -> Callable[[Any, Any], bool]:
    fn = {"$gt": operator.gt, "$gte": operator.ge, "$lt": operator.lt, "$lte": operator.le}[op]

    def check(value: Any, arg: Any) -> bool:
        if value is _MISSING or isinstance(value, bool) != isinstance(arg, bool):
            return False
        try:
            return bool(fn(value, arg))
        except TypeError:
            return False

    return check


def _eq(value: Any, arg: Any) -> bool:
    if value is _MISSING:
        return False
    return _same(value, arg)


def _same(a: Any, b: Any) -> bool:
    """JSON equality where true is never 1, at any depth."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


_CHECKS: dict[str, Callable[[Any, Any], bool]] = {
    "$eq": _eq,
    "$ne": lambda v, a: not _eq(v, a),
    "$gt": _ordered("$gt"),
    "$gte": _ordered("$gte"),
    "$lt": _ordered("$lt"),
    "$lte": _ordered("$lte"),
    "$in": lambda v, a: any(_eq(v, x) for x in a),
    "$nin": lambda v, a: not any(_eq(v, x) for x in a),
    "$exists": lambda v, a: (v is not _MISSING) == a,
    "$prefix": lambda v, a: isinstance(v, str) and v.startswith(a),
}


def _path_getter(path: str) -> Callable[[Thing], Any]:
    parts = path.split(".")
    head = parts[0]
    if path == "id":
        return lambda t: t.id
    if path == "type":
        return lambda t: t.type
    if head == "metadata" and len(parts) >= 2:
        rest = _steps(parts[1:], path)
        return lambda t: _walk(t.metadata, rest)
    if head == "features" and len(parts) >= 3:
        feature = parts[1]
        desired = parts[2] == "desired" and len(parts) >= 4
        rest = _steps(parts[3:] if desired else parts[2:], path)

        def get(t: Thing) -> Any:
            f = t.features.get(feature)
            if f is None:
                return _MISSING
            return _walk(f.desired_now if desired else f.properties, rest)

        return get
    raise Invalid(
        f"filter key {path!r} is not one of id, type, metadata.<key>, features.<feature>.<property>"
    )


def _steps(parts: list[str], path: str) -> list[str | int]:
    out: list[str | int] = []
    for p in parts:
        m = _INDEX_RE.match(p)
        if m:
            out.extend([m.group(1), int(m.group(2))])
        elif p:
            out.append(p)
        else:
            raise Invalid(f"filter key {path!r} has an empty part")
    return out


def _walk(node: Any, steps: list[str | int]) -> Any:
    for s in steps:
        if isinstance(s, int):
            if not isinstance(node, list) or s >= len(node):
                return _MISSING
            node = node[s]
        else:
            if not isinstance(node, dict) or s not in node:
                return _MISSING
            node = node[s]
    return node


@dataclass(frozen=True)
class ThingFilter:
    """A compiled filter: a list of (getter, [(check, argument)]) clauses plus `$or` branches."""

    clauses: tuple[tuple[Callable[[Thing], Any], tuple[tuple[Callable[[Any, Any], bool], Any], ...]], ...]
    any_of: tuple[ThingFilter, ...]
    source: dict[str, Any]

    @classmethod
    def parse(cls, doc: Any, _depth: int = 0) -> ThingFilter:
        if doc is None:
            doc = {}
        if not isinstance(doc, dict):
            raise Invalid("filter must be a JSON object")
        if _depth > 4:
            raise Invalid("filter nests $or too deeply (max 4)")
        clauses = []
        any_of: tuple[ThingFilter, ...] = ()
        for key, cond in doc.items():
            if key == "$or":
                if not isinstance(cond, list) or not cond:
                    raise Invalid("$or must be a non-empty array of filters")
                any_of = tuple(cls.parse(c, _depth + 1) for c in cond)
                continue
            getter = _path_getter(key)
            if isinstance(cond, dict) and cond and all(k.startswith("$") for k in cond):
                checks = []
                for op, arg in cond.items():
                    if op not in _CHECKS:
                        raise Invalid(f"unknown operator {op!r} for {key!r} (known: {', '.join(OPERATORS)})")
                    if op in ("$in", "$nin") and not isinstance(arg, list):
                        raise Invalid(f"{op} for {key!r} needs an array")
                    if op == "$exists" and not isinstance(arg, bool):
                        raise Invalid(f"$exists for {key!r} needs true or false")
                    if op == "$prefix" and not isinstance(arg, str):
                        raise Invalid(f"$prefix for {key!r} needs a string")
                    checks.append((_CHECKS[op], arg))
                clauses.append((getter, tuple(checks)))
            else:
                clauses.append((getter, ((_CHECKS["$eq"], cond),)))
        return cls(tuple(clauses), any_of, doc)

    def matches(self, thing: Thing) -> bool:
        for getter, checks in self.clauses:
            value = getter(thing)
            for check, arg in checks:
                if not check(value, arg):
                    return False
        return not self.any_of or any(f.matches(thing) for f in self.any_of)
