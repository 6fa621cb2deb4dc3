"""History queries: raw points or time buckets of one Thing, as unified JSON or CSV.

A response holds one entry per stored property (`feature` + flattened `property`) with columnar
points, times in epoch milliseconds:

    {"thingId": ..., "from": ISO, "to": ISO, "resolution": "raw" | "60s", "bucketSeconds": null | 60,
     "context": {"batch_id": "B-17"} | null,
     "series": [{"feature": "thermal", "property": "temperature",
                 "points": {"t": [...], "value": [...]}}]}          # raw
                 "points": {"t": [...], "min": [...], "max": [...], "avg": [...], "count": [...], "last": [...]}

Everything here is blocking and runs on a reader thread.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from gateway.common.errors import Invalid
from gateway.common.series import SeriesKey
from gateway.common.timefmt import iso_utc, parse_iso

AUTO_RAW_MAX = 5000  # resolution=auto answers raw up to this many points
AUTO_BUCKETS = 1500  # ... and otherwise picks the smallest nice bucket giving at most this many per series
MAX_RAW = 200_000  # a raw answer larger than this must use buckets or a shorter range
NICE = (1, 5, 10, 30, 60, 300, 900, 1800, 3600, 6 * 3600, 86400, 7 * 86400)
_DURATION = re.compile(r"(\d+)(s|m|h|d)")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class SeriesIndex(Protocol):
    """Which series a Thing has: the gateway's buffer and both central stores keep one."""

    @property
    def numeric_series(self) -> Collection[int]: ...
    @property
    def series_keys(self) -> Mapping[int, tuple[SeriesKey, str]]: ...

    def series_of(self, thing_id: str, feature: str | None = None, prop: str | None = None) -> list[int]: ...


class PointReader(Protocol):
    """The four point reads a history answer is built from; columnar results (numpy arrays)."""

    def raw(self, series: list[int], start: float, end: float, limit: int, *,
            text: bool = True) -> dict[str, np.ndarray]: ...
    def count(self, series: list[int], start: float, end: float) -> int: ...
    def buckets(self, series: list[int], start: float, end: float, width: float) -> dict[str, np.ndarray]: ...
    def context_points(self, series: list[int], start: float, end: float) -> dict[str, np.ndarray]: ...


HISTORY_PARAMS = frozenset({"from", "to", "feature", "property", "resolution", "format"})
DEFAULT_SPAN_S = 3600.0


@dataclass(frozen=True)
class HistoryQuery:
    """A validated history request."""

    thing_id: str
    start: float
    end: float
    feature: str | None = None
    prop: str | None = None
    resolution: str = "auto"  # "raw", "auto" or a duration such as 10s, 1m, 1h, 1d
    context: tuple[tuple[str, str], ...] = ()
    format: str = "json"


def parse_history_request(thing_id: str, query: Mapping[str, str], context_keys: Collection[str],
                          now: float) -> HistoryQuery:
    """The query parameters of `GET /api/v1/things/{id}/history`, the same on every service.

    Parameters other than the known ones are context filters (`?batch_id=B-17`) when `context_keys`
    has them, and a 400 naming them otherwise.
    """
    unknown = sorted(set(query) - HISTORY_PARAMS - set(context_keys))
    if unknown:
        raise Invalid(f"unknown parameter(s) {', '.join(unknown)}; context filters here: "
                      f"{', '.join(sorted(context_keys)) or 'none'}")
    end = parse_time(query["to"], "to") if query.get("to") else now
    start = parse_time(query["from"], "from") if query.get("from") else end - DEFAULT_SPAN_S
    if not start < end:
        raise Invalid("from must be before to")
    fmt = query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise Invalid("format must be json or csv")
    return HistoryQuery(
        thing_id=thing_id, start=start, end=end, feature=query.get("feature") or None,
        prop=query.get("property") or None, resolution=parse_resolution(query.get("resolution", "auto")),
        context=tuple(sorted((k, query[k]) for k in context_keys if k in query)), format=fmt,
    )


MAX_TIME = 253402300799.0  # 9999-12-31T23:59:59Z, the last second an ISO 8601 answer can name


def parse_time(value: str, name: str) -> float:
    """ISO 8601 (with zone, or UTC when none) or epoch seconds, from 1970 to the end of 9999."""
    try:
        t = float(value)
    except ValueError:
        try:
            t = parse_iso(value)
        except (ValueError, OverflowError):
            raise Invalid(f"{name} must be an ISO 8601 time or epoch seconds, got {value[:40]!r}") from None
    if not 0.0 <= t <= MAX_TIME:  # also NaN and infinities
        raise Invalid(f"{name} must be between 0 (1970) and {MAX_TIME:.0f} (9999-12-31) epoch seconds, "
                      f"got {value[:40]!r}")
    return t


def parse_resolution(value: str) -> str:
    if value in ("raw", "auto"):
        return value
    m = _DURATION.fullmatch(value)
    if not m or int(m[1]) == 0:
        raise Invalid("resolution must be raw, auto or a duration such as 10s, 1m, 15m, 1h, 1d")
    return value


