"""The detection pipeline without I/O: readings in, anomaly transitions out.

Readings update the rules and the statistics at once (O(1) each); every tick the Things that got
readings are scored by their type's model in one batched run, the three tiers are combined into one
score in 0..1 with a confidence, and a hysteresis per Thing turns scores into anomalies: open when
the score reaches `enter`, resolved when it has stayed below `exit` for `clear_s` seconds of data
time — one fault, one anomaly. The live detector and the offline evaluation both drive this class,
so what is evaluated is what runs.
"""

from __future__ import annotations

import copy
import math
import sys
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from gateway.common.compact import KeyedArray, Layout
from gateway.detect.explain import deviation, label, split_key
from gateway.detect.models import ModelBundle
from gateway.detect.profile import ProfileState
from gateway.detect.rules import RuleBook, RuleEvaluator, RuleHit, glob_match
from gateway.detect.stats import StatHit, StatsSettings, StatsTier

State = Literal["open", "acknowledged", "resolved"]
RULE_TYPES = {"threshold": "threshold", "range": "out_of_range", "rate": "rate_of_change", "stuck": "stuck_value"}
CONTEXT_FEATURE = "business_context"


@dataclass(frozen=True)
class DetectSettings:
    enter: float = 0.5  # combined score that opens an anomaly
    exit: float = 0.3  # ... below which it counts as clear
    clear_s: float = 30.0  # seconds clear before it is resolved
    update_every_s: float = 1.0  # at most this often an open anomaly's score is re-published
    forest_every_s: float = 1.0  # the Isolation Forest rescores a type's Things at most this often (data time)
    ignore: tuple[str, ...] = ("*setpoint*",)  # properties that are commands, not measurements
    stats: StatsSettings = field(default_factory=StatsSettings)


@dataclass
class Anomaly:
    """One anomaly from open to resolved; what the API lists and the WebSocket announces."""

    id: str
    thing_id: str
    thing_type: str
    anomaly_type: str
    severity: str
    state: State
    score: float
    peak_score: float
    confidence: float
    explanation: str
    top_features: list[dict[str, Any]]
    opened_at: float
    last_seen_at: float
    tiers: dict[str, float]
    context: dict[str, str] = field(default_factory=dict)
    model_version: str | None = None
    resolved_at: float | None = None
    acknowledged_at: float | None = None
    acknowledged_by: str | None = None
    resolved_by: str | None = None
    note: str = ""
    false_positive: bool = False

    def to_json(self) -> dict[str, Any]:
        from gateway.common.timefmt import iso_utc

        return {
            "id": self.id, "thingId": self.thing_id, "thingType": self.thing_type, "anomalyType": self.anomaly_type,
            "severity": self.severity, "state": self.state, "score": round(self.score, 3),
            "peakScore": round(self.peak_score, 3), "confidence": round(self.confidence, 3),
            "explanation": self.explanation, "topFeatures": self.top_features,
            "openedAt": iso_utc(self.opened_at), "lastSeenAt": iso_utc(self.last_seen_at),
            "resolvedAt": iso_utc(self.resolved_at) if self.resolved_at is not None else None,
            "acknowledgedAt": iso_utc(self.acknowledged_at) if self.acknowledged_at is not None else None,
            "acknowledgedBy": self.acknowledged_by, "resolvedBy": self.resolved_by, "note": self.note,
            "falsePositive": self.false_positive, "tiers": {k: round(v, 3) for k, v in self.tiers.items()},
            "context": self.context, "modelVersion": self.model_version,
        }


@dataclass(frozen=True)
class Transition:
    kind: Literal["opened", "updated", "resolved"]
    anomaly: Anomaly


@dataclass(slots=True)
class _Thing:
    type: str
    values: KeyedArray[str, float]  # the latest reading of each property, by "feature/path"
    context: dict[str, str] = field(default_factory=dict)
    ts: float = 0.0
    rule: RuleHit | None = None  # the strongest rule hit since the last tick
    stats: dict[str, StatHit] = field(default_factory=dict)  # the strongest statistics per property since the last tick
    anomaly: Anomaly | None = None
    clear_since: float | None = None
    suppressed: bool = False  # an operator closed the anomaly while the condition lasted: wait until clear
    published_at: float = 0.0
    published_score: float = 0.0
    forest: float = 0.0  # the latest Isolation Forest score (refreshed every forest_every_s)
    hit_ts: float = 0.0  # device time of the strongest rule or statistics evidence since the last tick
    profile: ProfileState | None = None  # the operating profile's averages, for the model version in `profile_of`
    profile_of: str = ""
    score: float = 0.0  # the latest combined score


