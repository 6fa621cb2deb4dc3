"""Times as the contracts write them: ISO 8601 UTC with milliseconds and a `Z`, and back."""

from __future__ import annotations

import math
from datetime import UTC, datetime

_second: list[tuple[int, str]] = [(0, "1970-01-01T00:00:00")]  # the last whole second formatted


def iso_utc(ts: float) -> str:
    """Epoch seconds → `2026-01-02T03:04:05.678Z`.

    Every event carries one, so the date and time of the last second are kept and only the
    milliseconds are formatted anew; the rounding is datetime's (to the microsecond, half to even,
    then cut to milliseconds).
    """
    sec = math.floor(ts)
    us = round((ts - sec) * 1_000_000)
    if us >= 1_000_000:
        sec, us = sec + 1, us - 1_000_000
    last, text = _second[0]
    if sec != last:
        text = datetime.fromtimestamp(sec, UTC).isoformat(timespec="seconds")[:-6]
        _second[0] = (sec, text)
    return f"{text}.{us // 1000:03d}Z"


def iso_seconds(ts: float) -> str:
    """Epoch seconds → `2026-01-02T03:04:05Z` (whole seconds, for file names and manifests)."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_iso(text: str) -> float:
    """ISO 8601 → epoch seconds; a time without a zone is UTC. Raises ValueError."""
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()
