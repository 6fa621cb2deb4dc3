"""Words for operators: what a stored property path is called, its unit, and one-line explanations.

The detector works on keys `feature/path` (`thermal/temperature_zones[1]`); an operator reads
"zone 2 temperature". Unknown paths fall back to the path itself, so a new sensor still explains.
"""

from __future__ import annotations

import re

_INDEXED = re.compile(r"(?P<name>[A-Za-z0-9_]+)\[(?P<i>\d+)\]")
_NAMES = {
    "temperature_zones": "zone {n} temperature",
    "temperature": "temperature",
    "humidity": "humidity",
    "voltage": "phase {X} voltage",
    "current": "phase {X} current",
    "power_kw": "power",
    "power_factor": "power factor",
    "rms": "vibration RMS",
    "peak": "vibration peak",
    "motor_current": "motor current",
    "speed_rpm": "speed",
    "speed_mps": "belt speed",
    "setpoint": "setpoint",
}
_UNITS = {
    "temperature_zones": "°C", "temperature": "°C", "setpoint": "°C", "humidity": "%RH", "voltage": "V",
    "current": "A", "motor_current": "A", "power_kw": "kW", "rms": "mm/s", "peak": "mm/s", "speed_rpm": "rpm",
    "speed_mps": "m/s",
}


def split_key(key: str) -> tuple[str, str]:
    """`thermal/temperature_zones[1]` → (`thermal`, `temperature_zones[1]`)."""
    feature, _, path = key.partition("/")
    return feature, path


def _base(path: str) -> tuple[str, str | None]:
    m = _INDEXED.fullmatch(path)
    if m:
        return m["name"], m["i"]
    name, _, sub = path.partition(".")
    return name, sub or None


def label(key: str) -> str:
    """An operator's name for a property: `thermal/temperature_zones[1]` → `zone 2 temperature`."""
    feature, path = split_key(key)
    name, sub = _base(path)
    pattern = _NAMES.get(name)
    if pattern is None:
        return path.replace("_", " ")
    if name == "current" and sub is None:
        return "motor current" if feature == "motor" else "current"
    if "{n}" in pattern and sub is not None and sub.isdigit():
        return pattern.format(n=int(sub) + 1)
    if "{X}" in pattern and sub is not None:
        return pattern.format(X=sub.upper())
    return pattern.replace(" {n}", "").replace("phase {X} ", "")


def unit(key: str) -> str:
    """The unit of a property, "" when unknown."""
    return _UNITS.get(_base(split_key(key)[1])[0], "")


def amount(value: float, key: str) -> str:
    """`14.2 °C`, `0.31 mm/s`: a difference or value with its unit, to a sensible precision."""
    u = unit(key)
    digits = 1 if abs(value) >= 10 else 2
    text = f"{value:.{digits}f}"
    return f"{text} {u}" if u and u != "%RH" else f"{text}{' %RH' if u else ''}"


def deviation(key: str, value: float, usual: float, what: str, context: str = "") -> str:
    """"zone 2 temperature 14.2 °C above its usual for recipe croissant (190.1 °C)"."""
    diff = value - usual
    side = "above" if diff >= 0 else "below"
    where = f" for {context}" if context else ""
    return f"{label(key)} {amount(abs(diff), key)} {side} {what}{where} ({amount(usual, key)})"
