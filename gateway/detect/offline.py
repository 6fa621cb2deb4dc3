"""Offline work on a gateway's stored history: labelled simulated history, training, evaluation.

These are what `egiz model train|eval` and `egiz sim --into` run. They read the gateway's DuckDB file
read-only; DuckDB lets one process hold a file for writing, so point them at a stopped gateway's
data directory or a copy of it (`cp -a`) — a running gateway's file is refused with that advice.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from gateway.common.errors import EgizError
from gateway.common.timefmt import parse_iso
from gateway.detect.anomalies import exclusions
from gateway.detect.core import DetectorCore, DetectSettings
from gateway.detect.evaluate import Detection, Report, Truth, read_truth, replay, score
from gateway.detect.models import ModelBundle, ModelError, ModelRegistry
from gateway.detect.rules import load_rules
from gateway.detect.train import Interval, feature_rows, train_model

BUFFER_FILE = "buffer.duckdb"
AGGREGATOR_FILE = "aggregator.duckdb"
WARMUP_S = 900.0  # evaluation starts the detector this long before the range, as a running gateway would be


class OfflineError(EgizError, ValueError):
    code = "offline_error"


@dataclass(frozen=True, slots=True)
class _Reading:
    thing_id: str
    thing_type: str
    feature: str
    ts: float
    properties: dict[str, Any]


def read_points(data_dir: Path, start: float, end: float, thing_type: str | None = None) -> pa.Table:
    """Numeric and text points of `[start, end)` (of one equipment type, or all), in time order — from a
    gateway's buffer, or a DuckDB aggregator's store (the same tables, every line)."""
    path = data_dir / BUFFER_FILE
    if not path.exists() and (data_dir / AGGREGATOR_FILE).exists():
        path = data_dir / AGGREGATOR_FILE
    if not path.exists():
        raise OfflineError(f"no telemetry buffer at {path}", path=str(path))
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.IOException as exc:
        raise OfflineError(f"{path} is in use ({exc}); stop the gateway or copy its data directory and point "
                           "at the copy", path=str(path)) from None
    try:
        where = "AND s.type = $t" if thing_type else ""
        params: dict[str, Any] = {"a": start, "b": end}
        if thing_type:
            params["t"] = thing_type
        return con.sql(
            "SELECT s.thing_id, s.type, s.feature, s.path, p.ts, p.value, p.text FROM points p JOIN series s "
            f"ON p.series = s.id WHERE p.ts >= $a AND p.ts < $b {where} ORDER BY p.ts, p.id", params=params,
        ).to_arrow_table()
    finally:
        con.close()


def _anomaly_exclusions(data_dir: Path, start: float, end: float) -> list[Interval]:
    path = data_dir / "anomalies.sqlite"
    if not path.exists():
        return []
    import sqlite_utils

    db = sqlite_utils.Database(sqlite3.connect(path))
    try:
        return exclusions(db, start, end)
    finally:
        db.conn.close()


def train_from_history(data_dir: Path | None, thing_type: str, start: float, end: float, models_dir: Path, *,
                       truth: Path | None = None, activate: bool = False, ignore: Sequence[str] = ("*setpoint*",),
                       progress: Callable[[str], None] | None = None, source: tuple[str, str] | None = None) -> Path:
    """Train a version of `thing_type` on normal history in `[start, end)`, from a data directory or from a
    running gateway's or aggregator's API (`source` = (url, api key)); returns the version's directory."""
    say = progress or (lambda _m: None)
    say(f"reading {thing_type} history")
    remote: list[Interval] = []
    if source is not None:
        points = fetch_points(source[0], source[1], thing_type, start, end, progress=say, excluded=remote)
        where = source[0]
    else:
        assert data_dir is not None
        points = read_points(data_dir, start, end, thing_type)
        where = str(data_dir)
    if points.num_rows == 0:
        raise OfflineError(f"no {thing_type!r} points between the given times in {where}", type=thing_type)
    excluded = _anomaly_exclusions(data_dir, start, end) if data_dir is not None else remote
    if truth is not None:
        excluded += [(t.thing, t.start - 60.0, t.end + 120.0) for t in read_truth(truth)]
    rows = feature_rows(points, ignore=ignore, exclude=excluded)
    say(f"{len(rows.x)} rows x {len(rows.keys)} features from {len(set(rows.things.tolist()))} Things "
        f"({len(excluded)} anomalous intervals left out)")
    directory = train_model(rows, thing_type, models_dir, progress=say)
    if activate:
        ModelRegistry(models_dir).activate(thing_type, directory.name)
    return directory


