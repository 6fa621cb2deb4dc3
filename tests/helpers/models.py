"""Anomaly models of a test's own: feature rows of a two-sensor press, versions trained on them, the version a
detector uses, and a threshold rule over the ovens' zones."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gateway.detect.detector import AnomalyDetector
from gateway.detect.train import FeatureRows, train_model

ZONE_TOO_HOT_RULES = """
rules:
  - name: zone too hot
    kind: threshold
    type: oven
    feature: thermal
    property: "temperature_zones[*]"
    above: 250
    severity: critical
"""


def press_rows(seed: int, n: int = 1000) -> FeatureRows:
    """`n` readings of a press whose two temperatures move together over 80..200."""
    rng = np.random.default_rng(seed)
    level = rng.uniform(80, 200, n)
    x = np.column_stack([level + rng.normal(0, 0.4, n), level + 2 + rng.normal(0, 0.4, n)])
    return FeatureRows(["thermal/a", "thermal/b"], x, np.arange(n, dtype=float), np.array(["x:p-1"] * n, dtype=object))


def train_press_versions(root: Path, seeds: tuple[int, ...]) -> list[str]:
    """Versions of the `press` type trained under `root/press/`, one per seed, in order."""
    return [train_model(press_rows(seed), "press", root, seed=seed).name for seed in seeds]


def version_in_use(detector: AnomalyDetector, thing_type: str) -> str | None:
    """The model version `detector` scores `thing_type` with now (None: none loaded)."""
    bundle = detector.in_use.get(thing_type)
    return bundle.version if bundle is not None else None