@dataclass(frozen=True)
class _Scored:
    score: float
    tiers: dict[str, float]
    confidence: float
    explain: Callable[[], tuple[str, str, str, list[dict[str, Any]]]]


class DetectorCore:
    """Rules, statistics, models, ensemble and hysteresis for every Thing of one gateway."""

    def __init__(self, rules: RuleBook, settings: DetectSettings | None = None,
                 models: dict[str, ModelBundle] | None = None) -> None:
        self.settings = settings or DetectSettings()
        self.rules = RuleEvaluator(rules)
        self.stats = StatsTier(self.settings.stats)
        self.models: dict[str, ModelBundle] = {}
        self._things: dict[str, _Thing] = {}
        self._dirty: set[str] = set()
        self._ignored: dict[str, bool] = {}
        self._keys: dict[str, dict[str, str]] = {}  # feature → path → "feature/path", shared by every Thing
        self._values_root: Layout[str] = KeyedArray.root()  # the positions of the latest values by name
        self.readings = 0
        self.rows_scored = 0
        self._forest_at: dict[str, float] = {}
        for bundle in (models or {}).values():
            self.set_model(bundle)

    # ----------------------------------------------------------------- input
    def _ignore(self, path: str) -> bool:
        hit = self._ignored.get(path)
        if hit is None:
            hit = self._ignored[path] = any(glob_match(p, path) for p in self.settings.ignore)
        return hit

    def add(self, thing_id: str, thing_type: str, feature: str, ts: float,
            values: Iterable[tuple[str, Any]]) -> None:
        """One reading of one feature: flattened (path, value) pairs, numbers and strings."""
        t = self._things.get(thing_id)
        if t is None:
            t = self._things[thing_id] = _Thing(thing_type, KeyedArray(self._values_root, "d"))
        numeric: dict[str, float] = {}
        for path, v in values:
            if isinstance(v, bool):
                continue
            if isinstance(v, int | float):
                if math.isfinite(v):
                    numeric[path] = float(v)
            elif isinstance(v, str) and feature == CONTEXT_FEATURE:
                t.context[path] = v
        if not numeric:
            return
        self.readings += 1
        t.ts = max(t.ts, ts)
        if self.rules.book.any_for(thing_type, feature):
            for hit in self.rules.check(thing_id, thing_type, feature, ts, numeric):
                if t.rule is None or hit.score > t.rule.score:
                    t.rule, t.hit_ts = hit, ts
        keys = self._keys.get(feature)
        if keys is None:
            keys = self._keys[feature] = {}
        stats = self.stats
        of_thing, types = stats.slots_of(thing_id), stats.types
        slots: list[int] = []
        xs: list[float] = []
        for path, x in numeric.items():
            key = keys.get(path)
            if key is None:
                key = keys[path] = sys.intern(f"{feature}/{path}")  # one string per name, not one per Thing
            t.values[key] = x
            slot = of_thing.get(key)
            # the statistics' limits are looked up by the type the reading came with: a new type, new limits
            if slot is None or types[slot] != thing_type:
                if self._ignore(path):
                    continue
                slot = stats.slot(thing_id, key, thing_type)
                of_thing = stats.slots_of(thing_id)
            slots.append(slot)
            xs.append(x)
        self.stats.add(t, ts, thing_type, slots, xs)  # judged together at the tick (`_settle`)
        self._dirty.add(thing_id)

    def _settle(self) -> None:
        """The statistics of every reading since the last tick, advanced at once, their hits kept in order.
        A hit sets the Thing's evidence time unless a rule hit this tick: a rule's time wins, whether the
        rule hit before or after it (as when each reading was judged on arrival)."""
        for t, ts, hit in self.stats.flush():
            if self._keep(t, hit) and t.rule is None:
                t.hit_ts = ts

    @staticmethod
    def _keep(t: _Thing, hit: StatHit) -> bool:
        old = t.stats.get(hit.key)
        if old is None or hit.score > old.score:
            t.stats[hit.key] = hit
            return True
        return False

    def set_model(self, bundle: ModelBundle) -> None:
        """Use `bundle` for its type from the next tick on (hot swap): its scores and its statistics limits."""
        self.models[bundle.type] = bundle
        self._forest_at.pop(bundle.type, None)
        if bundle.stat_limits is not None:
            self.stats.calibrate(bundle.type, bundle.features, *bundle.stat_limits, bundle.group_limits)

    def forget(self, thing_id: str) -> Anomaly | None:
        """A deleted Thing: its state goes; its active anomaly, if any, is returned for resolving."""
        self._settle()
        t = self._things.pop(thing_id, None)
        self._dirty.discard(thing_id)
        self.rules.forget(thing_id)
        self.stats.forget(thing_id)
        return t.anomaly if t is not None else None

    def active_snapshot(self) -> list[Anomaly]:
        """Copies of every active anomaly (for persisting their latest score and last-seen time)."""
        return [copy.copy(t.anomaly) for t in self._things.values() if t.anomaly is not None]

    # ----------------------------------------------------------------- operators
    def score(self, thing_id: str) -> float:
        """The Thing's latest combined score (0..1), as of the last tick that scored it."""
        t = self._things.get(thing_id)
        return t.score if t is not None else 0.0

    def active(self, thing_id: str) -> Anomaly | None:
        t = self._things.get(thing_id)
        return t.anomaly if t is not None else None

    def acknowledge(self, anomaly_id: str, by: str, note: str, now: float) -> Anomaly | None:
        for t in self._things.values():
            a = t.anomaly
            if a is not None and a.id == anomaly_id:
                a.state, a.acknowledged_at, a.acknowledged_by = "acknowledged", now, by
                a.note = note or a.note
                return a
        return None

    def close(self, anomaly_id: str, by: str, note: str, false_positive: bool, now: float) -> Anomaly | None:
        """An operator resolves an active anomaly; the Thing stays quiet until its condition clears."""
        for t in self._things.values():
            a = t.anomaly
            if a is not None and a.id == anomaly_id:
                a.state, a.resolved_at, a.resolved_by = "resolved", now, by
                a.note, a.false_positive = note or a.note, false_positive
                t.anomaly, t.suppressed, t.clear_since = None, True, None
                return a
        return None

    def adopt(self, anomaly: Anomaly) -> None:
        """At start: an anomaly the log still has open continues (no second one for the same fault)."""
        t = self._things.get(anomaly.thing_id)
        if t is None:
            t = self._things[anomaly.thing_id] = _Thing(anomaly.thing_type, KeyedArray(self._values_root, "d"))
        t.anomaly = anomaly
        t.published_at, t.published_score = anomaly.last_seen_at, anomaly.score

    # ----------------------------------------------------------------- scoring
    def tick(self, new_id: Callable[[], str] = lambda: uuid.uuid4().hex) -> list[Transition]:
        """Score every Thing with new readings (models batched per type) and apply the hysteresis."""
        self._settle()
        if not self._dirty:
            return []
        dirty, self._dirty = self._dirty, set()
        by_type: dict[str, list[str]] = {}
        for tid in dirty:
            t = self._things.get(tid)
            if t is not None:
                by_type.setdefault(t.type, []).append(tid)
        out: list[Transition] = []
        for ttype, ids in by_type.items():
            bundle = self.models.get(ttype)
            model_rows: dict[str, int] = {}
            scores = None
            x: np.ndarray | None = None
            if bundle is not None:
                rows: list[list[float]] = []
                for tid in ids:
                    vals = self._things[tid].values
                    if all(k in vals for k in bundle.features):
                        model_rows[tid] = len(rows)
                        rows.append([vals[k] for k in bundle.features])
                if rows:
                    x = np.asarray(rows, dtype=np.float64)
                    things = [self._things[tid] for tid in model_rows]
                    now = max(th.ts for th in things)
                    if now - self._forest_at.get(ttype, -math.inf) >= self.settings.forest_every_s:
                        self._forest_at[ttype] = now
                        scores = bundle.score(x)
                        for th, f in zip(things, scores.forest.tolist(), strict=True):
                            th.forest = f
                    else:
                        scores = bundle.score(x, np.array([th.forest for th in things]))
                    self.rows_scored += len(rows)
            ratios = self._profile(bundle, model_rows, x) if bundle is not None and x is not None else {}
            for tid in ids:
                t = self._things[tid]
                i = model_rows.get(tid)
                if i is None and t.rule is None and not t.stats and t.anomaly is None and not t.suppressed:
                    t.score, t.hit_ts = 0.0, 0.0  # no evidence and nothing open: score 0, below `enter` (> 0)
                    continue
                scored = self._combine(t, bundle if i is not None else None, scores, i, x, ratios.get(tid))
                t.score = scored.score
                tr = self._hysteresis(tid, t, scored, new_id, bundle.version if bundle and i is not None else None)
                t.rule, t.stats, t.hit_ts = None, {}, 0.0
                if tr is not None:
                    out.append(tr)
        return out

    def _profile(self, bundle: ModelBundle, model_rows: dict[str, int],
                 x: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Advance the operating profile of every scored Thing by its row: each one's ratios to its limits
        and where each property was expected."""
        profile = bundle.profile
        if profile is None:
            return {}
        out = {}
        for tid, i in model_rows.items():
            t = self._things[tid]
            if t.profile is None or t.profile_of != bundle.version:
                t.profile, t.profile_of = ProfileState(), bundle.version
            out[tid] = (t.profile.update(profile, x[i], t.ts), t.profile.expected(profile))
        return out

    def _combine(self, t: _Thing, bundle: ModelBundle | None, scores: Any, i: int | None,
                 x: np.ndarray | None, profiled: tuple[np.ndarray, np.ndarray] | None = None) -> _Scored:
        """The ensemble: rules fire alone; with a model, statistics only strengthen or weaken it."""
        s_rule = t.rule.score if t.rule is not None else 0.0
        top_stat = max(t.stats.values(), key=lambda h: h.score, default=None)
        s_stat = top_stat.score if top_stat is not None else 0.0
        tiers = {"rules": s_rule, "statistics": s_stat}
        s_model = None
        s_profile = 0.0
        ratios, expected = profiled if profiled is not None else (None, None)
        if bundle is not None and scores is not None and i is not None:
            s_model = float(scores.score[i])
            if ratios is not None and bundle.profile is not None:
                s_profile = bundle.profile.score(float(ratios.max()))
                tiers["profile"] = s_profile
            tiers["model"] = s_model
            tiers["autoencoder"] = float(scores.ae[i])
            tiers["isolation_forest"] = float(scores.forest[i])
            if ratios is not None and bundle.profile is not None and bundle.short_history:
                # A short history (models.SHORT_HISTORY_ROWS): the autoencoder and the forest judge single rows
                # at levels it never bounded, the statistics' limits come from a few hundred readings; on real
                # equipment both alarm on normal operation (docs/detect.md). The profile decides; their scores
                # stay in `tiers` for the operator. With a longer history the profile only reports.
                s_model, s_stat = s_profile, 0.0
        blended = max(s_stat, s_model or 0.0)
        combined = max(s_rule, blended)
        present = [s_rule, s_stat] + ([s_model] if s_model is not None else [])
        agree = sum(1 for s in present if s >= 0.4)
        confidence = 1.0 if s_rule >= 0.5 and s_rule >= blended else max(agree / len(present), 1 / len(present))
        by_rule = t.rule is not None and (s_rule >= blended or s_rule >= 0.5)  # what an engineer wrote explains best
        by_model = not by_rule and s_model is not None and s_model >= s_stat
        rule, stats = t.rule, dict(t.stats)

        def explain() -> tuple[str, str, str, list[dict[str, Any]]]:
            """(explanation, anomaly type, severity, top features): only computed when an anomaly needs it."""
            recipe = t.context.get("recipe", "")
            context = f"recipe {recipe}" if recipe else ""
            if by_rule and rule is not None:
                top = [_feature(rule.key, 1.0, rule.value, None)]
                return rule.text, RULE_TYPES[rule.rule.kind], rule.rule.severity, top
            severity = "critical" if combined >= 0.85 else "warning"
            if by_model and bundle is not None and x is not None and i is not None and ratios is not None \
                    and expected is not None and bundle.profile is not None and bundle.short_history:
                sq = ratios ** 2
                shares = sq / max(float(sq.sum()), 1e-12)
                order = np.argsort(-shares)[:3]
                top = [_feature(bundle.features[j], float(shares[j]), float(x[i, j]), float(expected[j]))
                       for j in order if shares[j] > 0.01]
                j0 = int(order[0])
                text = deviation(bundle.features[j0], float(x[i, j0]), float(expected[j0]), "its normal operation",
                                 context)
                return text, "operating_profile", severity, top
            if by_model and bundle is not None and x is not None and i is not None:
                if scores.forest[i] > scores.ae[i]:
                    shares = bundle.forest_attribution(x[i])
                else:
                    sq = scores.residual_z[i] ** 2
                    shares = sq / max(float(sq.sum()), 1e-12)
                order = np.argsort(-shares)[:3]
                top = [_feature(bundle.features[j], float(shares[j]), float(x[i, j]), float(scores.expected[i, j]))
                       for j in order if shares[j] > 0.01]
                j0 = int(order[0])
                text = deviation(bundle.features[j0], float(x[i, j0]), float(scores.expected[i, j0]),
                                 "what its other readings predict", context)
                return text, "multivariate_pattern", severity, top
            hits = sorted(stats.values(), key=lambda h: -h.score)[:3]
            if not hits:
                return "", "statistical_deviation", severity, []
            total = sum(h.score for h in hits)
            top = [_feature(h.key, h.score / total, h.value, h.usual) for h in hits]
            h0 = hits[0]
            text = deviation(h0.key, h0.value, h0.usual, "its recent baseline" if h0.chart else "its usual", context)
            return text, "drift" if h0.chart else "statistical_deviation", severity, top

        return _Scored(combined, tiers, confidence, explain)

    def _hysteresis(self, tid: str, t: _Thing, s: _Scored, new_id: Callable[[], str],
                    model_version: str | None) -> Transition | None:
        cfg = self.settings
        now = t.ts
        a = t.anomaly
        if a is None:
            if t.suppressed:
                if s.score < cfg.exit:
                    t.clear_since = t.clear_since if t.clear_since is not None else now
                    if now - t.clear_since >= cfg.clear_s:
                        t.suppressed, t.clear_since = False, None
                else:
                    t.clear_since = None
                return None
            if s.score < cfg.enter:
                return None
            text, kind, severity, top = s.explain()
            at = t.hit_ts if t.hit_ts and kind not in ("multivariate_pattern", "operating_profile") else now
            a = Anomaly(new_id(), tid, t.type, kind, severity, "open", s.score, s.score, s.confidence,
                        text, top, at, now, s.tiers, dict(t.context), model_version)
            t.anomaly, t.clear_since = a, None
            t.published_at, t.published_score = now, s.score
            return Transition("opened", a)
        if s.score >= cfg.exit:
            t.clear_since = None
            a.score, a.last_seen_at = s.score, now
            if s.score > a.peak_score + 0.02:  # the explanation follows the worst moment of the anomaly
                text, kind, severity, top = s.explain()
                a.peak_score, a.explanation, a.top_features, a.anomaly_type = s.score, text, top, kind
                a.tiers, a.confidence = s.tiers, s.confidence
                if _rank(severity) > _rank(a.severity):
                    a.severity = severity
            if now - t.published_at >= cfg.update_every_s and abs(s.score - t.published_score) >= 0.05:
                t.published_at, t.published_score = now, s.score
                return Transition("updated", a)
            return None
        a.score = s.score
        t.clear_since = t.clear_since if t.clear_since is not None else now
        if now - t.clear_since < cfg.clear_s:
            return None
        a.state, a.resolved_at, a.resolved_by = "resolved", now, "detector"
        t.anomaly, t.clear_since = None, None
        return Transition("resolved", a)


def _rank(severity: str) -> int:
    return {"info": 0, "warning": 1, "critical": 2}.get(severity, 0)


def _feature(key: str, share: float, value: float, expected: float | None) -> dict[str, Any]:
    feature, path = split_key(key)
    out: dict[str, Any] = {"feature": feature, "property": path, "label": label(key), "share": round(share, 3),
                           "value": round(value, 3)}
    if expected is not None:
        out["expected"] = round(expected, 3)
    return out
