"""Topic patterns: `openegiz/{site}/{type}/{equipment_id}/{feature}/telemetry` and friends.

A pattern is compiled once into a subscription filter (placeholders become `+`) and a matcher that
captures each placeholder from one topic level, so the hot path is a split and a few compares.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

PLACEHOLDERS = frozenset({"site", "type", "equipment_id", "device_id", "feature", "line"})
LEVEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


@dataclass(frozen=True)
class TopicPattern:
    """A validated topic pattern whose placeholders each take exactly one topic level."""

    pattern: str
    levels: tuple[str, ...]
    captures: tuple[tuple[int, str], ...]  # (level index, placeholder name)

    @classmethod
    def parse(cls, pattern: str, *, required: set[str] | frozenset[str] = frozenset()) -> TopicPattern:
        if not pattern or pattern.startswith("/") or pattern.endswith("/"):
            raise ValueError(f"topic pattern {pattern!r} must not be empty or start/end with '/'")
        levels = tuple(pattern.split("/"))
        captures: list[tuple[int, str]] = []
        for i, level in enumerate(levels):
            if level.startswith("{") and level.endswith("}"):
                name = level[1:-1]
                if name not in PLACEHOLDERS:
                    raise ValueError(
                        f"unknown placeholder {{{name}}} (known: {', '.join(sorted(PLACEHOLDERS))})"
                    )
                if any(n == name for _, n in captures):
                    raise ValueError(f"placeholder {{{name}}} appears twice")
                captures.append((i, name))
            elif not level or any(c in level for c in "+#{}"):
                raise ValueError(f"level {level!r} of {pattern!r} must be a literal or one placeholder")
        names = {n for _, n in captures}
        if "device_id" in names:
            names.add("equipment_id")
        missing = set(required) - names
        if missing:
            raise ValueError(f"pattern {pattern!r} needs {', '.join('{' + m + '}' for m in sorted(missing))}")
        return cls(pattern, levels, tuple(captures))

    @property
    def subscription(self) -> str:
        """The MQTT filter that receives every topic this pattern can match."""
        return "/".join("+" if lv.startswith("{") else lv for lv in self.levels)

    def subscription_for(self, **fixed: str) -> str:
        """The filter with some placeholders pinned, e.g. a gateway subscribes to its own site only."""
        return "/".join(
            (fixed.get(lv[1:-1], "+") if lv.startswith("{") else lv) for lv in self.levels
        )

    def match(self, topic: str) -> dict[str, str] | None:
        """Captured placeholders of `topic`, or None when it does not fit the pattern."""
        parts = topic.split("/")
        if len(parts) != len(self.levels):
            return None
        levels = self.levels
        for i, lv in enumerate(levels):
            if lv[0] != "{" and parts[i] != lv:
                return None
        out: dict[str, str] = {}
        for i, name in self.captures:
            value = parts[i]
            if not value or len(value) > 64 or not LEVEL_CHARS.issuperset(value):
                return None
            out[name] = sys.intern(value)  # kept per topic: one string per site, type, feature, not per topic
        return out

    def build(self, **values: str) -> str:
        """The concrete topic for `values` (used for command topics and by the simulator)."""
        return "/".join(values[lv[1:-1]] if lv.startswith("{") else lv for lv in self.levels)
