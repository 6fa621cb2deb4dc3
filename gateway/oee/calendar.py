"""The site's shift calendar: for any minute, whether it is planned production time, and its shift and day.

Shifts start on configured weekdays at a local time (`oee.timezone`) and may run past midnight; breaks
and planned downtime are taken out of planned time. Without shifts every minute is planned, in a
shift named `day`. All boundaries are whole minutes, so a minute is either planned or not.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from gateway.oee.settings import WEEKDAYS, OeeSection, PlannedDowntime

MINUTE = 60.0


@dataclass(frozen=True, slots=True)
class MinuteInfo:
    """What the calendar says about one minute."""

    planned: bool
    shift: str  # "" outside every shift
    day: str  # the local date the shift started on (the minute's own local date outside shifts)


def _minutes(clock: str) -> int:
    h, m = clock.split(":")
    return int(h) * 60 + int(m)


class ShiftCalendar:
    """Shifts, breaks and planned downtime of one site (see the module docstring)."""

    def __init__(self, section: OeeSection) -> None:
        self.zone = ZoneInfo(section.timezone)
        self._shifts = [
            (s.name, _minutes(s.start), _minutes(s.end), {WEEKDAYS.index(d) for d in s.days},
             [(_minutes(b.start), _minutes(b.end)) for b in s.breaks])
            for s in section.shifts
        ]
        self._downtime = [self._window(d) for d in section.planned_downtime]

    def _window(self, d: PlannedDowntime) -> tuple[float, float]:
        def ts(text: str) -> float:
            dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
            return (dt if dt.tzinfo else dt.replace(tzinfo=self.zone)).timestamp()

        return ts(d.start), ts(d.end)

    @functools.lru_cache(maxsize=8192)  # noqa: B019 (one calendar per gateway, bounded)
    def minute(self, minute_start: float) -> MinuteInfo:
        """The calendar's word on the minute starting at `minute_start` (epoch seconds, a multiple of 60)."""
        local = datetime.fromtimestamp(minute_start, UTC).astimezone(self.zone)
        own_day = local.date()
        down = any(a <= minute_start < b for a, b in self._downtime)
        if not self._shifts:
            return MinuteInfo(not down, "day", own_day.isoformat())
        at = local.hour * 60 + local.minute
        # the shift that started today, or one that started yesterday and runs past midnight
        for start_day, offset in ((own_day, 0), (own_day - timedelta(days=1), 1440)):
            for name, start, end, days, breaks in self._shifts:
                if start_day.weekday() not in days:
                    continue
                length = (end - start) % 1440 or 1440
                pos = at + offset - start
                if 0 <= pos < length:
                    in_break = any(0 <= (at + offset - bs) % 1440 < ((be - bs) % 1440 or 1440)
                                   and _inside(start, length, bs) for bs, be in breaks)
                    return MinuteInfo(not (down or in_break), name, start_day.isoformat())
        return MinuteInfo(False, "", own_day.isoformat())

    def shift_start(self, day: str, shift: str) -> float | None:
        """Epoch seconds at which `shift` starts on local date `day` (for labelling buckets)."""
        for name, start, _end, _days, _breaks in self._shifts:
            if name == shift:
                d = date.fromisoformat(day)
                local = datetime(d.year, d.month, d.day, start // 60, start % 60, tzinfo=self.zone)
                return local.timestamp()
        return None


def _inside(start: int, length: int, at: int) -> bool:
    """A break's start (minutes of the day) lies within the shift."""
    return 0 <= (at - start) % 1440 < length
