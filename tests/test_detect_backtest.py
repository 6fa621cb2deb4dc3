"""`egiz model backtest` on CSV files the tests write: a machine of eight correlated sensors at 1 Hz whose
first 400 rows train. A step, a spike and a drift are found; flat noise raises no alarm; the label
columns never reach the detector; a label never changes when later rows are appended (causality);
`egiz history import` puts the same file into a gateway's buffer."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import duckdb
import numpy as np
import pytest

from gateway.detect.backtest import FEATURE, read_series, replay, train_on
from gateway.detect.core import DetectorCore
from gateway.detect.rules import load_rules
from tests.helpers import EGIZ

START = 1_780_000_000.0
COLUMNS = ("vibration_1", "vibration_2", "current", "pressure", "temperature", "thermocouple", "voltage", "flow")
TRAIN = 400
ROWS = 1100


def machine(seed: int, rows: int = ROWS) -> np.ndarray:
    """Normal operation: shared load swings, sensor noise, quantised flow, a slowly warming motor."""
    rng = np.random.default_rng(seed)
    load = np.convolve(rng.normal(size=rows + 30), np.ones(30) / 30, mode="valid")[:rows]
    t = np.arange(rows)
    x = np.column_stack([
        0.027 + 0.0004 * rng.normal(size=rows),
        0.040 + 0.0006 * rng.normal(size=rows),
        0.9 + 0.25 * load + 0.2 * rng.normal(size=rows),
        0.06 + 0.3 * rng.normal(size=rows),
        70 + 4 * (1 - np.exp(-t / 900)) + 0.05 * rng.normal(size=rows),  # warming up through the whole run
        25.5 + 0.02 * rng.normal(size=rows),
        230 + 8 * rng.normal(size=rows),
        np.round(32 + 0.3 * load + 0.3 * rng.normal(size=rows)),
    ])
    return x


def write(path: Path, x: np.ndarray, anomaly: np.ndarray | None = None, sep: str = ";", iso: bool = True) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=sep)
        w.writerow(["datetime", *COLUMNS, *(["anomaly", "changepoint"] if anomaly is not None else [])])
        for i, row in enumerate(x):
            ts = START + i
            when = np.datetime_as_string(np.datetime64(int(ts), "s")).replace("T", " ") if iso else repr(ts)
            extra = []
            if anomaly is not None:
                extra = [f"{anomaly[i]:.1f}", "1.0" if i and anomaly[i] != anomaly[i - 1] else "0.0"]
            w.writerow([when, *(f"{v:.6g}" for v in row), *extra])
    return path


def egiz(*args: str) -> str:
    done = subprocess.run([EGIZ, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def faults(tmp_path: Path) -> Path:
    """Three runs of the machine, each with one fault in its test part (rows 600..800), and one without."""
    d = tmp_path / "runs"
    (d / "line-2").mkdir(parents=True)
    label = np.zeros(ROWS)
    label[600:800] = 1
    step = machine(1)
    step[600:800, 7] -= 3  # the valve closes: flow drops by about ten of its standard deviations
    write(d / "step.csv", step, label)
    spike = machine(2)
    spike[600:800:4, 2] += 6  # a sticking bearing: current spikes every few seconds
    write(d / "spike.csv", spike, label, sep=",")
    drift = machine(3)
    drift[600:800, 3] += np.linspace(0, 3, 200)  # pressure builds up
    write(d / "line-2" / "drift.csv", drift, label, iso=False)
    write(d / "quiet.csv", machine(4), np.zeros(ROWS))
    return d


@pytest.mark.timeout(600)
def test_backtest_of_a_directory_finds_step_spike_and_drift_and_stays_quiet_on_noise(tmp_path: Path) -> None:
    d = faults(tmp_path)
    out = tmp_path / "report.json"
    text = egiz("model", "backtest", str(d), "--train-rows", str(TRAIN), "--json", str(out))
    report = json.loads(out.read_text())
    assert f"F1 {report['f1']:.3f}" in text and "false alarms per hour" in text
    per = {r["file"]: r for r in report["per_file"]}
    assert set(per) == {"step.csv", "spike.csv", "line-2/drift.csv", "quiet.csv"}
    for name in ("step.csv", "spike.csv", "line-2/drift.csv"):
        row = per[name]
        assert row["found"] == 1, row
        assert row["delays_s"][0] <= 60, row
        assert row["mar_pct"] <= 40, row
        assert row["far_pct"] <= 12, row  # closes again once the machine is back to normal (detect.clear_s)
    assert per["quiet.csv"]["fp"] == 0 and per["quiet.csv"]["alarms"] == 0, per["quiet.csv"]
    assert report["f1"] >= 0.75 and report["far_pct"] <= 8, report
    c = report
    assert c["tp"] + c["fp"] + c["fn"] + c["tn"] == 4 * (ROWS - TRAIN)


@pytest.mark.timeout(600)
def test_backtest_labels_are_causal_and_labels_are_never_inputs(tmp_path: Path) -> None:
    x = machine(5)
    x[650:750, 7] -= 3
    label = np.zeros(ROWS)
    label[650:750] = 1
    train = write(tmp_path / "train.csv", x[:TRAIN], label[:TRAIN])
    test = write(tmp_path / "test.csv", x, label)
    out = tmp_path / "labels.csv"
    egiz("model", "backtest", "--train", str(train), "--test", str(test), "--out", str(out))
    lines = out.read_text().splitlines()
    assert lines[0] == "time,score,anomaly" and len(lines) == ROWS + 1
    got = np.array([int(line.split(",")[2]) for line in lines[1:]])
    assert got[650:760].mean() > 0.6 and got[TRAIN:640].sum() == 0 and got[800:].sum() == 0

    # the label columns turned upside down: the detector's output does not move
    flipped = read_series(write(tmp_path / "flipped.csv", x, 1 - label))
    assert flipped.columns == list(COLUMNS)
    bundle = train_on(read_series(train), "pump", tmp_path / "models")
    warmup = read_series(train)
    scores, labels = replay(bundle, warmup, read_series(test), "lab:pump")
    scores_flipped, labels_flipped = replay(bundle, warmup, flipped, "lab:pump")
    assert np.array_equal(labels, labels_flipped) and np.allclose(scores, scores_flipped)
    assert np.array_equal(labels, got)

    # the same version in the gateway's detector: one anomaly, explained in words by the property that left
    core = DetectorCore(load_rules(None), None, {bundle.type: bundle})
    opened = []
    whole = read_series(test)  # the training rows and what follows, in one stream as a gateway sees them
    for ts, row in zip(whole.times.tolist(), whole.values.tolist(), strict=True):
        core.add("lab:pump", "pump", FEATURE, ts, list(zip(COLUMNS, row, strict=True)))
        opened += [tr.anomaly for tr in core.tick() if tr.kind == "opened"]
    assert len(opened) == 1, [a.explanation for a in opened]
    a = opened[0]
    assert a.anomaly_type == "operating_profile" and 650 <= a.opened_at - START <= 700, a
    assert a.explanation.startswith("flow ") and " below its normal operation" in a.explanation, a.explanation
    assert a.top_features[0]["property"] == "flow" and a.top_features[0]["share"] > 0.5, a.top_features

    # online: the rows up to 700 get the same labels whether or not the rest of the file follows
    cut = read_series(write(tmp_path / "cut.csv", x[:700], label[:700]))
    scores_cut, labels_cut = replay(bundle, warmup, cut, "lab:pump")
    assert np.array_equal(labels_cut, labels[:700]) and np.allclose(scores_cut, scores[:700])


def test_history_import_puts_the_readings_into_the_buffer(tmp_path: Path) -> None:
    x = machine(6, rows=50)
    path = write(tmp_path / "pump.csv", x, np.zeros(50), sep=",")
    data = tmp_path / "data"
    doc = json.loads(egiz("history", "import", str(path), "--thing", "lab:pump-1", "--type", "pump",
                          "--data-dir", str(data)))
    assert doc == {"thing": "lab:pump-1", "type": "pump", "readings": 50}
    con = duckdb.connect(str(data / "buffer.duckdb"), read_only=True)
    try:
        paths = {r[0] for r in con.execute("SELECT DISTINCT s.path FROM points p JOIN series s ON p.series = s.id "
                                           "WHERE s.thing_id = 'lab:pump-1'").fetchall()}
        n = con.execute("SELECT count(*) FROM points").fetchone()
    finally:
        con.close()
    assert paths == set(COLUMNS)  # the labels stayed out
    assert n is not None and n[0] == 50 * len(COLUMNS)


def test_backtest_refuses_unusable_files_with_a_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("datetime;flow\nyesterday;3\n", encoding="utf-8")
    done = subprocess.run([EGIZ, "model", "backtest", "--train", str(bad), "--test", str(bad), "--out",
                           str(tmp_path / "o.csv")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "neither ISO 8601 nor epoch seconds" in done.stderr
    done = subprocess.run([EGIZ, "model", "backtest", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--train-rows" in done.stderr
