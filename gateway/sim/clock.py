"""The simulators' run clock: ticks on a fixed schedule of event-loop time, the simulated seconds each tick
stands for, and the local hour of simulated time that daily patterns follow."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass


def local_hour(ts: float) -> float:
    """The local time of day at `ts`, in hours (0 <= h < 24)."""
    return ((ts + time.localtime(ts).tm_gmtoff) % 86_400.0) / 3600.0


@dataclass(frozen=True, slots=True)
class RunClock:
    """One run's schedule, started on the running event loop."""

    period: float  # loop seconds between ticks
    dt_s: float  # simulated seconds per tick
    t0: float  # loop time of tick 0
    end: float  # loop time the run ends (inf: until stopped)
    clock0: float  # wall-clock time of simulated second 0

    @classmethod
    def start(cls, rate_hz: float, time_scale: float, duration_s: float | None,
              clock_start: float | None = None) -> RunClock:
        """A clock from now: `rate_hz` ticks a second, each `time_scale` / `rate_hz` simulated seconds, for
        `duration_s` (None: until stopped), simulated time starting at `clock_start` (None: now)."""
        period = 1.0 / rate_hz
        t0 = asyncio.get_running_loop().time()
        return cls(period, period * time_scale, t0, t0 + duration_s if duration_s is not None else math.inf,
                   clock_start if clock_start is not None else time.time())

    def hour(self, elapsed_s: float) -> float:
        """The local hour `elapsed_s` simulated seconds into the run."""
        return local_hour(self.clock0 + elapsed_s)
