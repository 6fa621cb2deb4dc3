"""Tier 3: ONNX models per equipment type, and the registry of model versions on disk.

A model version is a directory `models/{type}/{version}/` holding `model.json` (features, scaling,
thresholds, data range, file hashes) and two ONNX files: an autoencoder (reconstruction error per
feature) and an Isolation Forest. `models/{type}/active.json` names the version in force and the
ones before it, so activation and rollback are one atomic file replace that a running gateway picks
up without a restart. A version is loaded and checked completely before it may become active; a
corrupt or mismatched one is refused with the reason and whatever was active stays active.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnxruntime as ort

from gateway.common.errors import Conflict, EgizError, NotFound
from gateway.detect.profile import Profile

log = logging.getLogger(__name__)

FORMAT = 1
AE_FILE = "autoencoder.onnx"
IF_FILE = "isolation_forest.onnx"
MANIFEST = "model.json"
ACTIVE = "active.json"
# Fewer training rows per Thing than this is a short history, decided by the operating profile alone: the
# statistics' control chart needs its warm-up and a 600-reading baseline before its limits mean anything
# (StatsSettings: 120 + 600), and the autoencoder and forest have seen as little; twice that is the least.
SHORT_HISTORY_ROWS = 2 * (120 + 600)
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_TYPE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


class ModelError(EgizError, ValueError):
    """A model that cannot be used: missing, corrupt (hash, ONNX) or mismatched (type, features)."""

    code = "model_refused"


class ModelNotFound(ModelError, NotFound):
    code = "model_not_found"


class NoEarlierModel(ModelError, Conflict):
    code = "no_earlier_model"


def normalise(raw: np.ndarray, threshold: float, median: float) -> np.ndarray:
    """Raw detector scores → 0..1: 0.5 at the threshold, 1 four spreads (threshold - median) above it."""
    spread = max(threshold - median, 1e-9)
    low = 0.5 * np.clip((raw - median) / spread, 0.0, 1.0)
    high = 0.5 + 0.5 * np.clip((raw - threshold) / (4 * spread), 0.0, 1.0)
    return np.where(raw < threshold, low, high)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_hash(manifest: dict[str, Any]) -> str:
    """The hash of a version: its ONNX files' hashes and everything that scores with them."""
    keep: dict[str, Any] = {k: manifest[k] for k in ("type", "features", "scaling", "statistics", "profile")
                            if k in manifest}
    for part in ("autoencoder", "isolation_forest"):
        keep[part] = {k: v for k, v in manifest.get(part, {}).items() if k != "file"}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ModelScores:
    """Scores of a batch of feature rows."""

    score: np.ndarray  # (n,) the model tier's score in 0..1: the larger of the two detectors
    ae: np.ndarray  # (n,) autoencoder, normalised
    forest: np.ndarray  # (n,) Isolation Forest, normalised
    residual_z: np.ndarray  # (n, d) reconstruction error per feature in training standard deviations
    expected: np.ndarray  # (n, d) what the autoencoder reconstructs, in the properties' units


