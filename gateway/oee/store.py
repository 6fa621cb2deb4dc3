"""The OEE tables in their own SQLite file (`<data_dir>/oee.sqlite`): period records, state events, counters.

Plain functions over a connection, run on the tracker's SQLite worker thread. Period records are
added to (`ON CONFLICT DO UPDATE SET x = x + excluded.x`), so a flush writes only what changed;
state events are written whole. A reason edited later changes an event's reason, never its times.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.common.oee import SUMMED, Totals, minor_stop_s, period_totals, stop_pareto
from gateway.common.wire import OeeEventDoc, OeePeriodDoc
from gateway.oee.machine import Period, PeriodKey, StateEvent

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS oee_periods (
    thing_id TEXT NOT NULL, line TEXT NOT NULL, hour REAL NOT NULL, day TEXT NOT NULL, shift TEXT NOT NULL,
    planned INTEGER NOT NULL, {", ".join(f"{k} REAL NOT NULL DEFAULT 0" for k in SUMMED)},
    updated_at REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (thing_id, hour, day, shift, planned)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS oee_periods_line ON oee_periods (line, hour);
CREATE INDEX IF NOT EXISTS oee_periods_hour ON oee_periods (hour);
CREATE TABLE IF NOT EXISTS oee_events (
    id TEXT PRIMARY KEY, thing_id TEXT NOT NULL, line TEXT NOT NULL, state TEXT NOT NULL,
    start REAL NOT NULL, "end" REAL NOT NULL, source TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
    note TEXT NOT NULL DEFAULT '', reason_by TEXT NOT NULL DEFAULT '', reason_at REAL,
    planned_s REAL NOT NULL DEFAULT 0, open INTEGER NOT NULL DEFAULT 0, updated_at REAL NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS oee_events_start ON oee_events (start);
CREATE INDEX IF NOT EXISTS oee_events_thing ON oee_events (thing_id, start);
CREATE INDEX IF NOT EXISTS oee_events_updated ON oee_events (updated_at);
CREATE INDEX IF NOT EXISTS oee_events_pareto ON oee_events (line, start, state, reason, planned_s);
CREATE INDEX IF NOT EXISTS oee_periods_updated ON oee_periods (updated_at);
CREATE TABLE IF NOT EXISTS oee_counters (
    thing_id TEXT NOT NULL, path TEXT NOT NULL, value REAL NOT NULL, PRIMARY KEY (thing_id, path));
"""
EVENT_COLUMNS = ("id", "thing_id", "line", "state", "start", "end", "source", "reason", "note", "reason_by",
                 "planned_s", "open")


@dataclass(frozen=True)
class Scope:
    """What a query covers: one machine (a Thing id), one line, or the whole site."""

    kind: str  # machine | line | site
    id: str

    def where(self) -> tuple[str, list[Any]]:
        if self.kind == "machine":
            return "thing_id = ?", [self.id]
        if self.kind == "line":
            return "line = ?", [self.id]
        return "1 = 1", []


def init(conn: sqlite3.Connection, now: float) -> None:
    """Create the tables; events a crash left open end where they were last accounted."""
    conn.executescript(SCHEMA)
    conn.execute("UPDATE oee_events SET open = 0 WHERE open = 1")


def write(conn: sqlite3.Connection, periods: Mapping[PeriodKey, Period], events: Iterable[StateEvent],
          counters: Iterable[tuple[str, str, float]], now: float) -> None:
    """One transaction: add the periods, upsert the events (keeping reasons set through the API), keep the counters.
    `now` marks what changed, for the uplink."""
    cols = ", ".join(SUMMED)
    marks = ", ".join("?" for _ in SUMMED)
    adds = ", ".join(f"{k} = {k} + excluded.{k}" for k in SUMMED)
    with conn:
        conn.executemany(
            f"INSERT INTO oee_periods (thing_id, line, hour, day, shift, planned, {cols}, updated_at) "
            f"VALUES (?, ?, ?, ?, ?, ?, {marks}, ?) "
            f"ON CONFLICT (thing_id, hour, day, shift, planned) DO UPDATE SET {adds}, updated_at = excluded.updated_at",
            [(k.thing_id, k.line, k.hour, k.day, k.shift, int(k.planned), *(getattr(p, f) for f in SUMMED), now)
             for k, p in periods.items()])
        conn.executemany(
            'INSERT INTO oee_events (id, thing_id, line, state, start, "end", source, reason, note, reason_by, '
            "planned_s, open, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE "
            'SET "end" = excluded."end", planned_s = excluded.planned_s, open = excluded.open, '
            "updated_at = excluded.updated_at",
            [(e.id, e.thing_id, e.line, e.state, e.start, e.end, e.source, e.reason, e.note, e.reason_by,
              e.planned_s, int(e.open), now) for e in events])
        conn.executemany("INSERT OR REPLACE INTO oee_counters (thing_id, path, value) VALUES (?, ?, ?)",
                         list(counters))


