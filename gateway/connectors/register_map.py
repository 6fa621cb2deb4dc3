"""Modbus register maps as PLC vendors hand them out: a CSV with a header row.

Required columns: `address` (0-based protocol address), `name`, `type`; optional: `scale`, `unit`,
`table` (holding, input, coil, discrete; default holding), `offset`, `writable` (true/false, yes/no,
1/0), `byte_order`, `word_order` (big/little), `length` (registers of a string), `bit`, `to_unit`,
`min`, `max`, `deadband`, `feature`. `name` is `feature.property`, or a bare property whose feature
is the `feature` column (default `data`). Column names are case-insensitive; unknown columns are
errors, so a typo never silently drops a setting.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path
from typing import Any

from gateway.common import settings
from gateway.connectors.base import DeviceConfig
from gateway.connectors.config import ModbusDevice, ModbusTag

REQUIRED = ("address", "name", "type")
OPTIONAL = ("scale", "unit", "table", "offset", "writable", "byte_order", "word_order", "length", "bit", "to_unit",
            "min", "max", "deadband", "feature")
_INTS = {"address", "length", "bit"}
_FLOATS = {"scale", "offset", "min", "max", "deadband"}
_TYPES = {"int": "int16", "word": "uint16", "uint": "uint16", "dint": "int32", "udint": "uint32", "dword": "uint32",
          "real": "float32", "float": "float32", "lreal": "float64", "double": "float64", "bit": "bool",
          "boolean": "bool", "str": "string"}


class RegisterMapError(ValueError):
    """A register map that cannot be read; `problems` names each line and column."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{k}: {m}" for k, m in problems))
        self.problems = problems


def parse_register_map(text: str, *, source: str = "register map") -> tuple[ModbusTag, ...]:
    """The tags of a CSV register map, or RegisterMapError naming every bad line and column."""
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff"), newline=""))
    try:
        fieldnames = reader.fieldnames
    except csv.Error as exc:
        raise RegisterMapError([(f"{source} line 1", f"is not CSV: {exc}")]) from None
    if fieldnames is None:
        raise RegisterMapError([(source, "is empty (give a header row: address,name,type,scale,unit)")])
    columns = [c.strip().lower() for c in fieldnames]
    problems: list[tuple[str, str]] = []
    for col in columns:
        if col not in REQUIRED and col not in OPTIONAL:
            problems.append((f"{source} column {col!r}", f"unknown (known: {', '.join(REQUIRED + OPTIONAL)})"))
    for col in REQUIRED:
        if col not in columns:
            problems.append((source, f"has no {col!r} column"))
    if problems:
        raise RegisterMapError(problems)
    tags: list[ModbusTag] = []
    try:
        rows = list(reader)
    except csv.Error as exc:
        raise RegisterMapError([(f"{source} line {reader.line_num}", f"is not CSV: {exc}")]) from None
    for n, row in enumerate(rows, start=2):
        where = f"{source} line {n}"
        cells = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
        if not any(cells.values()):
            continue
        doc, row_problems = _row(cells, where)
        problems.extend(row_problems)
        tag, build_problems = settings.build(ModbusTag, doc, where)  # every problem of the line at once
        problems.extend(build_problems)
        if tag is not None and not build_problems and not row_problems:
            tags.append(tag)
    if problems:
        raise RegisterMapError(problems)
    return tuple(tags)


def _row(cells: dict[str, str], where: str) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    problems: list[tuple[str, str]] = []
    doc: dict[str, Any] = {}
    name = cells.get("name", "")
    feature, _, prop = name.rpartition(".")
    doc["feature"] = feature or cells.get("feature") or "data"
    doc["property"] = prop
    dtype = cells.get("type", "").lower()
    doc["datatype"] = _TYPES.get(dtype, dtype)
    for col, text in cells.items():
        if col in ("name", "type", "feature") or text == "":
            continue
        if col in _INTS:
            try:
                doc[col] = int(text, 0)
            except ValueError:
                problems.append((f"{where}.{col}", f"must be an integer, got {text!r}"))
        elif col in _FLOATS:
            try:
                doc[col] = float(text)
            except ValueError:
                problems.append((f"{where}.{col}", f"must be a number, got {text!r}"))
        elif col == "writable":
            low = text.lower()
            if low not in ("true", "false", "yes", "no", "1", "0", "y", "n", "rw", "r", "ro"):
                problems.append((f"{where}.writable", f"must be true or false, got {text!r}"))
            doc["writable"] = low in ("true", "yes", "1", "y", "rw")
        elif col == "table":
            doc["table"] = text.lower()
        else:
            doc[col] = text
    if doc.get("table") in ("coil", "discrete") and not doc["datatype"]:
        doc["datatype"] = "bool"  # vendors often leave the type of a bit table empty
    return doc, problems


def with_register_map(device: DeviceConfig) -> DeviceConfig:
    """A Modbus device with the tags of its `register_map` file added (RegisterMapError when unreadable)."""
    if not isinstance(device, ModbusDevice) or not device.register_map:
        return device
    path = Path(device.register_map)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise RegisterMapError([("register_map", f"cannot read {path}: {exc.strerror or exc}")]) from None
    tags = parse_register_map(text, source=path.name)
    return dataclasses.replace(device, tags=device.tags + tags)