def readings(points: pa.Table) -> Iterator[tuple[float, str, str, str, list[tuple[str, Any]]]]:
    """Points back into readings: consecutive points of one Thing, feature and time form one."""
    cols = [points.column(n).to_pylist() for n in ("ts", "thing_id", "type", "feature", "path", "value", "text")]
    current: tuple[float, str, str] | None = None
    ttype = ""
    values: list[tuple[str, Any]] = []
    for ts, thing, typ, feature, path, value, text in zip(*cols, strict=True):
        key = (ts, thing, feature)
        if key != current:
            if current is not None:
                yield current[0], current[1], ttype, current[2], values
            current, ttype, values = key, typ, []
        values.append((path, value if value is not None else text))
    if current is not None:
        yield current[0], current[1], ttype, current[2], values


def evaluate_history(data_dir: Path, truth_path: Path, start: float, end: float, models_dir: Path, *,
                     rules_file: Path | None = None, settings: DetectSettings | None = None,
                     use_models: bool = True, window_s: float = 60.0) -> tuple[Report, list[Any], list[str]]:
    """Replay stored history through the detector (rules, statistics, active models) and score it against
    ground truth. Returns the report, the anomalies, and the model versions used."""
    truth = [t for t in read_truth(truth_path) if t.end >= start and t.start <= end]
    models: dict[str, ModelBundle] = {}
    if use_models:
        reg = ModelRegistry(models_dir)
        for ttype in reg.types():
            version = reg.active_version(ttype)
            if version is not None:
                try:
                    models[ttype] = reg.load(ttype, version)
                except ModelError as exc:
                    raise OfflineError(f"the active {ttype} model is refused: {exc}") from None
    core = DetectorCore(load_rules(rules_file), settings, models)
    points = read_points(data_dir, start - WARMUP_S, end)
    things = sorted(set(points.column("thing_id").to_pylist()))
    anomalies = [a for a in replay(core, readings(points)) if start <= a.opened_at < end]
    dets = [Detection(a.thing_id, a.opened_at, a.resolved_at if a.resolved_at is not None else end)
            for a in anomalies]
    report = score([Truth(t.thing, t.fault, t.start, t.end) for t in truth], dets, things=things, start=start,
                   end=end, window_s=window_s)
    return report, anomalies, [f"{b.type}:{b.version}" for b in models.values()]


def simulate_into(data_dir: Path, *, site: str, line: str, start: float, duration_s: float, nodes: int,
                  rate_hz: float, faults: tuple[Any, ...], seed: int, truth_path: Path | None,
                  types: tuple[str, ...] | None = None, progress: Callable[[float], None] | None = None) -> int:
    """Write simulated history straight into a gateway data directory (the same buffer a gateway keeps);
    returns the number of readings written. The fault ground truth goes to `truth_path`."""
    n, truth = asyncio.run(_simulate_into(data_dir, site, line, start, duration_s, nodes, rate_hz, faults, seed,
                                          types, progress))
    if truth_path is not None:
        truth_path.parent.mkdir(parents=True, exist_ok=True)
        truth_path.write_text("".join(t.to_json() + "\n" for t in truth), encoding="utf-8")
    return n


async def _write_readings(data_dir: Path, site: str, line: str, gateway_id: str, readings: Iterable[_Reading],
                          progress: Callable[[float], None] | None = None) -> int:
    """Readings into a gateway data directory's buffer, in Arrow batches as a gateway writes them, with a
    sequence number per Thing; returns how many were written. `progress` gets the time of every 20,000th."""
    from gateway.buffer.buffer import TelemetryBuffer
    from gateway.common.readings import Sample
    from gateway.config import GatewayConfig, load_config
    from gateway.metrics import GatewayMetrics

    cfg = load_config(GatewayConfig, None, environ={}, overrides={
        "gateway.site": site, "gateway.line": line, "gateway.id": gateway_id,
        "gateway.data_dir": str(data_dir), "auth.open": True, "buffer.disk_budget_mb": 0})
    buffer = TelemetryBuffer(cfg, GatewayMetrics())
    await buffer.start()
    n = 0
    seqs: dict[str, int] = {}
    try:
        for r in readings:
            seq = seqs[r.thing_id] = seqs.get(r.thing_id, 0) + 1
            buffer.add(r.thing_id, r.thing_type, [Sample(r.feature, r.ts, seq, r.properties)], r.ts, None)
            n += 1
            if n % 20_000 == 0:
                await buffer.flush()
                if progress is not None:
                    progress(r.ts)
        await buffer.flush()
    finally:
        await buffer.stop()
    return n


async def _simulate_into(data_dir: Path, site: str, line: str, start: float, duration_s: float, nodes: int,
                         rate_hz: float, faults: tuple[Any, ...], seed: int, types: tuple[str, ...] | None,
                         progress: Callable[[float], None] | None) -> tuple[int, list[Any]]:
    from gateway.sim.trace import Trace

    trace = Trace(site, start=start, duration_s=duration_s, nodes=nodes, rate_hz=rate_hz, faults=faults, seed=seed,
                  types=types)
    readings = (_Reading(r.thing_id, r.thing_type, r.feature, r.ts, r.properties) for r in trace)
    n = await _write_readings(data_dir, site, line, f"sim-{site}-{line}", readings,
                              None if progress is None else lambda ts: progress((ts - start) / duration_s))
    return n, trace.truth


