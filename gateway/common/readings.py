"""The reading types every part passes on: a `Sample` of one feature, a message's `Telemetry`, a
node's `Status`; their property values; strict JSON for outside input.

Made at the boundary (MQTT payloads, connectors) and read by the twin, the buffer, the detector
and the uplink alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

PropertyValue = float | int | str | bool | list[float] | dict[str, float]
Properties = dict[str, PropertyValue]


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading of one feature: its device time, sequence number and properties."""

    feature: str
    ts: float
    seq: int | None
    properties: Properties


@dataclass(frozen=True, slots=True)
class Telemetry:
    """Everything one MQTT message carried, in device order."""

    boot: str | None
    samples: tuple[Sample, ...]

    @property
    def point_count(self) -> int:
        return sum(count_points(s.properties) for s in self.samples)


@dataclass(frozen=True, slots=True)
class Status:
    """A node's retained status / Last Will."""

    state: Literal["online", "offline"]
    fw: str | None
    ts: float | None


def _not_finite(text: str) -> Any:
    raise ValueError(f"{text[:40]} is not a finite number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value - value != 0.0:  # inf (1e400) or nan
        raise ValueError(f"{text[:40]} is not a finite number")
    return value


_STRICT = json.JSONDecoder(parse_constant=_not_finite, parse_float=_finite_float)


def loads_strict(text: str | bytes) -> Any:
    """`json.loads` for outside input, except that NaN, Infinity and floats that overflow are errors.

    Raises ValueError (JSONDecodeError, UnicodeDecodeError) or RecursionError for deep nesting.
    Nothing non-finite gets in, so nothing non-finite is ever written out as JSON.
    """
    if isinstance(text, bytes | bytearray):
        text = text.decode(json.detect_encoding(text), "surrogatepass")
    return _STRICT.decode(text)


def count_points(props: Properties) -> int:
    """How many stored points (flattened paths) these properties make."""
    n = 0
    for v in props.values():
        n += len(v) if isinstance(v, list | dict) else 1
    return n