def changed_since(conn: sqlite3.Connection, since: float) -> tuple[list[OeePeriodDoc], list[OeeEventDoc], float]:
    """Period records and events written after `since`, as they travel upstream, and the newest write time."""
    cols = ", ".join(SUMMED)
    periods = [OeePeriodDoc(r[0], r[1], r[2], r[3], r[4], bool(r[5]), dict(zip(SUMMED, r[6:-1], strict=True)), r[-1])
               for r in conn.execute(f"SELECT thing_id, line, hour, day, shift, planned, {cols}, updated_at "
                                     "FROM oee_periods WHERE updated_at > ?", (since,))]
    events = []
    for r in conn.execute('SELECT id, thing_id, line, state, start, "end", planned_s, reason, source, updated_at '
                          "FROM oee_events WHERE updated_at > ?", (since,)):
        doc = {"id": r[0], "thingId": r[1], "line": r[2], "state": r[3], "start": r[4], "end": r[5],
               "plannedS": r[6], "reason": r[7], "source": r[8], "updatedAt": r[9]}
        events.append(OeeEventDoc(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[9], doc))
    upto = max([since, *(p.updated_at for p in periods), *(e.updated_at for e in events)])
    return periods, events, upto


def counters(conn: sqlite3.Connection) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for thing_id, path, value in conn.execute("SELECT thing_id, path, value FROM oee_counters"):
        out.setdefault(thing_id, {})[path] = value
    return out


def totals(conn: sqlite3.Connection, scope: Scope, start: float, end: float,
           by: str) -> list[tuple[tuple[Any, ...], Totals]]:
    """Summed planned periods whose hour starts in [start, end), grouped by `by` (hour, day, shift, none)."""
    return period_totals(conn, scope.where(), start, end, by)


def events(conn: sqlite3.Connection, scope: Scope, start: float, end: float, states: Sequence[str] = (),
           limit: int = 10000) -> list[dict[str, Any]]:
    """State events overlapping [start, end), oldest first."""
    where, args = scope.where()
    state_sql = f" AND state IN ({', '.join('?' for _ in states)})" if states else ""
    cur = conn.execute(
        f'SELECT {", ".join(f"{chr(34)}{c}{chr(34)}" for c in EVENT_COLUMNS)}, reason_at FROM oee_events '
        f'WHERE {where} AND start < ? AND "end" >= ?{state_sql} ORDER BY start LIMIT ?',
        (*args, end, start, *states, limit))
    names = [*EVENT_COLUMNS, "reason_at"]
    return [dict(zip(names, row, strict=True)) for row in cur]


def pareto(conn: sqlite3.Connection, scope: Scope, start: float, end: float,
           states: Sequence[str]) -> list[tuple[str, str, float, int]]:
    """(reason, state, planned seconds, events) of the stops that started in [start, end), largest first."""
    return stop_pareto(conn, scope.where(), start, end, states)


def minor_stops(conn: sqlite3.Connection, scope: Scope, start: float, end: float, limit_s: float) -> float:
    """Planned seconds of the down and offline stops shorter than `limit_s` that started in [start, end)."""
    return minor_stop_s(conn, scope.where(), start, end, limit_s)


def set_reason(conn: sqlite3.Connection, event_id: str, reason: str, note: str, by: str,
               at: float) -> dict[str, Any] | None:
    """Set or correct an event's reason; None when there is no such event."""
    with conn:
        cur = conn.execute("UPDATE oee_events SET reason = ?, note = ?, reason_by = ?, reason_at = ?, updated_at = ? "
                           "WHERE id = ?", (reason, note, by, at, at, event_id))
    if cur.rowcount == 0:
        return None
    row = conn.execute(f'SELECT {", ".join(f"{chr(34)}{c}{chr(34)}" for c in EVENT_COLUMNS)}, reason_at '
                       "FROM oee_events WHERE id = ?", (event_id,)).fetchone()
    return dict(zip([*EVENT_COLUMNS, "reason_at"], row, strict=True))


def prune(conn: sqlite3.Connection, before: float) -> None:
    with conn:
        conn.execute("DELETE FROM oee_periods WHERE hour < ?", (before,))
        conn.execute('DELETE FROM oee_events WHERE "end" < ? AND open = 0', (before,))