def bucket_seconds(resolution: str) -> int:
    m = _DURATION.fullmatch(resolution)
    assert m is not None
    return int(m[1]) * _UNIT[m[2]]


def run_query(buffer: SeriesIndex, store: PointReader, q: HistoryQuery) -> tuple[str, str]:
    """Answer a query: (body, content type). `buffer` names the series, `store` reads their points."""
    series = buffer.series_of(q.thing_id, q.feature, q.prop)
    intervals = _context_intervals(buffer, store, q) if q.context else None
    resolution = q.resolution
    if resolution == "auto":
        n = store.count(series, q.start, q.end) if series else 0
        if n <= AUTO_RAW_MAX:
            resolution = "raw"
        else:
            span = q.end - q.start
            resolution = f"{next((w for w in NICE if span / w <= AUTO_BUCKETS), NICE[-1])}s"
    out: list[dict[str, Any]] = []
    width: int | None = None
    if resolution == "raw":
        has_text = any(not _is_numeric(buffer, s) for s in series)
        data = store.raw(series, q.start, q.end, MAX_RAW + 1, text=has_text) if series else {}
        if series and not has_text and np.ma.is_masked(data["value"]):
            # a numeric series that also carried text (a node sending "NaN"): read the text too
            data = store.raw(series, q.start, q.end, MAX_RAW + 1, text=True)
        if series and len(data["ts"]) > MAX_RAW:
            raise Invalid(f"more than {MAX_RAW} raw points in this range; ask for resolution=auto or a bucket "
                          "such as 1m, or a shorter range")
        out = _raw_series(buffer, data, intervals)
    else:
        width = bucket_seconds(resolution)
        if (q.end - q.start) / width > 100_000:
            raise Invalid("more than 100000 buckets; choose a wider resolution or a shorter range")
        numeric = [s for s in series if _is_numeric(buffer, s)]
        if intervals is None:
            data = store.buckets(numeric, q.start, q.end, width) if numeric else {}
            out = _bucket_series(buffer, data)
        else:  # context-filtered buckets come from raw points, which carry the context
            raw = store.raw(numeric, q.start, q.end, 10 * MAX_RAW, text=False) if numeric else {}
            if raw and len(raw["ts"]) >= 10 * MAX_RAW:
                raise Invalid("too many points to filter by context in this range; choose a shorter range")
            out = _bucket_series(buffer, _bucket_raw(_filter_raw(raw, intervals), width))
    doc = {
        "thingId": q.thing_id,
        "from": iso_utc(q.start),
        "to": iso_utc(q.end),
        "resolution": resolution if width is None else f"{width}s",
        "bucketSeconds": width,
        "context": dict(q.context) or None,
        "series": out,
    }
    if q.format == "csv":
        return _csv(doc), "text/csv"
    return json.dumps(doc, allow_nan=False, separators=(",", ":")), "application/json"


def _is_numeric(buffer: SeriesIndex, sid: int) -> bool:
    return sid in buffer.numeric_series


def _context_intervals(buffer: SeriesIndex, store: PointReader, q: HistoryQuery) -> tuple[np.ndarray, np.ndarray]:
    """[start, stop) time ranges where every requested context key had the requested value."""
    starts: np.ndarray = np.array([q.start])
    stops: np.ndarray = np.array([q.end])
    for key, wanted in q.context:
        ctx_series = [s for s in buffer.series_of(q.thing_id, None, key) if not _is_numeric(buffer, s)]
        if not ctx_series:
            return np.array([]), np.array([])
        pts = store.context_points(ctx_series, q.start, q.end)
        ts, text = pts["ts"], pts["text"]
        if len(ts) == 0:
            return np.array([]), np.array([])
        ends = np.append(ts[1:], q.end)
        match = np.array([t == wanted for t in text], dtype=bool)
        s2, e2 = _merge(np.maximum(ts[match], q.start), ends[match])
        starts, stops = _intersect(starts, stops, s2, e2)
    return starts, stops