class ModelBundle:
    """One loaded, checked model version of one equipment type."""

    def __init__(self, directory: Path, expected_type: str | None = None) -> None:
        try:
            self._load(directory, expected_type)
        except ModelError:
            raise
        except Exception as exc:  # any other shape of broken file is refused the same way, never a crash
            raise ModelError(f"{directory}: not a usable model ({type(exc).__name__}: {str(exc)[:200]})",
                             path=str(directory)) from None

    def _load(self, directory: Path, expected_type: str | None) -> None:
        self.directory = directory
        man_path = directory / MANIFEST
        try:
            man = json.loads(man_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelError(f"{directory}: no {MANIFEST}", path=str(directory)) from None
        except (OSError, ValueError) as exc:
            raise ModelError(f"{man_path}: not a readable manifest ({exc})", path=str(man_path)) from None
        try:
            self.type = str(man["type"])
            self.version = str(man["version"])
            self.features: list[str] = [str(f) for f in man["features"]]
            self.mean = np.asarray(man["scaling"]["mean"], dtype=np.float64)
            self.std = np.asarray(man["scaling"]["std"], dtype=np.float64)
            ae, fo = man["autoencoder"], man["isolation_forest"]
            self.resid_std = np.asarray(ae["residual_std"], dtype=np.float64)
            self.ae_threshold, self.ae_median = float(ae["threshold"]), float(ae["median"])
            self.if_threshold, self.if_median = float(fo["threshold"]), float(fo["median"])
            fmt = int(man.get("format", 0))
            st = man.get("statistics")
            self.stat_limits: tuple[list[float], list[float]] | None = (
                ([float(v) for v in st["z_limit"]], [float(v) for v in st["chart_limit"]]) if st else None)
            self.group_limits: dict[str, float] = {str(k): float(v) for k, v in (st or {}).get("groups", {}).items()}
            # versions trained before the operating profile existed have none and still load
            self.profile: Profile | None = (Profile.from_json(man["profile"], len(self.features))
                                            if "profile" in man else None)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{man_path}: manifest is missing or has a bad {exc}", path=str(man_path)) from None
        self.manifest = man
        # trained on fewer than SHORT_HISTORY_ROWS per Thing: only its profile may alarm (decided at training,
        # inside the hashed manifest)
        self.short_history = self.profile is not None and self.profile.decides
        d = len(self.features)
        if fmt != FORMAT:
            raise ModelError(f"{man_path}: format {fmt}, this gateway reads format {FORMAT}", path=str(man_path))
        if expected_type is not None and self.type != expected_type:
            raise ModelError(f"{directory}: a model for {self.type!r}, not {expected_type!r}", path=str(directory))
        if d == 0 or any(len(a) != d for a in (self.mean, self.std, self.resid_std,
                                               *(self.stat_limits or ()))):
            raise ModelError(f"{man_path}: scaling does not match its {d} features", path=str(man_path))
        if man.get("hash") != model_hash(man):
            raise ModelError(f"{man_path}: the manifest's hash does not match its content", path=str(man_path))
        self.ae = self._session(directory / AE_FILE, ae.get("sha256"), d, d)
        self.forest = self._session(directory / IF_FILE, fo.get("sha256"), d, None)
        probe = self.score(self.mean[None, :])
        if not (np.isfinite(probe.ae).all() and np.isfinite(probe.forest).all()):
            raise ModelError(f"{directory}: the model gives non-finite scores", path=str(directory))

    def _session(self, path: Path, sha: Any, d: int, out_d: int | None) -> ort.InferenceSession:
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise ModelError(f"{path}: cannot read ({exc.strerror})", path=str(path)) from None
        if hashlib.sha256(blob).hexdigest() != sha:
            raise ModelError(f"{path}: corrupt (its SHA-256 does not match the manifest)", path=str(path))
        import onnxruntime as ort  # here, not at the top: the aggregator reads the registry's files only

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1  # a gateway has few cores and other work; batches are small
        opts.inter_op_num_threads = 1
        try:
            sess = ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
            raise ModelError(f"{path}: not a loadable ONNX model ({exc})", path=str(path)) from None
        meta = sess.get_modelmeta().custom_metadata_map
        if meta.get("egiz.type") != self.type or meta.get("egiz.version") != self.version:
            raise ModelError(f"{path}: made for {meta.get('egiz.type')!r} version {meta.get('egiz.version')!r}, "
                             f"the manifest says {self.type!r} {self.version!r}", path=str(path))
        if json.loads(meta.get("egiz.features", "[]")) != self.features:
            raise ModelError(f"{path}: its features differ from the manifest's", path=str(path))
        shape = sess.get_inputs()[0].shape
        if len(shape) != 2 or shape[1] != d:
            raise ModelError(f"{path}: takes {shape[1] if len(shape) == 2 else shape} inputs, the manifest has {d}",
                             path=str(path))
        return sess

    @property
    def sha(self) -> str:
        return str(self.manifest["hash"])

    def scale(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std).astype(np.float32)

    def score(self, x: np.ndarray, forest: np.ndarray | None = None) -> ModelScores:
        """Score raw feature rows (n, d) in one run of each session. `forest`: normalised forest scores to
        reuse instead of running the forest (versions exported by skl2onnx cost about 2 ms per forest
        run, whatever the batch size, so the detector refreshes the forest less often)."""
        xs = self.scale(x)
        recon = self.ae.run(None, {self.ae.get_inputs()[0].name: xs})[0].reshape(xs.shape)
        z = (recon.astype(np.float64) - xs) / self.resid_std
        ae_raw = np.sqrt(np.mean(z * z, axis=1))
        ae = normalise(ae_raw, self.ae_threshold, self.ae_median)
        if forest is None:
            raw = -self.forest.run(None, {self.forest.get_inputs()[0].name: xs})[1].ravel().astype(np.float64)
            forest = normalise(raw, self.if_threshold, self.if_median)
        return ModelScores(np.maximum(ae, forest), ae, forest, z, recon * self.std + self.mean)

    def forest_attribution(self, x: np.ndarray) -> np.ndarray:
        """Per-feature share of one row's Isolation Forest score: how much it drops when that feature is
        replaced by its training mean (one batched run of d rows)."""
        xs = self.scale(x[None, :])[0]
        d = len(xs)
        rows = np.repeat(xs[None, :], d + 1, axis=0)
        rows[np.arange(1, d + 1), np.arange(d)] = 0.0
        raw = -self.forest.run(None, {self.forest.get_inputs()[0].name: rows})[1].ravel()
        gain = np.clip(raw[0] - raw[1:], 0.0, None)
        if gain.sum() <= 0:
            gain = np.abs(xs)
        return gain / max(float(gain.sum()), 1e-12)


# ------------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class VersionInfo:
    type: str
    version: str
    created: str
    rows: int
    data_from: str
    data_to: str
    active: bool
    hash: str
    error: str | None = None


class ModelRegistry:
    """The model versions under one directory; activation and rollback by atomic pointer files."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def types(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _TYPE.fullmatch(p.name))

    def _pointer(self, thing_type: str) -> dict[str, Any]:
        try:
            doc = json.loads((self.root / thing_type / ACTIVE).read_text(encoding="utf-8"))
            return doc if isinstance(doc, dict) else {}
        except (OSError, ValueError):
            return {}

    def active_version(self, thing_type: str) -> str | None:
        v = self._pointer(thing_type).get("version")
        return v if isinstance(v, str) else None

    def pointer_stamp(self, thing_type: str) -> float:
        """Changes whenever activation changes: what a running gateway polls."""
        try:
            return (self.root / thing_type / ACTIVE).stat().st_mtime_ns / 1e9
        except OSError:
            return 0.0

    def versions(self, thing_type: str) -> list[VersionInfo]:
        base = self.root / thing_type
        active = self.active_version(thing_type)
        out = []
        for d in sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []:
            try:
                man = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
                data = man.get("data", {})
                out.append(VersionInfo(thing_type, d.name, str(man.get("created", "")), int(data.get("rows", 0)),
                                       str(data.get("from", "")), str(data.get("to", "")), d.name == active,
                                       str(man.get("hash", ""))[:12]))
            except (OSError, ValueError, AttributeError) as exc:
                out.append(VersionInfo(thing_type, d.name, "", 0, "", "", d.name == active, "", str(exc)))
        return sorted(out, key=lambda v: (v.created, v.version))

    def load(self, thing_type: str, version: str) -> ModelBundle:
        if not _TYPE.fullmatch(thing_type) or not _VERSION.fullmatch(version):
            raise ModelNotFound(f"no model {thing_type}/{version}", type=thing_type, version=version)
        d = self.root / thing_type / version
        if not d.is_dir():
            raise ModelNotFound(f"no model version {version!r} for {thing_type!r}", type=thing_type, version=version)
        return ModelBundle(d, thing_type)

    def activate(self, thing_type: str, version: str) -> ModelBundle:
        """Check the version completely, then make it the active one (the previous is kept for rollback)."""
        bundle = self.load(thing_type, version)
        ptr = self._pointer(thing_type)
        history = [v for v in ptr.get("history", []) if isinstance(v, str)]
        current = ptr.get("version")
        if isinstance(current, str) and current != version:
            history.append(current)
        self._write_pointer(thing_type, {"version": version, "history": history[-20:], "activated": time.time()})
        log.info("model activated", extra={"type": thing_type, "version": version})
        return bundle

    def rollback(self, thing_type: str) -> ModelBundle:
        """Back to the newest earlier version that still loads; the refused ones are skipped and named."""
        if not _TYPE.fullmatch(thing_type):
            raise ModelNotFound(f"no models of {thing_type!r}", type=thing_type)
        ptr = self._pointer(thing_type)
        history = [v for v in ptr.get("history", []) if isinstance(v, str)]
        refused = []
        while history:
            version = history.pop()
            try:
                bundle = self.load(thing_type, version)
            except ModelError as exc:
                refused.append(str(exc))
                continue
            self._write_pointer(thing_type, {"version": version, "history": history, "activated": time.time()})
            log.info("model rolled back", extra={"type": thing_type, "version": version})
            return bundle
        why = f" ({'; '.join(refused)})" if refused else ""
        raise NoEarlierModel(f"no earlier model of {thing_type!r} to roll back to{why}", type=thing_type)

    def _write_pointer(self, thing_type: str, doc: dict[str, Any]) -> None:
        path = self.root / thing_type / ACTIVE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc), encoding="utf-8")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
