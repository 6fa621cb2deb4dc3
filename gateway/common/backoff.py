"""Retry timing: capped exponential backoff with jitter, and the server's `Retry-After`.

Full jitter (a uniform draw from 0 to the capped exponential step, as in "Exponential Backoff And
Jitter", AWS Architecture Blog, 2015) spreads a fleet that lost its broker or uplink at the same
instant, so the peers do not come back in step and knock the service over again.
"""

from __future__ import annotations

import math
import random

MAX_EXPONENT = 30


def capped(attempt: int, base_s: float, cap_s: float) -> float:
    """`base_s * 2**attempt`, at most `cap_s` (attempt 0 is the first retry)."""
    return min(cap_s, base_s * 2 ** min(max(attempt, 0), MAX_EXPONENT))


def full_jitter(attempt: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """A uniform draw from [0, capped step]: the delay before retry number `attempt`."""
    return (rng or random).uniform(0.0, capped(attempt, base_s, cap_s))


def retry_after(value: str | None) -> float | None:
    """A `Retry-After` header in seconds; None when absent, negative, not finite, or an HTTP date
    (then the caller's own backoff applies)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
