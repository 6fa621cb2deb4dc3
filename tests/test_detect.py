"""Detection without I/O: each rule kind, the statistics on known series, the ensemble's hysteresis,
scoring against ground truth, and the model registry (training, hot swap, rollback, corrupt files)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from gateway.detect.core import DetectorCore, DetectSettings
from gateway.detect.evaluate import Detection, Truth, score
from gateway.detect.models import ModelError, ModelRegistry
from gateway.detect.rules import RulesError, parse_rules
from gateway.detect.stats import StatsSettings, StatsTier
from gateway.detect.train import FeatureRows, train_model


def book(*rules: dict) -> object:
    return parse_rules({"rules": list(rules)})


def feed(core: DetectorCore, series: list[tuple[float, dict[str, float]]], *, thing: str = "s:oven-001",
         ttype: str = "oven", feature: str = "thermal") -> list:
    """Readings one per tick; every transition in order."""
    out = []
    for ts, values in series:
        core.add(thing, ttype, feature, ts, list(values.items()))
        out.extend(core.tick())
    return out


# ------------------------------------------------------------------------------------------ rules
def test_threshold_rule_relative_bound_and_hold_time() -> None:
    core = DetectorCore(book({"name": "hot", "kind": "threshold", "type": "oven", "feature": "thermal",
                              "property": "temperature_zones[*]", "above": "setpoint + 20", "for_s": 3,
                              "severity": "critical"}), DetectSettings(clear_s=5))
    ok = [(float(t), {"temperature_zones[1]": 200.0, "setpoint": 190.0}) for t in range(10)]
    hot = [(float(t), {"temperature_zones[1]": 215.0, "setpoint": 190.0}) for t in range(10, 20)]
    out = feed(core, ok + hot)
    assert [t.kind for t in out] == ["opened"]
    a = out[0].anomaly
    assert a.opened_at == 13.0  # held 3 s above the bound before it counted
    assert a.anomaly_type == "threshold" and a.severity == "critical"
    assert "zone 2 temperature" in a.explanation and "setpoint + 20" in a.explanation
    assert a.top_features[0]["property"] == "temperature_zones[1]"
    # with the setpoint raised, 215 is fine again: resolved after clear_s
    out = feed(core, [(float(t), {"temperature_zones[1]": 215.0, "setpoint": 200.0}) for t in range(20, 30)])
    assert [t.kind for t in out] == ["resolved"] and out[0].anomaly.resolved_at == 25.0


def test_range_rate_and_stuck_rules() -> None:
    rules = book(
        {"name": "probe", "kind": "range", "property": "t", "min": -20, "max": 400, "severity": "warning"},
        {"name": "jump", "kind": "rate", "property": "t", "max_per_s": 5, "severity": "warning"},
        {"name": "stuck", "kind": "stuck", "property": "t", "for_s": 10, "min_samples": 5, "severity": "info"},
    )
    kinds = []
    for series in (
        [(0.0, 100.0), (1.0, -127.0)],  # a DS18B20 read error
        [(0.0, 100.0), (1.0, 101.0), (2.0, 120.0)],  # 19 °C in one second
        [(float(t), 100.0 + (0.1 * t if t < 5 else 0.5)) for t in range(30)],  # flat from t=5
    ):
        core = DetectorCore(rules, DetectSettings())
        out = feed(core, [(ts, {"t": v}) for ts, v in series], ttype="x", feature="f")
        assert len(out) == 1, series
        kinds.append((out[0].anomaly.anomaly_type, out[0].anomaly.opened_at))
    assert kinds[0] == ("out_of_range", 1.0)
    assert kinds[1] == ("rate_of_change", 2.0)
    assert kinds[2] == ("stuck_value", 15.0)  # 10 s after the value stopped changing at t=5


@pytest.mark.parametrize("doc,needle", [
    ({"rules": [{"name": "a", "kind": "melt"}]}, "kind"),
    ({"rules": [{"name": "a", "kind": "threshold"}]}, "above"),
    ({"rules": [{"name": "a", "kind": "range", "min": 5, "max": 1}]}, "min must be below max"),
    ({"rules": [{"name": "a", "kind": "stuck", "for_s": 10, "min_samples": 1}]}, "min_samples"),
    ({"rules": [{"name": "a", "kind": "threshold", "above": "setpoint * 2"}]}, "PROPERTY - N"),
    ({"rules": [{"name": "a", "kind": "rate", "max_per_s": 1, "colour": "red"}]}, "colour"),
    ({"rules": [{"name": "a", "kind": "rate", "max_per_s": 1}, {"name": "a", "kind": "rate", "max_per_s": 2}]},
     "used twice"),
])
def test_bad_rules_are_refused_with_the_reason(doc: dict, needle: str) -> None:
    with pytest.raises(RulesError, match=needle):
        parse_rules(doc)


def test_built_in_rules_load() -> None:
    from gateway.detect.rules import load_rules

    rules = load_rules(None)
    assert {r.kind for r in rules.rules} == {"threshold", "range", "rate", "stuck"}


# ------------------------------------------------------------------------------------------ statistics
def test_statistics_warm_up_then_catch_a_step_and_a_slow_drift() -> None:
    rng = random.Random(1)
    tier = StatsTier(StatsSettings(warmup=120, learn=0))
    hits = [tier.update("t", "k", 50 + rng.gauss(0, 0.5))[0] for _ in range(600)]
    assert not any(h is not None and h.score >= 0.5 for h in hits), "no alert on plain noise"
    step = tier.update("t", "k", 50 + 6.0)[0]  # 12 sigma
    assert step is not None and step.score >= 0.9 and not step.chart and step.z > 8
    assert abs(step.usual - 50) < 0.3
    # a drift of 0.02 sigma per reading: the z-score never sees it, the control chart does
    tier = StatsTier(StatsSettings(warmup=120, learn=0))
    for _ in range(600):
        tier.update("t", "k", 50 + rng.gauss(0, 0.5))
    first = None
    for i in range(600):
        h = tier.update("t", "k", 50 + 0.01 * i + rng.gauss(0, 0.5))[0]
        if h is not None and h.score >= 0.5:
            first = (i, h)
            break
    assert first is not None, "the drift was never seen"
    i, h = first
    assert h.chart and abs(h.z) < 6 and i < 400


def test_sister_properties_moving_together_alert_before_any_one_alone() -> None:
    rng = random.Random(2)
    core = DetectorCore(book(), DetectSettings(stats=StatsSettings(warmup=100, learn=0, z_limit=6.0)))
    zones = [f"thermal/temperature_zones[{i}]" for i in range(3)]
    core.stats.calibrate("oven", zones, [6.0] * 3, [1.0] * 3, {"thermal/temperature_zones[*]": 6.0})
    for t in range(300):
        core.add("s:o-1", "oven", "thermal", float(t), [(f"temperature_zones[{i}]", 190 + rng.gauss(0, 0.3))
                                                        for i in range(3)])
        core.tick()
    # every zone 1.2 °C up (4 sigma each: none alone reaches 6), jointly 6.9 sigma
    core.add("s:o-1", "oven", "thermal", 300.0, [(f"temperature_zones[{i}]", 191.2) for i in range(3)])
    out = core.tick()
    assert [t.kind for t in out] == ["opened"]
    assert out[0].anomaly.anomaly_type == "statistical_deviation"


def test_without_a_model_each_property_learns_its_own_limits() -> None:
    rng = random.Random(3)
    tier = StatsTier(StatsSettings(warmup=100, learn=1000, z_limit=6.0))

    def reading(i: int, door: float) -> float:  # a cooler: quiet, but a door opening every 90 readings
        return 4.0 + rng.gauss(0, 0.08) + (door if i % 90 == 0 else 0.0)

    during = [tier.update("c", "climate/temperature", reading(i, 2.0))[0] for i in range(1100)]
    assert all(h is None for h in during), "nothing alerts while learning"
    after = [tier.update("c", "climate/temperature", reading(i, 2.0))[0] for i in range(1100, 2000)]
    assert not any(h is not None and h.score >= 0.5 for h in after), "door openings are normal here"
    worse = tier.update("c", "climate/temperature", 4.0 + 8.0)[0]
    assert worse is not None and worse.score >= 0.5


def test_no_alert_during_warm_up() -> None:
    tier = StatsTier(StatsSettings(warmup=50))
    assert all(tier.update("t", "k", v)[0] is None for v in [1.0] * 10 + [100.0] * 39)


def _reference(series: list[float], s: StatsSettings) -> list[tuple[float, float, float, float]]:
    """(z, chart deviation, rolling mean before, baseline before) of each reading of one property, from
    the definitions in docs/detect.md: exponentially weighted mean and variance over `span` readings (the
    plain average until that many), a λ = 0.2 EWMA chart against a baseline over `baseline_span`, both
    with a floor under the standard deviation, and outliers teaching at most 2 sd once warm."""
    lam = 0.2
    means, variances, bases, base_variances, charts = [series[0]], [0.0], [series[0]], [0.0], [series[0]]
    out = [(0.0, 0.0, 0.0, 0.0)]  # the first reading only starts the averages
    for k in range(1, len(series)):  # k readings came before this one
        x, mean, var, base, base_var = series[k], means[-1], variances[-1], bases[-1], base_variances[-1]
        w_fast, w_slow = max(2.0 / (s.span + 1), 1.0 / (k + 1)), max(2.0 / (s.baseline_span + 1), 1.0 / (k + 1))
        floor = 0.005 + 1e-4 * abs(base)
        sd, base_sd = max(math.sqrt(var), floor), max(math.sqrt(base_var), floor)
        warm = k >= s.warmup
        charts.append(charts[-1] + lam * (x - charts[-1]))
        z = (x - mean) / sd
        dev = (charts[-1] - base) / (s.chart_limit * base_sd * math.sqrt(lam / (2 - lam)))
        r = max(-2 * sd, min(2 * sd, x - mean)) if warm else x - mean
        rb = max(-2 * base_sd, min(2 * base_sd, x - base)) if warm else x - base
        means.append(mean + w_fast * r)
        variances.append((1 - w_fast) * (var + w_fast * r * r))
        bases.append(base + w_slow * rb)
        base_variances.append((1 - w_slow) * (base_var + w_slow * rb * rb))
        out.append((z, dev, mean, base) if warm else (0.0, 0.0, mean, base))
    return out


def _reference_hits(series: list[float], s: StatsSettings, limits: tuple[float, float] | None) -> dict[int, tuple]:
    """Reading index → (z, usual, score, chart) of every reading the statistics flag."""
    steps = _reference(series, s)
    hits = {}
    for i, (z, dev, mean, base) in enumerate(steps):
        if limits is None:  # learned: the worst seen over the learning readings, with a 1.5x margin
            if i < s.warmup + s.learn:
                continue
            learning = steps[s.warmup:s.warmup + s.learn]
            z_limit = max(s.z_limit, 1.5 * max([0.0] + [abs(step[0]) for step in learning]))
            chart_limit = max(1.0, 1.5 * max([0.0] + [abs(step[1]) for step in learning]))
        else:
            z_limit, chart_limit = limits
        score = 0.5 * max(abs(z) / z_limit, abs(dev) / chart_limit)
        if not score < 0.25:
            chart = abs(dev) / chart_limit > abs(z) / z_limit
            hits[i] = (z, base if chart else mean, min(1.0, score), chart)
    return hits


def test_statistics_of_a_tick_at_once_match_a_plain_reference() -> None:
    """Readings of many properties arrive interleaved, some several times in one tick, in ticks of every
    size (advanced as arrays, one by one, or both); every flagged reading — z, usual, score, which view —
    is the one the definitions give, property by property in order."""
    s = StatsSettings(span=20, baseline_span=80, warmup=30, learn=100, z_limit=4.0)
    rng = random.Random(7)
    tier = StatsTier(s)
    tier.calibrate("oven", ["f/calibrated", "f/always"], [5.0, 1e-9], [1.5, 1e-9])
    keys = ["f/learned", "f/calibrated", "f/always", "f/wild"]
    series: dict[tuple[str, str], list[float]] = {(f"o-{t}", k): [] for t in range(12) for k in keys}
    got: dict[tuple[str, str, int], tuple] = {}
    level = dict.fromkeys(series, 50.0)
    for _tick in range(700):
        for _ in range(rng.choice([1, 2, 5, 12, 40])):
            thing = f"o-{rng.randrange(12)}"
            for key in rng.sample(keys, rng.randint(1, 4)):
                prop = (thing, key)
                if rng.random() < 0.01:
                    level[prop] += rng.choice([-1, 1]) * rng.uniform(1, 4)  # a step
                x = level[prop] + rng.gauss(0, 0.5) + (rng.choice([-1, 1]) * 8 if rng.random() < 0.02 else 0.0)
                if key == "f/wild" and rng.random() < 0.03:
                    x = rng.choice([-1, 1]) * 1e200  # overflows the variance: inf and NaN as plain floats give them
                tier.add(prop, len(series[prop]), "oven", [tier.slot(thing, key, "oven")], [x])
                series[prop].append(x)
        for (thing, key), i, hit in tier.flush():
            assert hit.key == key and hit.value == series[(thing, key)][i]
            got[(thing, key, i)] = (hit.z, hit.usual, hit.score, hit.chart)
    limits = {"f/calibrated": (5.0, 1.5), "f/always": (1e-9, 1e-9)}
    want = {(thing, key, i): hit for (thing, key), xs in series.items()
            for i, hit in _reference_hits(xs, s, limits.get(key)).items()}
    assert got.keys() == want.keys()
    for k, (z, usual, flag, chart) in want.items():
        gz, gusual, gflag, gchart = got[k]
        assert gchart == chart, k
        for a, b in ((gz, z), (gusual, usual), (gflag, flag)):
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12, abs=1e-12), k
    flagged = {key: sum(1 for k in want if k[1] == key) for key in keys}
    assert flagged["f/always"] == sum(max(0, len(xs) - s.warmup) for (_t, k), xs in series.items() if k == "f/always")
    assert flagged["f/learned"] > 20 and flagged["f/calibrated"] > 20 and flagged["f/wild"] > 20


@pytest.mark.parametrize("rule_first", [False, True])
def test_a_rule_hit_in_the_same_tick_as_a_statistics_hit_dates_the_anomaly(rule_first: bool) -> None:
    """The statistics of a tick are judged at its end; the anomaly still starts when the rule was broken,
    whether the unusual reading came before or after it in the tick."""
    rng = random.Random(5)
    core = DetectorCore(book({"name": "hot", "kind": "threshold", "property": "t", "above": 100,
                              "severity": "warning"}), DetectSettings(stats=StatsSettings(warmup=50, learn=0)))
    for ts in range(200):
        core.add("s:x-1", "x", "f", float(ts), [("t", 50 + rng.gauss(0, 0.5)), ("u", 20 + rng.gauss(0, 0.5))])
        assert core.tick() == []
    spike, hot = ("f", [("u", 45.0)]), ("f", [("t", 150.0)])
    for ts, (feature, values) in enumerate([hot, spike] if rule_first else [spike, hot], start=300):
        core.add("s:x-1", "x", feature, float(ts), values)
    out = core.tick()
    assert [t.kind for t in out] == ["opened"]
    a = out[0].anomaly
    assert a.anomaly_type == "threshold" and a.tiers["statistics"] >= 0.5
    assert a.opened_at == (300.0 if rule_first else 301.0)


# ------------------------------------------------------------------------------------------ hysteresis
def test_one_fault_one_anomaly_and_operator_close_waits_for_clear() -> None:
    rules = book({"name": "hot", "kind": "threshold", "property": "t", "above": 100, "severity": "warning"})
    core = DetectorCore(rules, DetectSettings(clear_s=10))
    # a flapping fault: above, below, above ... for 40 s -> one anomaly
    flapping = [(float(t), {"t": 120.0 if t % 3 else 90.0}) for t in range(40)]
    out = feed(core, flapping, ttype="x", feature="f")
    assert [t.kind for t in out] == ["opened"]
    opened = out[0].anomaly
    out = feed(core, [(float(t), {"t": 90.0}) for t in range(40, 60)], ttype="x", feature="f")
    assert [t.kind for t in out] == ["resolved"] and out[0].anomaly.id == opened.id
    # an operator resolves a new one as a false positive while the value is still high: no reopening
    out = feed(core, [(60.0, {"t": 130.0})], ttype="x", feature="f")
    second = out[0].anomaly
    assert core.acknowledge(second.id, "op", "looking", 61.0).state == "acknowledged"
    closed = core.close(second.id, "op", "probe was being cleaned", True, 62.0)
    assert closed is not None and closed.false_positive and closed.state == "resolved"
    assert feed(core, [(float(t), {"t": 130.0}) for t in range(63, 80)], ttype="x", feature="f") == []
    assert feed(core, [(float(t), {"t": 90.0}) for t in range(80, 95)], ttype="x", feature="f") == []
    again = feed(core, [(95.0, {"t": 130.0})], ttype="x", feature="f")
    assert [t.kind for t in again] == ["opened"], "after the condition cleared, a new fault opens again"


# ------------------------------------------------------------------------------------------ scoring
def test_scoring_counts_events_windows_and_delays() -> None:
    truth = [Truth("a", "spike", 100, 200), Truth("b", "drift", 300, 400), Truth("a", "dropout", 500, 520)]
    dets = [Detection("a", 103, 150), Detection("a", 180, 190),  # two for one fault: both match
            Detection("b", 900, 950),  # a false alarm
            Detection("a", 530, 540)]  # right after a dropout: excused
    rep = score(truth, dets, things=["a", "b"], start=0, end=1200, window_s=60)
    assert rep.faults == 2 and rep.found == 1 and rep.recall == 0.5
    assert rep.anomalies == 3 and rep.matched == 2 and math.isclose(rep.precision, 2 / 3)
    assert rep.per_kind["spike"].delays == [3.0]
    assert rep.false_windows == 1 and rep.normal_windows > 20


# ------------------------------------------------------------------------------------------ models
def _rows(n: int = 3000, seed: int = 0, shift: float = 0.0) -> FeatureRows:
    rng = np.random.default_rng(seed)
    level = rng.uniform(80, 200, n)
    x = np.column_stack([level + rng.normal(0, 0.4, n), level + 2 + rng.normal(0, 0.4, n),
                         0.2 * level + rng.normal(0, 0.3, n) + shift])
    return FeatureRows(["thermal/a", "thermal/b", "electrical/p"], x, np.arange(n, dtype=float),
                       np.array(["s:m-1"] * n, dtype=object))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    root = tmp_path_factory.mktemp("models")
    v1 = train_model(_rows(seed=1), "machine", root, seed=1).name
    v2 = train_model(_rows(seed=2), "machine", root, seed=2).name
    return root, v1, v2


def test_trained_model_scores_relation_breaks_and_agrees_with_scikit_learn(trained: tuple[Path, str, str]) -> None:
    root, v1, _ = trained
    bundle = ModelRegistry(root).load("machine", v1)
    man = bundle.manifest
    assert man["agreement"]["autoencoder_max_abs_diff"] < 1e-3
    assert man["agreement"]["isolation_forest_max_abs_diff"] < 1e-3
    assert man["features"] == ["thermal/a", "thermal/b", "electrical/p"] and len(man["hash"]) == 64
    normal = _rows(500, seed=9).x
    broken = normal.copy()
    broken[:, 1] += 15  # zone b no longer follows zone a
    s_normal, s_broken = bundle.score(normal), bundle.score(broken)
    assert np.quantile(s_normal.score, 0.99) < 0.5
    assert np.median(s_broken.score) > 0.5
    assert np.argmax(np.abs(s_broken.residual_z).mean(axis=0)) == 1  # the autoencoder blames the right feature
    share = bundle.forest_attribution(broken[0])
    assert math.isclose(share.sum(), 1.0, rel_tol=1e-6)


def test_activation_rollback_and_refusal_of_corrupt_or_mismatched_models(trained: tuple[Path, str, str],
                                                                          tmp_path: Path) -> None:
    import shutil

    src, v1, v2 = trained
    root = tmp_path / "models"
    shutil.copytree(src, root)
    reg = ModelRegistry(root)
    reg.activate("machine", v1)
    reg.activate("machine", v2)
    assert reg.active_version("machine") == v2
    assert [v.active for v in reg.versions("machine")].count(True) == 1
    # corrupt: one flipped byte in the ONNX file
    bad = root / "machine" / "corrupt"
    shutil.copytree(root / "machine" / v1, bad)
    blob = bytearray((bad / "isolation_forest.onnx").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (bad / "isolation_forest.onnx").write_bytes(bytes(blob))
    with pytest.raises(ModelError, match="corrupt"):
        reg.activate("machine", "corrupt")
    assert reg.active_version("machine") == v2, "a refused model leaves the active one in force"
    # mismatched: a manifest edited to claim other features (its hash no longer matches)
    odd = root / "machine" / "mismatched"
    shutil.copytree(root / "machine" / v1, odd)
    man = json.loads((odd / "model.json").read_text())
    man["features"] = ["thermal/a", "thermal/b", "thermal/c"]
    (odd / "model.json").write_text(json.dumps(man))
    with pytest.raises(ModelError, match="hash"):
        reg.activate("machine", "mismatched")
    with pytest.raises(ModelError, match="not 'oven'"):
        reg.load("machine", v1).__class__(root / "machine" / v1, "oven")
    assert reg.rollback("machine").version == v1
    with pytest.raises(ModelError, match="no earlier model"):
        reg.rollback("machine")


def test_core_hot_swaps_models_between_ticks(trained: tuple[Path, str, str]) -> None:
    root, v1, v2 = trained
    reg = ModelRegistry(root)
    core = DetectorCore(book(), DetectSettings(), {"machine": reg.load("machine", v1)})
    row = _rows(1, seed=3).x[0]
    core.add("s:m-1", "machine", "thermal", 1.0, [("a", row[0]), ("b", row[1] + 20)])
    core.add("s:m-1", "machine", "electrical", 1.0, [("p", row[2])])
    out = core.tick()
    assert out and out[0].anomaly.model_version == v1 and out[0].anomaly.anomaly_type == "multivariate_pattern"
    assert "what its other readings predict" in out[0].anomaly.explanation
    core.set_model(reg.load("machine", v2))
    assert core.models["machine"].version == v2