def import_csv(data_dir: Path, path: Path, thing_id: str, thing_type: str) -> int:
    """A CSV of history (see `gateway.detect.backtest.read_series`; labels left out) into a gateway's buffer as
    readings of `thing_id`; returns the number of readings written."""
    import math

    from gateway.detect.backtest import FEATURE, read_series

    series = read_series(path)
    site = thing_id.split(":", 1)[0]
    readings = (_Reading(thing_id, thing_type, FEATURE, ts, props)
                for ts, row in zip(series.times.tolist(), series.values.tolist(), strict=True)
                if (props := {c: v for c, v in zip(series.columns, row, strict=True) if math.isfinite(v)}))
    return asyncio.run(_write_readings(data_dir, site, "import", f"import-{site}", readings))


def fetch_points(url: str, api_key: str, thing_type: str, start: float, end: float, *,
                 chunk_s: float = 3600.0, progress: Callable[[str], None] | None = None,
                 excluded: list[Interval] | None = None) -> pa.Table:
    """The same columns as `read_points`, from a running gateway's or aggregator's history API (raw
    points, an hour per request): train on a live line, or across every line of a type centrally.
    The intervals of its anomalies (not false positives) are appended to `excluded`."""
    return asyncio.run(_fetch_points(url.rstrip("/"), api_key, thing_type, start, end, chunk_s, progress,
                                     excluded if excluded is not None else []))


async def _fetch_points(base: str, key: str, thing_type: str, start: float, end: float, chunk_s: float,
                        progress: Callable[[str], None] | None, excluded: list[Interval]) -> pa.Table:
    import aiohttp

    cols: dict[str, list[Any]] = {k: [] for k in ("thing_id", "type", "feature", "path", "ts", "value", "text")}
    headers = {"Authorization": f"Bearer {key}"}

    async def get(session: aiohttp.ClientSession, path: str, params: dict[str, str]) -> Any:
        async with session.get(base + path, params=params) as r:
            if r.status != 200:
                raise OfflineError(f"{base}{path}: HTTP {r.status}: {(await r.text())[:200]}")
            return await r.json()

    try:
        async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=120)) as session:
            things: list[str] = []
            offset = 0
            while True:
                page = await get(session, "/api/v1/things", {"type": thing_type, "limit": "1000",
                                                             "offset": str(offset)})
                items = page.get("items", [])
                things += [t["id"] for t in items]
                offset += len(items)
                if not items or offset >= int(page.get("total", 0)):
                    break
            offset = 0
            while True:  # anomalies that were not false positives are left out, as from a data directory
                page = await get(session, "/api/v1/anomalies", {"limit": "1000", "offset": str(offset)})
                items = page.get("items", [])
                for a in items:
                    if a.get("thingType") == thing_type and not a.get("falsePositive"):
                        excluded.append((str(a["thingId"]), parse_iso(a["openedAt"]) - 60.0,
                                         parse_iso(a.get("resolvedAt") or a["lastSeenAt"]) + 60.0))
                offset += len(items)
                if not items or offset >= int(page.get("total", 0)):
                    break
            for n, thing in enumerate(things, 1):
                if progress is not None:
                    progress(f"fetching {thing} ({n}/{len(things)})")
                a = start
                while a < end:
                    b = min(end, a + chunk_s)
                    doc = await get(session, f"/api/v1/things/{thing}/history",
                                    {"from": repr(a), "to": repr(b), "resolution": "raw"})
                    for s in doc.get("series", []):
                        pts = s.get("points", {})
                        for t_ms, v in zip(pts.get("t", []), pts.get("value", []), strict=True):
                            num = isinstance(v, int | float) and not isinstance(v, bool)
                            cols["thing_id"].append(thing)
                            cols["type"].append(thing_type)
                            cols["feature"].append(s["feature"])
                            cols["path"].append(s["property"])
                            cols["ts"].append(t_ms / 1000.0)
                            cols["value"].append(float(v) if num else None)
                            cols["text"].append(None if num else str(v))
                    a = b
    except aiohttp.ClientError as exc:
        raise OfflineError(f"cannot read history from {base}: {exc}") from None
    table = pa.table({**{k: cols[k] for k in ("thing_id", "type", "feature", "path")},
                      "ts": pa.array(cols["ts"], pa.float64()), "value": pa.array(cols["value"], pa.float64()),
                      "text": pa.array(cols["text"], pa.string())})
    return table.sort_by([("ts", "ascending")])
