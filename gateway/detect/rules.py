"""Tier 1: rules an engineer writes down — thresholds, valid ranges, rate of change, stuck values.

Rules come from a YAML file (the built-in `rules.yaml` unless `detect.rules_file` names another);
a bad file stops the gateway at start with every problem named. Evaluation keeps O(1) state per
(Thing, rule, property) and never allocates on the hot path beyond a hit.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from gateway.common.errors import EgizError
from gateway.detect.explain import amount, label

Severity = Literal["info", "warning", "critical"]
SEVERITIES: tuple[Severity, ...] = ("info", "warning", "critical")
SEVERITY_SCORE: dict[str, float] = {"info": 0.55, "warning": 0.75, "critical": 0.95}
KINDS = ("threshold", "range", "rate", "stuck")
_RELATIVE = re.compile(r"\s*(?P<other>[A-Za-z0-9_.\[\]]+)\s*(?P<sign>[+-])\s*(?P<num>\d+(?:\.\d+)?)\s*")


@functools.lru_cache(maxsize=1024)
def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile(re.escape(pattern).replace(r"\*", ".*").replace(r"\?", "."))


def glob_match(pattern: str, text: str) -> bool:
    """`*` and `?` are wildcards; everything else, brackets included, is literal (`temperature_zones[*]`)."""
    return _glob(pattern).fullmatch(text) is not None


class RulesError(EgizError, ValueError):
    """A rules file that cannot be used; `problems` lists each bad rule and why."""

    code = "invalid_rules"


@dataclass(frozen=True)
class Bound:
    """A threshold: a constant, or another property of the same feature plus an offset."""

    value: float
    other: str | None = None

    def resolve(self, feature_values: dict[str, float]) -> float | None:
        if self.other is None:
            return self.value
        base = feature_values.get(self.other)
        return None if base is None else base + self.value

    def __str__(self) -> str:
        if self.other is None:
            return f"{self.value:g}"
        return f"{self.other} {'+' if self.value >= 0 else '-'} {abs(self.value):g}"


@dataclass(frozen=True)
class Rule:
    """One rule as written in the file, checked."""

    name: str
    kind: str
    severity: Severity
    type: str = "*"
    feature: str = "*"
    property: str = "*"
    above: Bound | None = None
    below: Bound | None = None
    min: float = -math.inf
    max: float = math.inf
    max_per_s: float = math.inf
    for_s: float = 0.0
    min_samples: int = 1
    tolerance: float = 0.0

    def applies(self, thing_type: str, feature: str, path: str) -> bool:
        return ((self.type == "*" or self.type == thing_type)
                and (self.feature == "*" or self.feature == feature)
                and glob_match(self.property, path))


@dataclass(frozen=True)
class RuleHit:
    """A rule that is violated right now by one property."""

    rule: Rule
    key: str  # feature/path
    value: float
    text: str

    @property
    def score(self) -> float:
        return SEVERITY_SCORE[self.rule.severity]


@dataclass(slots=True)
class _State:
    """Per (Thing, rule, property): what the rule remembers between readings."""

    last: float = math.nan
    last_ts: float = math.nan
    since: float = math.nan  # when the current violation (threshold) or run of equal values (stuck) began
    count: int = 0


@dataclass
class RuleBook:
    """The rules in force, with an index from (type, feature, path) to the rules that apply."""

    rules: tuple[Rule, ...]
    source: str = "built-in"
    _index: dict[tuple[str, str, str], tuple[Rule, ...]] = field(default_factory=dict)
    _features: dict[tuple[str, str], bool] = field(default_factory=dict)

    def matching(self, thing_type: str, feature: str, path: str) -> tuple[Rule, ...]:
        """The rules of one property without touching the cache (safe from any thread)."""
        return tuple(r for r in self.rules if r.applies(thing_type, feature, path))

    def any_for(self, thing_type: str, feature: str) -> bool:
        """Whether any rule can apply to a property of this type's feature, cached (the detector's thread
        only): most features have none, and their readings need no rule state at all."""
        found = self._features.get((thing_type, feature))
        if found is None:
            found = self._features[(thing_type, feature)] = any(
                r.type in ("*", thing_type) and r.feature in ("*", feature) for r in self.rules)
        return found

    def for_path(self, thing_type: str, feature: str, path: str) -> tuple[Rule, ...]:
        """The rules of one property, cached (the detector's thread only)."""
        key = (thing_type, feature, path)
        found = self._index.get(key)
        if found is None:
            found = self._index[key] = tuple(r for r in self.rules if r.applies(thing_type, feature, path))
        return found


class RuleEvaluator:
    """Keeps rule state for every Thing and says which rules a new reading violates."""

    def __init__(self, book: RuleBook) -> None:
        self.book = book
        self._state: dict[tuple[str, int, str], _State] = {}
        self._ids = {id(r): i for i, r in enumerate(book.rules)}

    def forget(self, thing_id: str) -> None:
        for k in [k for k in self._state if k[0] == thing_id]:
            del self._state[k]

    def check(self, thing_id: str, thing_type: str, feature: str, ts: float,
              values: dict[str, float]) -> list[RuleHit]:
        """Apply one reading of a feature (flattened numeric values) and return the violations."""
        hits: list[RuleHit] = []
        for path, x in values.items():
            rules = self.book.for_path(thing_type, feature, path)
            if not rules:
                continue
            key = f"{feature}/{path}"
            for rule in rules:
                sk = (thing_id, self._ids[id(rule)], path)
                st = self._state.get(sk)
                if st is None:
                    st = self._state[sk] = _State()
                hit = _apply(rule, st, key, x, ts, values)
                if hit is not None:
                    hits.append(hit)
        return hits


def _apply(rule: Rule, st: _State, key: str, x: float, ts: float, values: dict[str, float]) -> RuleHit | None:
    kind = rule.kind
    if kind == "threshold":
        text = None
        if rule.above is not None:
            bound = rule.above.resolve(values)
            if bound is not None and x > bound:
                text = f"{label(key)} {amount(x, key)} is {amount(x - bound, key)} above its limit {rule.above}"
        if text is None and rule.below is not None:
            bound = rule.below.resolve(values)
            if bound is not None and x < bound:
                text = f"{label(key)} {amount(x, key)} is {amount(bound - x, key)} below its limit {rule.below}"
        if text is None:
            st.since = math.nan
            return None
        if math.isnan(st.since):
            st.since = ts
        if ts - st.since < rule.for_s:
            return None
        return RuleHit(rule, key, x, f"{text} ({rule.name})")
    if kind == "range":
        if rule.min <= x <= rule.max:
            return None
        return RuleHit(rule, key, x, f"{label(key)} {amount(x, key)} is outside its valid range "
                                     f"{rule.min:g}..{rule.max:g} ({rule.name})")
    if kind == "rate":
        last, last_ts = st.last, st.last_ts
        st.last, st.last_ts = x, ts
        if math.isnan(last) or ts <= last_ts:
            return None
        rate = abs(x - last) / max(ts - last_ts, 1e-3)
        if rate <= rule.max_per_s:
            return None
        return RuleHit(rule, key, x, f"{label(key)} changed {amount(rate, key)}/s, faster than "
                                     f"{rule.max_per_s:g}/s is believable ({rule.name})")
    # stuck
    if math.isnan(st.last) or abs(x - st.last) > rule.tolerance:
        st.last, st.since, st.count = x, ts, 1
        return None
    st.count += 1
    if st.count < rule.min_samples or ts - st.since < rule.for_s:
        return None
    return RuleHit(rule, key, x, f"{label(key)} has not changed for {ts - st.since:.0f} s "
                                 f"(stuck at {amount(x, key)}) ({rule.name})")


# ------------------------------------------------------------------------------------------ loading
def load_rules(path: Path | None) -> RuleBook:
    """The rules of `path`, or the built-in ones; every problem is reported at once (RulesError)."""
    if path is None:
        text = resources.files("gateway.detect").joinpath("rules.yaml").read_text(encoding="utf-8")
        source = "built-in"
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise RulesError(f"cannot read the rules file {path}: {exc.strerror}", path=str(path)) from None
        source = str(path)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RulesError(f"{source}: not valid YAML: {exc}", path=source) from None
    return parse_rules(doc, source)


def parse_rules(doc: Any, source: str = "rules") -> RuleBook:
    if doc is None:
        doc = {"rules": []}
    if not isinstance(doc, dict) or not isinstance(doc.get("rules", []), list):
        raise RulesError(f"{source}: expected a mapping with a list under 'rules'", path=source)
    unknown_top = set(doc) - {"rules"}
    problems = [f"unknown top-level key {k!r}" for k in sorted(unknown_top)]
    rules: list[Rule] = []
    for i, item in enumerate(doc.get("rules") or []):
        where = f"rules[{i}]"
        try:
            rules.append(_rule(item, where))
        except ValueError as exc:
            problems.append(str(exc))
    names = [r.name for r in rules]
    problems += [f"rule name {n!r} is used twice" for n in sorted({n for n in names if names.count(n) > 1})]
    if problems:
        raise RulesError(f"{source}: " + "; ".join(problems), path=source, problems=problems)
    return RuleBook(tuple(rules), source)


_COMMON = {"name", "kind", "type", "feature", "property", "severity"}
_PARAMS = {"threshold": {"above", "below", "for_s"}, "range": {"min", "max"}, "rate": {"max_per_s"},
           "stuck": {"for_s", "min_samples", "tolerance"}}


def _rule(item: Any, where: str) -> Rule:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a mapping")
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}.name: give the rule a name")
    where = f"{where} ({name})"
    kind = item.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{where}.kind: must be one of {', '.join(KINDS)}")
    unknown = set(item) - _COMMON - _PARAMS[kind]
    if unknown:
        raise ValueError(f"{where}: unknown keys for a {kind} rule: {', '.join(sorted(map(str, unknown)))}")
    severity = item.get("severity", "warning")
    if severity not in SEVERITIES:
        raise ValueError(f"{where}.severity: must be one of {', '.join(SEVERITIES)}")
    for key in ("type", "feature", "property"):
        if not isinstance(item.get(key, "*"), str):
            raise ValueError(f"{where}.{key}: must be a string")

    def number(key: str, default: float, *, positive: bool = False) -> float:
        value = item.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise ValueError(f"{where}.{key}: must be a number")
        if positive and value <= 0:
            raise ValueError(f"{where}.{key}: must be > 0")
        return float(value)

    kw: dict[str, Any] = {"name": name, "kind": kind, "severity": severity,
                          "type": item.get("type", "*"), "feature": item.get("feature", "*"),
                          "property": str(item.get("property", "*"))}
    if kind == "threshold":
        kw["above"] = _bound(item.get("above"), f"{where}.above")
        kw["below"] = _bound(item.get("below"), f"{where}.below")
        if kw["above"] is None and kw["below"] is None:
            raise ValueError(f"{where}: a threshold needs 'above' or 'below'")
        kw["for_s"] = number("for_s", 0.0)
    elif kind == "range":
        kw["min"], kw["max"] = number("min", -math.inf), number("max", math.inf)
        if kw["min"] >= kw["max"]:
            raise ValueError(f"{where}: min must be below max")
    elif kind == "rate":
        kw["max_per_s"] = number("max_per_s", math.inf, positive=True)
    else:
        kw["for_s"] = number("for_s", 30.0, positive=True)
        kw["tolerance"] = number("tolerance", 0.0)
        samples = item.get("min_samples", 5)
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 2:
            raise ValueError(f"{where}.min_samples: must be an integer >= 2")
        kw["min_samples"] = samples
    return Rule(**kw)


def _bound(value: Any, where: str) -> Bound | None:
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return Bound(float(value))
    if isinstance(value, str):
        m = _RELATIVE.fullmatch(value)
        if m:
            num = float(m["num"])
            return Bound(num if m["sign"] == "+" else -num, m["other"])
    raise ValueError(f"{where}: must be a number or 'PROPERTY + N' / 'PROPERTY - N'")
