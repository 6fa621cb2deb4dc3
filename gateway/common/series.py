"""Series: one flattened property path of one Thing's feature, the unit every store keeps points in.

A path is `temperature`, `voltage.a` or `temperature_zones[1]` (DESIGN, contracts).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


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


@dataclass(frozen=True, slots=True)
class SeriesKey:
    thing_id: str
    feature: str
    path: str
