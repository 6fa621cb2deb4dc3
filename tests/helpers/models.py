"""Anomaly models of a test's own: feature rows of a two-sensor press, and versions trained on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gateway.detect.train import FeatureRows, train_model


def press_rows(seed: int, n: int = 1000) -> FeatureRows:
    """`n` readings of a press whose two temperatures move together over 80..200."""
    rng = np.random.default_rng(seed)
    level = rng.uniform(80, 200, n)
    x = np.column_stack([level + rng.normal(0, 0.4, n), level + 2 + rng.normal(0, 0.4, n)])
    return FeatureRows(["thermal/a", "thermal/b"], x, np.arange(n, dtype=float), np.array(["x:p-1"] * n, dtype=object))


def train_press_versions(root: Path, seeds: tuple[int, ...]) -> list[str]:
    """Versions of the `press` type trained under `root/press/`, one per seed, in order."""
    return [train_model(press_rows(seed), "press", root, seed=seed).name for seed in seeds]
