"""Times as the contracts write them: ISO 8601 UTC with milliseconds and a `Z`, and back."""

from __future__ import annotations

from datetime import UTC, datetime


def iso_utc(ts: float) -> str:
    """Epoch seconds → `2026-01-02T03:04:05.678Z`."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_seconds(ts: float) -> str:
    """Epoch seconds → `2026-01-02T03:04:05Z` (whole seconds, for file names and manifests)."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_iso(text: str) -> float:
    """ISO 8601 → epoch seconds; a time without a zone is UTC. Raises ValueError."""
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()
