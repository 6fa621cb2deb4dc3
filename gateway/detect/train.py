"""Training a model version from stored history (extra `train`: scikit-learn, skl2onnx, onnx).

Feature rows are the Thing's live state at each reading — every numeric property of its type, the
last value of each carried forward, as the detector sees it — built column-wise with numpy. Only
normal periods train: the intervals of anomalies that operators did not mark as false positives
(and of any ground-truth faults given) are cut out. The ONNX files are checked against scikit-learn
on a sample before the version is written; a disagreement fails the training.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from gateway.common.timefmt import iso_seconds
from gateway.detect.models import (
    AE_FILE,
    FORMAT,
    IF_FILE,
    MANIFEST,
    SHORT_HISTORY_ROWS,
    ModelError,
    file_sha256,
    model_hash,
)
from gateway.detect.profile import Profile, fit_profile
from gateway.detect.rules import glob_match
from gateway.detect.stats import VECTOR_MIN, StatArrays, StatsSettings, group_of

log = logging.getLogger(__name__)

AGREEMENT_TOLERANCE = 1e-3  # ONNX runs in float32; scikit-learn in float64
MAX_TRAIN_ROWS = 40_000
Interval = tuple[str, float, float]  # thing id, start, end


@dataclass(frozen=True)
class FeatureRows:
    keys: list[str]
    x: np.ndarray  # (n, d)
    ts: np.ndarray  # (n,)
    things: np.ndarray  # (n,) thing ids


def feature_rows(points: pa.Table, *, ignore: Sequence[str] = ("*setpoint*",), keys: list[str] | None = None,
                 exclude: Sequence[Interval] = (), min_share: float = 0.9) -> FeatureRows:
    """Rows of the live state of every Thing in `points` (columns thing_id, feature, path, ts, value)."""
    cols = {name: points.column(name).to_numpy(zero_copy_only=False) for name in ("thing_id", "feature", "path",
                                                                                   "ts", "value")}
    value = cols["value"].astype(np.float64)
    numeric = np.isfinite(value)
    thing = cols["thing_id"][numeric]
    key_col = np.char.add(np.char.add(cols["feature"][numeric].astype(str), "/"), cols["path"][numeric].astype(str))
    ts, value = cols["ts"][numeric].astype(np.float64), value[numeric]
    things = sorted(set(thing.tolist()))
    if keys is None:
        seen: dict[str, int] = {}
        for tid in things:
            for k in set(key_col[thing == tid].tolist()):
                seen[k] = seen.get(k, 0) + 1
        keys = sorted(k for k, n in seen.items() if n >= min_share * len(things)
                      and not any(glob_match(p, k.split("/", 1)[1]) for p in ignore))
    out_x, out_ts, out_th = [], [], []
    for tid in things:
        mask = thing == tid
        t_ts, t_key, t_val = ts[mask], key_col[mask], value[mask]
        grid = np.unique(t_ts)
        block = np.full((len(grid), len(keys)), np.nan)
        for j, k in enumerate(keys):
            m = t_key == k
            if not m.any():
                continue
            order = np.argsort(t_ts[m], kind="stable")
            k_ts, k_val = t_ts[m][order], t_val[m][order]
            idx = np.searchsorted(k_ts, grid, side="right") - 1
            block[:, j] = np.where(idx >= 0, k_val[np.clip(idx, 0, None)], np.nan)
        keep = np.isfinite(block).all(axis=1)
        for ex_tid, a, b in exclude:
            if ex_tid == tid:
                keep &= ~((grid >= a) & (grid <= b))
        out_x.append(block[keep])
        out_ts.append(grid[keep])
        out_th.append(np.full(int(keep.sum()), tid, dtype=object))
    if not out_x:
        return FeatureRows(keys, np.empty((0, len(keys))), np.empty(0), np.empty(0, dtype=object))
    return FeatureRows(keys, np.concatenate(out_x), np.concatenate(out_ts), np.concatenate(out_th))


def _threshold(scores: np.ndarray) -> tuple[float, float]:
    """(threshold, median) from scores of held-out normal rows: half the spread above the worst."""
    med = float(np.median(scores))
    worst = float(np.max(scores))
    return worst + 0.5 * (worst - med), med


def calibrate_statistics(rows: FeatureRows, settings: StatsSettings | None = None,
                         margin: float = 1.25) -> tuple[list[float], list[float], dict[str, float]]:
    """Limits of the statistics tier from normal history (after warm-up), with a margin and never tighter
    than half the defaults: per property the worst |z| and chart deviation, per group of sister
    properties (zones, phases) the worst joint z."""
    s = settings or StatsSettings()
    d = len(rows.keys)
    worst_z, worst_c = np.zeros(d), np.zeros(d)
    members: dict[str, list[int]] = {}
    for j, key in enumerate(rows.keys):
        g = group_of(key)
        if g is not None:
            members.setdefault(g, []).append(j)
    groups = {g: np.array(js) for g, js in members.items() if len(js) > 1}
    worst_g = dict.fromkeys(groups, 0.0)
    blocks = []
    for tid in sorted(set(rows.things.tolist())):
        mask = rows.things == tid
        blocks.append(rows.x[mask][np.argsort(rows.ts[mask], kind="stable")])
    lengths = np.array([len(b) for b in blocks], dtype=np.intp)
    stats = StatArrays(s, len(blocks) * d)
    zs = np.zeros((len(blocks), int(lengths.max(initial=0)), d))
    columns = np.arange(d)

    def worse(worst: np.ndarray, dev: np.ndarray) -> np.ndarray:
        """The larger of `worst` and each column's largest |deviation|; NaN never counts as worse."""
        most = np.fmax.reduce(np.abs(dev), axis=0)
        return np.where(most > worst, most, worst)

    # Many Things: their statistics advance together, a row of each a step, as the live detector's in a tick.
    with np.errstate(all="ignore"):  # a property whose statistics overflow gets inf/NaN, as the detector's do
        if len(blocks) * d < VECTOR_MIN:  # too few properties for arrays to pay: each Thing's rows as plain floats
            for k, block in enumerate(blocks):
                steps = stats.step_many((k * d + columns).tolist() * len(block), block.ravel().tolist())
                z_dev = np.array([st[:2] for st in steps]).reshape(len(block), d, 2)
                zs[k, :len(block)] = z_dev[:, :, 0]
                worst_c = worse(worst_c, z_dev[:, :, 1])
        else:
            for i in range(zs.shape[1]):
                live = np.flatnonzero(lengths > i)
                step = stats.step((live[:, None] * d + columns).ravel(), np.concatenate([blocks[k][i] for k in live]))
                zs[live, i] = step.z.reshape(len(live), d)
                worst_c = worse(worst_c, step.dev.reshape(len(live), d))
    for k, n in enumerate(lengths.tolist()):
        z = zs[k, :n]
        worst_z = np.maximum(worst_z, np.abs(z).max(axis=0, initial=0.0))
        for g, js in groups.items():
            joint = np.abs(z[:, js].sum(axis=1)) / np.sqrt(len(js))
            worst_g[g] = max(worst_g[g], float(joint.max(initial=0.0)))
    z_lim = np.maximum(worst_z * margin, s.z_limit / 2)
    c_lim = np.maximum(worst_c * margin, 0.5)
    g_lim = {g: round(max(w * margin, s.z_limit / 2), 3) for g, w in worst_g.items()}
    return z_lim.round(3).tolist(), c_lim.round(3).tolist(), g_lim


