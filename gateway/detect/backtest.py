"""Backtests on labelled history exported as CSV: how the gateway's detector would have done.

A file is one Thing: a time column, numeric columns (its properties) and, optionally, the label
columns `anomaly` (1 while the equipment is in an anomalous state) and `changepoint` (1 where a change
starts) — labels are read for scoring only and never reach the detector. The separator (`;`, `,`,
tab) and the time format (ISO 8601, with or without a zone — none means UTC —, or epoch seconds) are
detected. A model version is trained on the training rows with the project's own training code and
both parts are replayed, in device time, through the same `DetectorCore` the gateway runs with its
default settings; each replayed row is labelled 1 when an anomaly is open after that row — which
depends only on rows up to it (online, causal).

Scored point-wise, pooled over every test row of every file: F1 = TP / (TP + (FN + FP) / 2),
FAR = FP / (FP + TN), MAR = FN / (FN + TP); and per event (a run of `anomaly` = 1): found when an
anomaly is open on any of its rows, the delay from its first row to the first labelled one, alarms
per changepoint, and false alarms (anomalies opening on a normal row) per hour of normal operation.
"""

from __future__ import annotations

import csv
import math
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from gateway.common.errors import EgizError
from gateway.detect.core import DetectorCore, DetectSettings
from gateway.detect.models import ModelBundle
from gateway.detect.rules import load_rules
from gateway.detect.train import feature_rows, train_model

LABELS = ("anomaly", "changepoint")
FEATURE = "measurements"  # the feature every CSV column becomes a property of
TIME_NAMES = ("datetime", "timestamp", "time", "ts", "date")


class BacktestError(EgizError, ValueError):
    code = "backtest_error"


@dataclass(frozen=True)
class LabelledSeries:
    """One CSV file: times (epoch seconds), numeric columns, and the label columns kept apart."""

    path: Path
    times: np.ndarray  # (n,)
    columns: list[str]
    values: np.ndarray  # (n, d), NaN where a cell is empty
    anomaly: np.ndarray | None  # (n,) 0/1
    changepoint: np.ndarray | None

    def __len__(self) -> int:
        return len(self.times)

    def part(self, a: int, b: int | None = None) -> LabelledSeries:
        cut = slice(a, b)
        return LabelledSeries(self.path, self.times[cut], self.columns, self.values[cut],
                              None if self.anomaly is None else self.anomaly[cut],
                              None if self.changepoint is None else self.changepoint[cut])


def _parse_time(text: str) -> float:
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.timestamp()


def _number(text: str) -> float:
    text = text.strip()
    if not text:
        return math.nan
    return float(text)


def read_series(path: Path) -> LabelledSeries:
    """Read one CSV (separator and time format detected); a clear BacktestError for what is unusable."""
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise BacktestError(f"{path}: cannot read ({exc})", path=str(path)) from None
    head = raw[:8192]
    try:
        sep = csv.Sniffer().sniff(head, delimiters=";,\t").delimiter
    except csv.Error:
        sep = max(";,\t", key=lambda c: head.splitlines()[0].count(c) if head else 0)
    rows = list(csv.reader(raw.splitlines(), delimiter=sep))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if len(rows) < 2:
        raise BacktestError(f"{path}: no data rows", path=str(path))
    header = [h.strip() for h in rows[0]]
    lower = [h.lower() for h in header]
    t_col = next((lower.index(n) for n in TIME_NAMES if n in lower), 0)
    data = rows[1:]
    try:
        times = np.array([_parse_time(r[t_col]) for r in data])
    except (ValueError, IndexError) as exc:
        raise BacktestError(f"{path}: the time column {header[t_col]!r} is neither ISO 8601 nor epoch seconds "
                            f"({exc})", path=str(path)) from None
    if np.any(np.diff(times) < 0):
        raise BacktestError(f"{path}: rows are not in time order", path=str(path))
    columns, values, labels = [], [], {}
    for j, name in enumerate(header):
        if j == t_col:
            continue
        try:
            col = np.array([_number(r[j]) if j < len(r) else math.nan for r in data])
        except ValueError:
            continue  # a text column (a state name, say) is not a measurement
        if lower[j] in LABELS:
            labels[lower[j]] = np.nan_to_num(col).astype(np.int8)
        else:
            columns.append(name)
            values.append(col)
    if not columns:
        raise BacktestError(f"{path}: no numeric columns besides the time and the labels", path=str(path))
    return LabelledSeries(path, times, columns, np.column_stack(values), labels.get("anomaly"),
                          labels.get("changepoint"))


