"""The reading types every part passes on: a `Sample` of one feature, a message's `Telemetry`, a
node's `Status`; their property values; strict JSON for outside input.

Made at the boundary (MQTT payloads, connectors) and read by the twin, the buffer, the detector
and the uplink alike.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

import orjson

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
# orjson turns an integer beyond 64 bits into a float; the standard decoder keeps it exact (and
# the checks downstream refuse it), so a payload with such a run of digits takes that path.
_LONG_DIGITS = re.compile(rb"[0-9]{19}")
_LONG_DIGITS_STR = re.compile(r"[0-9]{19}")


def loads_strict(text: str | bytes) -> Any:
    """`json.loads` for outside input, except that NaN, Infinity and floats that overflow are errors.

    Raises ValueError (JSONDecodeError, UnicodeDecodeError) or RecursionError for deep nesting.
    Nothing non-finite gets in, so nothing non-finite is ever written out as JSON.

    orjson decodes the common case (UTF-8, finite numbers, integers of at most 64 bits) several
    times faster and refuses NaN, Infinity and overflowing floats itself; whatever it refuses or
    may change (other encodings, a byte order mark, lone surrogates, nesting deeper than 1024, long
    integers) is decoded by the standard decoder, so the result and the errors are the same.
    """
    if isinstance(text, bytes | bytearray):
        if _LONG_DIGITS.search(text) is None:
            try:
                return orjson.loads(text)
            except orjson.JSONDecodeError:
                pass
        text = text.decode(json.detect_encoding(text), "surrogatepass")
    elif _LONG_DIGITS_STR.search(text) is None:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    return _STRICT.decode(text)


def dumps_utf8(value: Any) -> bytes:
    """Compact JSON as UTF-8 bytes, for what the gateway writes often (events, twin rows).

    orjson writes it several times faster than `json.dumps`; what orjson refuses (an integer beyond
    64 bits, a key that is not a string) is written by `json.dumps`, so anything `json` could
    write still can be.
    """
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(value, separators=(",", ":")).encode()


def count_points(props: Properties) -> int:
    """How many stored points (flattened paths) these properties make."""
    n = 0
    for v in props.values():
        n += len(v) if isinstance(v, list | dict) else 1
    return n