def train_profile(rows: FeatureRows) -> Profile | None:
    """The operating profile from each Thing's rows in time order (see `gateway.detect.profile`); None when
    no Thing has enough rows for one."""
    blocks, gaps = [], []
    for tid in sorted(set(rows.things.tolist())):
        mask = rows.things == tid
        order = np.argsort(rows.ts[mask], kind="stable")
        blocks.append(rows.x[mask][order])
        gaps.append(np.diff(rows.ts[mask][order]))
    dt = np.concatenate(gaps) if gaps else np.empty(0)
    dt = dt[dt > 0]
    short = max((len(b) for b in blocks), default=0) < SHORT_HISTORY_ROWS
    try:
        return fit_profile(blocks, float(np.median(dt)) if len(dt) else 1.0, decides=short)
    except ValueError as exc:
        log.warning("no operating profile", extra={"reason": str(exc)})
        return None


def train_model(rows: FeatureRows, thing_type: str, out_root: Path, *, seed: int = 0,
                progress: Callable[[str], None] | None = None) -> Path:
    """Train, export, check and write one version under `out_root/{type}/{version}/`; returns its directory."""
    import onnxruntime as ort
    from onnx import numpy_helper
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.ensemble import IsolationForest
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPRegressor

    say = progress or (lambda _msg: None)
    n, d = rows.x.shape
    if n < 200:
        raise ModelError(f"only {n} rows of normal {thing_type!r} data; training needs at least 200", type=thing_type)
    mean = rows.x.mean(axis=0)
    std = rows.x.std(axis=0)
    usable = std > 1e-9 * np.maximum(1.0, np.abs(mean))
    if not usable.all():  # a constant column carries no information and would divide by zero
        rows = FeatureRows([k for k, u in zip(rows.keys, usable, strict=True) if u], rows.x[:, usable], rows.ts,
                           rows.things)
        mean, std = mean[usable], std[usable]
        n, d = rows.x.shape
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)[: min(n, MAX_TRAIN_ROWS + MAX_TRAIN_ROWS // 4)]
    split = int(len(order) * 0.8)
    xs = ((rows.x - mean) / std).astype(np.float32)
    train, hold = xs[order[:split]], xs[order[split:]]
    say(f"training the autoencoder on {len(train)} rows x {d} features")
    hidden = max(8, 2 * d)
    ae = MLPRegressor(hidden_layer_sizes=(hidden, max(2, d // 2), hidden), activation="tanh", max_iter=200,
                      batch_size=512, learning_rate_init=0.003, early_stopping=True, random_state=seed, tol=1e-5,
                      n_iter_no_change=15)
    with warnings.catch_warnings():  # hitting max_iter is expected; the residuals below say how well it fits
        warnings.simplefilter("ignore", ConvergenceWarning)
        ae.fit(train, train)
    resid = ae.predict(hold) - hold
    resid_std = np.maximum(resid.std(axis=0), 1e-3)
    ae_scores = np.sqrt(np.mean((resid / resid_std) ** 2, axis=1))
    say(f"training the Isolation Forest on {len(train)} rows")
    forest = IsolationForest(n_estimators=100, max_samples=256, random_state=seed).fit(train)
    if_scores = -forest.decision_function(hold)
    say("calibrating the statistics on the same history")
    z_limits, chart_limits, group_limits = calibrate_statistics(rows)
    say("fitting the operating profile")
    profile = train_profile(rows)
    version = f"{thing_type}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-{rng.integers(1 << 24):06x}"
    meta = {"egiz.type": thing_type, "egiz.version": version, "egiz.features": json.dumps(rows.keys)}
    ae_onnx = to_onnx(ae, train[:1], target_opset=17, final_types=[("reconstruction", FloatTensorType([None, d]))])
    for init in ae_onnx.graph.initializer:  # skl2onnx reshapes regressor output to one column; we have d
        if init.name == "shape_tensor":
            init.CopyFrom(numpy_helper.from_array(np.array([-1, d], dtype=np.int64), "shape_tensor"))
    if_onnx = forest_to_onnx(forest, d)
    for model in (ae_onnx, if_onnx):
        for k, v in meta.items():
            model.metadata_props.add(key=k, value=v)
    sample = hold[: min(1000, len(hold))]
    ae_sess = ort.InferenceSession(ae_onnx.SerializeToString(), providers=["CPUExecutionProvider"])
    if_sess = ort.InferenceSession(if_onnx.SerializeToString(), providers=["CPUExecutionProvider"])
    ae_diff = float(np.abs(ae_sess.run(None, {ae_sess.get_inputs()[0].name: sample})[0].reshape(sample.shape)
                           - ae.predict(sample)).max())
    if_diff = float(np.abs(if_sess.run(None, {if_sess.get_inputs()[0].name: sample})[1].ravel()
                           - forest.decision_function(sample)).max())
    if max(ae_diff, if_diff) > AGREEMENT_TOLERANCE:
        raise ModelError(f"ONNX and scikit-learn disagree (autoencoder {ae_diff:.2e}, forest {if_diff:.2e})",
                         type=thing_type)
    directory = out_root / thing_type / version
    directory.mkdir(parents=True)
    (directory / AE_FILE).write_bytes(ae_onnx.SerializeToString())
    (directory / IF_FILE).write_bytes(if_onnx.SerializeToString())
    ae_thr, ae_med = _threshold(ae_scores)
    if_thr, if_med = _threshold(if_scores)
    manifest: dict[str, Any] = {
        "format": FORMAT, "type": thing_type, "version": version, "created": iso_seconds(time.time()),
        "data": {"from": iso_seconds(float(rows.ts.min())), "to": iso_seconds(float(rows.ts.max())), "rows": int(n),
                 "things": sorted(set(rows.things.tolist()))},
        "features": rows.keys, "scaling": {"mean": mean.tolist(), "std": std.tolist()},
        "statistics": {"z_limit": z_limits, "chart_limit": chart_limits, "groups": group_limits},
        **({"profile": profile.to_json()} if profile is not None else {}),
        "autoencoder": {"file": AE_FILE, "sha256": file_sha256(directory / AE_FILE),
                        "residual_std": resid_std.astype(float).tolist(), "threshold": ae_thr, "median": ae_med},
        "isolation_forest": {"file": IF_FILE, "sha256": file_sha256(directory / IF_FILE), "threshold": if_thr,
                             "median": if_med},
        "agreement": {"autoencoder_max_abs_diff": ae_diff, "isolation_forest_max_abs_diff": if_diff,
                      "rows": len(sample)},
    }
    manifest["hash"] = model_hash(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    log.info("model trained", extra={"type": thing_type, "version": version, "rows": n, "features": d})
    return directory


def forest_to_onnx(forest: Any, d: int) -> Any:
    """The Isolation Forest as one ONNX TreeEnsembleRegressor: each leaf holds its path length (depth
    plus the expected length of the subtree it cut off, as scikit-learn computes it), summed over the
    trees, then turned into `decision_function`. skl2onnx's converter builds a graph of several
    thousand nodes (about 2 ms per run, whatever the batch); this runs in tens of microseconds.
    Outputs as skl2onnx's: `label` (1 normal, -1 outlier) and `scores` (n, 1)."""
    import onnx
    from onnx import TensorProto, helper
    from sklearn.ensemble._iforest import _average_path_length

    attrs: dict[str, Any] = {k: [] for k in (
        "nodes_treeids", "nodes_nodeids", "nodes_featureids", "nodes_values", "nodes_modes", "nodes_truenodeids",
        "nodes_falsenodeids", "target_ids", "target_nodeids", "target_treeids", "target_weights")}
    for t, (est, feats) in enumerate(zip(forest.estimators_, forest.estimators_features_, strict=True)):
        tree = est.tree_
        path = tree.compute_node_depths() + _average_path_length(tree.n_node_samples) - 1.0
        for node in range(tree.node_count):
            left, right = int(tree.children_left[node]), int(tree.children_right[node])
            leaf = left == -1
            threshold = np.float32(tree.threshold[node])
            if threshold > tree.threshold[node]:  # the largest float32 <= the threshold decides as float64 does
                threshold = np.nextafter(threshold, np.float32(-np.inf))
            attrs["nodes_treeids"].append(t)
            attrs["nodes_nodeids"].append(node)
            attrs["nodes_featureids"].append(0 if leaf else int(feats[tree.feature[node]]))
            attrs["nodes_values"].append(0.0 if leaf else float(threshold))
            attrs["nodes_modes"].append("LEAF" if leaf else "BRANCH_LEQ")
            attrs["nodes_truenodeids"].append(0 if leaf else left)
            attrs["nodes_falsenodeids"].append(0 if leaf else right)
            if leaf:
                attrs["target_ids"].append(0)
                attrs["target_nodeids"].append(node)
                attrs["target_treeids"].append(t)
                attrs["target_weights"].append(float(path[node]))
    denominator = len(forest.estimators_) * float(_average_path_length([forest._max_samples])[0])
    nodes = [
        helper.make_node("TreeEnsembleRegressor", ["X"], ["path"], domain="ai.onnx.ml", n_targets=1,
                         aggregate_function="SUM", post_transform="NONE", **attrs),
        helper.make_node("Mul", ["path", "neg_inv_denominator"], ["exponent"]),
        helper.make_node("Pow", ["two", "exponent"], ["anomaly"]),
        helper.make_node("Neg", ["anomaly"], ["score_samples"]),
        helper.make_node("Sub", ["score_samples", "offset"], ["scores"]),
        helper.make_node("Less", ["scores", "zero"], ["outlier"]),
        helper.make_node("Where", ["outlier", "minus_one", "one"], ["label_column"]),
        helper.make_node("Reshape", ["label_column", "flat"], ["label"]),
    ]
    constants = [
        helper.make_tensor("neg_inv_denominator", TensorProto.FLOAT, [], [-1.0 / denominator]),
        helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
        helper.make_tensor("offset", TensorProto.FLOAT, [], [float(forest.offset_)]),
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("minus_one", TensorProto.INT64, [], [-1]),
        helper.make_tensor("one", TensorProto.INT64, [], [1]),
        helper.make_tensor("flat", TensorProto.INT64, [1], [-1]),
    ]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, d])]
    outputs = [helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
               helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, 1])]
    graph = helper.make_graph(nodes, "isolation_forest", inputs, outputs, constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    onnx.checker.check_model(model)
    return model