def points(series: LabelledSeries, thing_id: str, thing_type: str) -> pa.Table:
    """The series as stored points (the buffer's columns), numeric cells only."""
    rr, cc = np.nonzero(np.isfinite(series.values))
    return pa.table({"thing_id": pa.array([thing_id] * len(rr), pa.string()),
                     "type": pa.array([thing_type] * len(rr), pa.string()),
                     "feature": pa.array([FEATURE] * len(rr), pa.string()),
                     "path": pa.array([series.columns[c] for c in cc.tolist()], pa.string()),
                     "ts": pa.array(series.times[rr], pa.float64()),
                     "value": pa.array(series.values[rr, cc], pa.float64()),
                     "text": pa.array([None] * len(rr), pa.string())})


def train_on(series: LabelledSeries, thing_type: str, models_dir: Path) -> ModelBundle:
    """A model version trained on `series` with the project's training code, loaded and checked."""
    rows = feature_rows(points(series, f"backtest:{series.path.stem}", thing_type))
    with warnings.catch_warnings():  # a few hundred rows are fewer than one of the autoencoder's batches
        warnings.filterwarnings("ignore", message="Got `batch_size`", category=UserWarning)
        directory = train_model(rows, thing_type, models_dir)
    return ModelBundle(directory, thing_type)