def _merge(starts: np.ndarray, stops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(starts) == 0:
        return starts, stops
    out_s, out_e = [starts[0]], [stops[0]]
    for s, e in zip(starts[1:], stops[1:], strict=True):
        if s <= out_e[-1]:
            out_e[-1] = max(out_e[-1], e)
        else:
            out_s.append(s)
            out_e.append(e)
    return np.array(out_s), np.array(out_e)


def _intersect(a_s: np.ndarray, a_e: np.ndarray, b_s: np.ndarray, b_e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out_s, out_e = [], []
    i = j = 0
    while i < len(a_s) and j < len(b_s):
        lo, hi = max(a_s[i], b_s[j]), min(a_e[i], b_e[j])
        if lo < hi:
            out_s.append(lo)
            out_e.append(hi)
        if a_e[i] < b_e[j]:
            i += 1
        else:
            j += 1
    return np.array(out_s), np.array(out_e)


def _filter_raw(data: dict[str, np.ndarray], intervals: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    if not data or len(data["ts"]) == 0:
        return data
    starts, stops = intervals
    ts = data["ts"]
    if len(starts) == 0:
        keep = np.zeros(len(ts), dtype=bool)
    else:
        idx = np.searchsorted(starts, ts, side="right") - 1
        keep = (idx >= 0) & (ts < stops[np.clip(idx, 0, None)])
    return {k: v[keep] for k, v in data.items()}


def _groups(series: np.ndarray) -> list[tuple[int, int, int]]:
    """(series id, start, stop) runs of an array sorted by series."""
    if len(series) == 0:
        return []
    cut = np.flatnonzero(np.diff(series)) + 1
    bounds = [0, *cut.tolist(), len(series)]
    return [(int(series[bounds[i]]), bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def _name(buffer: SeriesIndex, sid: int) -> dict[str, Any]:
    key, _type = buffer.series_keys[sid]
    return {"feature": key.feature, "property": key.path}


def _plain(a: np.ndarray) -> list[Any]:
    if np.ma.isMaskedArray(a):
        return [None if m else v for v, m in zip(a.data.tolist(), np.ma.getmaskarray(a).tolist(), strict=True)]
    return a.tolist()


def _raw_series(buffer: SeriesIndex, data: Any, intervals: tuple[np.ndarray, np.ndarray] | None) -> list[Any]:
    if not data or len(data["ts"]) == 0:
        return []
    if intervals is not None:
        data = _filter_raw(data, intervals)
    out = []
    series = np.asarray(data["series"])
    t_ms = np.round(np.asarray(data["ts"]) * 1000).astype(np.int64)
    for sid, a, b in _groups(series):
        numeric = sid in buffer.numeric_series
        values = _plain(data["value"][a:b]) if numeric else _plain(data["text"][a:b])
        if numeric and "text" in data and None in values:  # a mixed-type series: text where no number
            values = [t if v is None else v for v, t in zip(values, _plain(data["text"][a:b]), strict=True)]
        out.append({**_name(buffer, sid), "points": {"t": t_ms[a:b].tolist(), "value": values}})
    return out


def _bucket_raw(data: dict[str, np.ndarray], width: int) -> dict[str, np.ndarray]:
    """Buckets computed from (filtered) raw points, in the shape the store's bucket query returns."""
    cols: dict[str, list[Any]] = {k: [] for k in ("series", "t", "min", "max", "avg", "count", "last")}
    if not data or len(data["ts"]) == 0:
        return {k: np.array(v) for k, v in cols.items()}
    series = np.asarray(data["series"])
    for sid, a, b in _groups(series):
        ts = np.asarray(data["ts"][a:b])
        vals = np.ma.filled(data["value"][a:b], np.nan).astype(float)
        buckets = np.floor(ts / width) * width
        order = np.lexsort((ts, buckets))
        buckets, vals, ts = buckets[order], vals[order], ts[order]
        starts = np.flatnonzero(np.r_[True, np.diff(buckets) != 0])
        ends = np.r_[starts[1:], len(buckets)]
        cols["series"] += [sid] * len(starts)
        cols["t"] += buckets[starts].tolist()
        cols["min"] += np.minimum.reduceat(vals, starts).tolist()
        cols["max"] += np.maximum.reduceat(vals, starts).tolist()
        counts = ends - starts
        cols["avg"] += (np.add.reduceat(vals, starts) / counts).tolist()
        cols["count"] += counts.tolist()
        cols["last"] += vals[ends - 1].tolist()
    return {k: np.array(v) for k, v in cols.items()}


def _bucket_series(buffer: SeriesIndex, data: Any) -> list[Any]:
    if not data or len(data["t"]) == 0:
        return []
    out = []
    series = np.asarray(data["series"])
    t_ms = np.round(np.asarray(data["t"], dtype=float) * 1000).astype(np.int64)
    for sid, a, b in _groups(series):
        avg = np.asarray(data["avg"][a:b], dtype=float)
        out.append({**_name(buffer, sid), "points": {
            "t": t_ms[a:b].tolist(),
            "min": _plain(data["min"][a:b]),
            "max": _plain(data["max"][a:b]),
            "avg": [round(v, 12) for v in avg.tolist()],
            "count": np.asarray(data["count"][a:b]).astype(np.int64).tolist(),
            "last": _plain(data["last"][a:b]),
        }})
    return out


def _csv(doc: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    bucketed = doc["bucketSeconds"] is not None
    cols = ["min", "max", "avg", "count", "last"] if bucketed else ["value"]
    w.writerow(["time", "feature", "property", *cols])
    for s in doc["series"]:
        p = s["points"]
        times = np.datetime_as_string(np.asarray(p["t"], dtype="datetime64[ms]"), unit="ms")
        for i, t in enumerate(times.tolist()):
            w.writerow([t + "Z", s["feature"], s["property"], *(p[c][i] for c in cols)])
    return buf.getvalue()
