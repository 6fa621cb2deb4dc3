"""Detection on real recordings: prints one JSON line per figure (DESIGN.md: FAR <= 10 %, MAR <= 25 %, F1 >= 0.80).

Runs the backtest `egiz model backtest DIR --train-rows 400` runs (the same code, so the same figures)
on the pump recordings of `../shared/data/skab-valve1` relative to the repository root, with the
protocol of that data set's README: per file the first 400 rows train, the rest are labelled online;
one confusion matrix pooled over every test row of every labelled file.

    python bench/detect_real.py [--data DIR] [--train-rows 400]

The directory may also be given as the environment variable EGIZ_BENCH_REAL_DATA. The recordings are
not part of the project (their licence forbids copying them in); without them the benchmark says so
and exits 0 without figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

from gateway.detect.backtest import backtest_directory

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT.parent / "shared" / "data" / "skab-valve1"


def emit(name: str, value: object, unit: str = "", **extra: object) -> None:
    print(json.dumps({"bench": "detect_real", "figure": name, "value": value, "unit": unit, **extra}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("EGIZ_BENCH_REAL_DATA", DEFAULT)),
                        help="directory of labelled CSV recordings (default ../shared/data/skab-valve1)")
    parser.add_argument("--train-rows", type=int, default=400)
    args = parser.parse_args()
    if not args.data.is_dir():
        print(json.dumps({"bench": "detect_real", "skipped": f"no recordings at {args.data}: the real-data "
                          "benchmark needs the SKAB valve1 files there (or --data / EGIZ_BENCH_REAL_DATA)"}))
        return 0
    warnings.filterwarnings("ignore", module="sklearn")  # tiny training sets make scikit-learn chatty
    t0 = time.perf_counter()
    report = backtest_directory(args.data, args.train_rows,
                                progress=lambda name: print(f"{name} ...", file=sys.stderr, flush=True))
    doc = report.to_json()
    emit("f1", doc["f1"], target=">= 0.80")
    emit("false_alarm_rate", doc["far_pct"], "%", target="<= 10")
    emit("missed_alarm_rate", doc["mar_pct"], "%", target="<= 25")
    emit("events_found", doc["events_found"], of=doc["events"])
    emit("mean_detection_delay", doc["mean_detection_delay_s"], "s")
    emit("false_alarms_per_hour", doc["false_alarms_per_hour"], "1/h")
    emit("alarms_per_changepoint", doc["alarms_per_changepoint"])
    emit("training_per_file", doc["train_s_per_file"], "s")
    emit("detector_readings_per_s", doc["readings_per_s"], "readings/s")
    normal = doc["unlabelled"]
    if normal is not None:  # a long recording of normal operation, trained on its first rows as well
        emit("false_alarm_rate_unlabelled_normal_runs", normal["far_pct"], "%", files=normal["files"],
             rows=normal["test_rows"], false_alarms_per_hour=normal["false_alarms_per_hour"])
    emit("wall_time", round(time.perf_counter() - t0, 1), "s", files=doc["files"], test_rows=doc["test_rows"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