def replay(bundle: ModelBundle, warmup: LabelledSeries, test: LabelledSeries, thing_id: str,
           settings: DetectSettings | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Replay `warmup` then `test` through a fresh DetectorCore, one tick per row; returns the combined
    score and whether an anomaly is open after each `test` row."""
    core = DetectorCore(load_rules(None), settings, {bundle.type: bundle})
    shift = 0.0
    if len(warmup) and len(test) and warmup.times[-1] >= test.times[0]:
        # a training file from another day: it ends one period before the test starts
        period = float(np.median(np.diff(test.times))) if len(test) > 1 else 1.0
        shift = test.times[0] - period - warmup.times[-1]
    scores = np.zeros(len(test))
    labels = np.zeros(len(test), dtype=np.int8)
    for part, offset, record in ((warmup, shift, False), (test, 0.0, True)):
        for i in range(len(part)):
            row = part.values[i]
            core.add(thing_id, bundle.type, FEATURE, float(part.times[i]) + offset,
                     [(c, float(v)) for c, v in zip(part.columns, row.tolist(), strict=True) if math.isfinite(v)])
            core.tick()
            if record:
                scores[i] = core.score(thing_id)
                labels[i] = core.active(thing_id) is not None
    return scores, labels


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def add(self, other: Counts) -> None:
        self.tp, self.fp, self.fn, self.tn = (self.tp + other.tp, self.fp + other.fp, self.fn + other.fn,
                                              self.tn + other.tn)

    @property
    def f1(self) -> float:
        d = self.tp + (self.fn + self.fp) / 2
        return self.tp / d if d else 0.0

    @property
    def far(self) -> float:
        return 100.0 * self.fp / (self.fp + self.tn) if self.fp + self.tn else 0.0

    @property
    def mar(self) -> float:
        return 100.0 * self.fn / (self.fn + self.tp) if self.fn + self.tp else 0.0


@dataclass
class FileResult:
    """One file's backtest: its confusion counts and event-wise figures."""

    name: str
    train_rows: int
    test_rows: int
    counts: Counts
    events: int
    found: int
    delays: list[float]
    changepoints: int
    alarms: int
    false_alarms: int
    normal_hours: float
    train_s: float
    replay_s: float
    readings: int

    def to_json(self) -> dict[str, Any]:
        c = self.counts
        return {"file": self.name, "train_rows": self.train_rows, "test_rows": self.test_rows,
                "tp": c.tp, "fp": c.fp, "fn": c.fn, "tn": c.tn, "f1": round(c.f1, 4), "far_pct": round(c.far, 2),
                "mar_pct": round(c.mar, 2), "events": self.events, "found": self.found,
                "delays_s": [round(d, 1) for d in self.delays], "changepoints": self.changepoints,
                "alarms": self.alarms, "false_alarms": self.false_alarms, "train_s": round(self.train_s, 2)}


@dataclass
class BacktestReport:
    """Every file's result and the pooled figures."""

    files: list[FileResult] = field(default_factory=list)
    normal: list[FileResult] = field(default_factory=list)  # files without an `anomaly` column: normal operation

    @property
    def counts(self) -> Counts:
        total = Counts()
        for f in self.files:
            total.add(f.counts)
        return total

    def _unlabelled(self) -> dict[str, Any] | None:
        """Files without labels, taken as normal operation: how often the detector alarms on them."""
        return _unlabelled_json(self.normal)

    def to_json(self) -> dict[str, Any]:
        c = self.counts
        delays = [d for f in self.files for d in f.delays]
        events = sum(f.events for f in self.files)
        changepoints = sum(f.changepoints for f in self.files)
        hours = sum(f.normal_hours for f in self.files)
        replay_s = sum(f.replay_s for f in self.files)
        return {
            "files": len(self.files), "test_rows": c.tp + c.fp + c.fn + c.tn,
            "f1": round(c.f1, 4), "far_pct": round(c.far, 2), "mar_pct": round(c.mar, 2),
            "tp": c.tp, "fp": c.fp, "fn": c.fn, "tn": c.tn,
            "events": events, "events_found": sum(f.found for f in self.files),
            "mean_detection_delay_s": round(float(np.mean(delays)), 1) if delays else None,
            "alarms_per_changepoint": round(sum(f.alarms for f in self.files) / changepoints, 2)
            if changepoints else None,
            "false_alarms_per_hour": round(sum(f.false_alarms for f in self.files) / hours, 2) if hours else None,
            "train_s_per_file": round(sum(f.train_s for f in self.files) / len(self.files), 2) if self.files else None,
            "readings_per_s": round(sum(f.readings for f in self.files) / replay_s) if replay_s else None,
            "per_file": [f.to_json() for f in self.files],
            "unlabelled": self._unlabelled(),
        }


def _unlabelled_json(files: list[FileResult]) -> dict[str, Any] | None:
    if not files:
        return None
    c = Counts()
    for f in files:
        c.add(f.counts)
    hours = sum(f.normal_hours for f in files)
    return {"files": [f.name for f in files], "test_rows": c.fp + c.tn, "far_pct": round(c.far, 2),
            "false_alarms_per_hour": round(sum(f.false_alarms for f in files) / hours, 2) if hours else None,
            "alarms": sum(f.alarms for f in files)}


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of ones."""
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))


def score_file(name: str, test: LabelledSeries, labels: np.ndarray, train_rows: int, train_s: float,
               replay_s: float, readings: int) -> FileResult:
    truth = test.anomaly.astype(bool) if test.anomaly is not None else np.zeros(len(test), dtype=bool)
    pred = labels.astype(bool)
    counts = Counts(int((pred & truth).sum()), int((pred & ~truth).sum()), int((~pred & truth).sum()),
                    int((~pred & ~truth).sum()))
    events = _runs(truth)
    delays = []
    for a, b in events:
        hit = np.flatnonzero(pred[a:b])
        if len(hit):
            delays.append(float(test.times[a + hit[0]] - test.times[a]))
    opened = [a for a, _b in _runs(pred)]
    period = float(np.median(np.diff(test.times))) if len(test) > 1 else 1.0
    changepoints = len(_runs(test.changepoint.astype(bool))) if test.changepoint is not None else len(events)
    return FileResult(name, train_rows, len(test), counts, len(events), len(delays), delays, changepoints,
                      len(opened), sum(1 for a in opened if not truth[a]), float((~truth).sum()) * period / 3600.0,
                      train_s, replay_s, readings)


def backtest_series(train: LabelledSeries, test: LabelledSeries, thing_type: str, *, name: str | None = None,
                    models_dir: Path | None = None) -> tuple[FileResult, np.ndarray, np.ndarray]:
    """Train on `train`, replay `train` then `test`; the file's result, its scores and its 0/1 labels."""
    with tempfile.TemporaryDirectory(prefix="egiz-backtest-") as tmp:
        t0 = time.perf_counter()
        bundle = train_on(train, thing_type, models_dir or Path(tmp))
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores, labels = replay(bundle, train, test, f"backtest:{test.path.stem}")
        replay_s = time.perf_counter() - t0
    readings = len(train) + len(test)
    result = score_file(name or test.path.name, test, labels, len(train), train_s, replay_s, readings)
    return result, scores, labels


def csv_files(directory: Path) -> list[Path]:
    """Every CSV under `directory` (recursively), in a stable order."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() == ".csv")


def backtest_directory(directory: Path, train_rows: int, thing_type: str = "equipment", *,
                       files: Sequence[Path] | None = None,
                       progress: Callable[[str], None] | None = None) -> BacktestReport:
    """Every CSV of `directory` is one Thing: its first `train_rows` rows train, the rest are replayed."""
    report = BacktestReport()
    paths = list(files) if files is not None else csv_files(directory)
    if not paths:
        raise BacktestError(f"no CSV files under {directory}", path=str(directory))
    for path in paths:
        if progress is not None:
            progress(path.name)
        series = read_series(path)
        if len(series) <= train_rows:
            raise BacktestError(f"{path}: {len(series)} rows, not more than --train-rows {train_rows}",
                                path=str(path))
        name = str(path.relative_to(directory)) if path.is_relative_to(directory) else path.name
        labelled = series.anomaly is not None
        if not labelled:  # normal operation throughout: scored apart, the pooled figures stay comparable
            series = replace(series, anomaly=np.zeros(len(series), dtype=np.int8))
        result, _scores, _labels = backtest_series(series.part(0, train_rows), series.part(train_rows), thing_type,
                                                   name=name)
        (report.files if labelled else report.normal).append(result)
    return report
