"""The detector scored against ground truth, the way a user does it, through the CLI: simulated
history with injected faults into a data directory, models trained on its normal first hours, the
last hour replayed and scored. The models never saw a fault: training history has none."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.helpers import EGIZ

START = datetime(2026, 11, 20, 4, 0, tzinfo=UTC).timestamp()  # night shift ends, production ramps up
TRAIN_S = 2 * 3600
EVAL_S = 3600
# offsets from START; kinds x types chosen so every kind appears on several machines
FAULTS = ",".join(f"{kind}:{node}@{TRAIN_S + at}+{dur}" for kind, node, at, dur in (
    ("spike", "oven-001", 300, 120), ("spike", "cooler-010", 600, 120), ("overtemperature", "oven-006", 600, 180),
    ("drift", "mixer-002", 900, 300), ("spike", "oven-006", 1200, 120), ("stuck", "conveyor-003", 1200, 120),
    ("phase_imbalance", "oven-001", 1500, 180), ("spike", "proofer-004", 1800, 120),
    ("overtemperature", "cooler-005", 2100, 180), ("overtemperature", "oven-001", 2200, 120),
    ("drift", "cooler-010", 2400, 300), ("stuck", "oven-006", 2700, 120), ("spike", "mixer-007", 3000, 120),
    ("overtemperature", "oven-001", 3300, 180), ("spike", "conveyor-008", 3300, 120),
    ("stuck", "proofer-009", 3600 - 300, 120),
))


def egiz(*args: str) -> str:
    done = subprocess.run([EGIZ, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.timeout(900)  # three CLI runs over 4 h of a 10-node line: a few minutes on two cores
def test_detector_finds_injected_faults_with_few_false_alarms(tmp_path: Path) -> None:
    data, truth = tmp_path / "data", tmp_path / "truth.jsonl"
    egiz("sim", "--site", "lab", "--into", str(data), "--start", str(START), "--duration", str(TRAIN_S + EVAL_S),
         "--nodes", "10", "--rate", "2", "--seed", "1", "--faults", FAULTS, "--truth", str(truth))
    assert len(truth.read_text().splitlines()) == 16
    trained = [json.loads(line) for line in egiz("model", "train", "--data-dir", str(data), "--from", str(START),
                                                 "--to", str(START + TRAIN_S), "--activate").splitlines()]
    assert sorted(t["type"] for t in trained) == ["conveyor", "cooler", "mixer", "oven", "proofer"]
    for t in trained:
        agreement = t["agreement"]
        assert agreement["autoencoder_max_abs_diff"] < 1e-3 and agreement["isolation_forest_max_abs_diff"] < 1e-3
    listed = egiz("model", "list", "--data-dir", str(data))
    assert listed.count("* ") == 5

    report = json.loads(egiz("model", "eval", "--data-dir", str(data), "--truth", str(truth), "--from",
                             str(START + TRAIN_S), "--to", str(START + TRAIN_S + EVAL_S), "--json"))
    print(json.dumps(report))  # the per-fault figures, for the record
    assert report["f1"] >= 0.95, report  # measured 0.97; real-data work must not cost the simulated line
    assert report["false_positive_rate"] <= 0.01, report
    per = report["per_fault"]
    assert set(per) == {"spike", "overtemperature", "drift", "stuck", "phase_imbalance"}
    assert per["spike"]["median_delay_s"] <= 5, per
    assert per["overtemperature"]["median_delay_s"] <= 5, per
    assert all(row["recall"] >= 0.75 for row in per.values()), per
