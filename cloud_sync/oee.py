"""OEE across sites at the aggregator: the period records and state events gateways forward, kept in
`<aggregator.data_dir>/oee.sqlite`, and `GET /api/v1/oee`, `GET /api/v1/downtime` and
`GET /api/v1/oee/events` (the machines' state bands; reasons are set at the line's gateway) over them.

A record carries its machine's whole totals so far; the newest `updated_at` wins, so a repeated or
late record never counts twice. A line's, a site's or the fleet's figures are the sums of their
machines' records put through the one set of formulas (`gateway.common.oee`): the time-weighted
combination of their lines.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from gateway.common.errors import Invalid
from gateway.common.history import parse_time
from gateway.common.http import int_param, known_params
from gateway.common.oee import (
    STOP_STATES,
    SUMMED,
    Totals,
    Where,
    downtime_answer,
    minor_stop_s,
    oee_answer,
    period_totals,
    stop_pareto,
)
from gateway.common.sqlite import SqliteWorker
from gateway.common.timefmt import iso_utc
from gateway.common.wire import OEE_STATES, Batch

T = TypeVar("T")
MAX_RANGE_S = 400 * 86400.0
BY = ("shift", "hour", "day", "none")
DEFAULT_MICROSTOP_S = 300.0
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS oee_periods (
    site TEXT NOT NULL, line TEXT NOT NULL, gateway_id TEXT NOT NULL, thing_id TEXT NOT NULL, hour REAL NOT NULL,
    day TEXT NOT NULL, shift TEXT NOT NULL, planned INTEGER NOT NULL,
    {", ".join(f"{k} REAL NOT NULL DEFAULT 0" for k in SUMMED)}, updated_at REAL NOT NULL,
    PRIMARY KEY (thing_id, hour, day, shift, planned)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS oee_periods_site ON oee_periods (site, line, hour);
CREATE TABLE IF NOT EXISTS oee_events (
    id TEXT PRIMARY KEY, site TEXT NOT NULL, line TEXT NOT NULL, thing_id TEXT NOT NULL, state TEXT NOT NULL,
    start REAL NOT NULL, "end" REAL NOT NULL, planned_s REAL NOT NULL, reason TEXT NOT NULL,
    updated_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS oee_events_site ON oee_events (site, line, start);
"""


def foreign_oee(batch: Batch) -> str:
    """Why the OEE records of a batch are not its gateway's to write ("" when they are)."""
    prefix = f"{batch.site}:"
    for tid, line in [(p.thing_id, p.line) for p in batch.oee_periods] + [(e.thing_id, e.line)
                                                                             for e in batch.oee_events]:
        if not tid.startswith(prefix):
            return f"OEE record of Thing {tid[:80]!r} is not of site {batch.site}"
        if line != batch.line:
            return f"OEE record of {tid[:80]} names line {line[:64]!r}; this gateway writes {batch.line}"
    return ""


def _where(scope: str, scope_id: str) -> Where:
    if scope == "machine":
        return "thing_id = ?", [scope_id]
    if scope == "line":
        site, _, line = scope_id.partition("/")
        return "site = ? AND line = ?", [site, line]
    if scope == "site":
        return "site = ?", [scope_id]
    return "1 = 1", []


class CentralOee:
    """The aggregator's OEE records, on one SQLite thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._worker = SqliteWorker(path)

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._worker.call(lambda db: fn(db.conn))

    async def open(self) -> None:
        await self._worker.open()
        await self._call(lambda conn: conn.executescript(SCHEMA))

    async def close(self) -> None:
        await self._worker.close()

    async def apply(self, batch: Batch) -> None:
        """Keep the batch's records where they are newer than what is stored."""
        if not batch.oee_periods and not batch.oee_events:
            return
        cols = ", ".join(SUMMED)
        sets = ", ".join(f"{k} = excluded.{k}" for k in SUMMED)

        def run(conn: sqlite3.Connection) -> None:
            with conn:
                conn.executemany(
                    f"INSERT INTO oee_periods (site, line, gateway_id, thing_id, hour, day, shift, planned, {cols}, "
                    f"updated_at) VALUES ({', '.join('?' for _ in range(9 + len(SUMMED)))}) "
                    f"ON CONFLICT (thing_id, hour, day, shift, planned) DO UPDATE SET {sets}, "
                    "updated_at = excluded.updated_at, line = excluded.line, gateway_id = excluded.gateway_id "
                    "WHERE excluded.updated_at >= oee_periods.updated_at",
                    [(batch.site, p.line, batch.gateway_id, p.thing_id, p.hour, p.day, p.shift, int(p.planned),
                      *(p.totals[k] for k in SUMMED), p.updated_at) for p in batch.oee_periods])
                conn.executemany(
                    'INSERT INTO oee_events (id, site, line, thing_id, state, start, "end", planned_s, reason, '
                    "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                    '"end" = excluded."end", planned_s = excluded.planned_s, reason = excluded.reason, '
                    "updated_at = excluded.updated_at WHERE excluded.updated_at >= oee_events.updated_at",
                    [(f"{batch.site}/{e.id}", batch.site, e.line, e.thing_id, e.state, e.start, e.end, e.planned_s,
                      e.reason, e.updated_at) for e in batch.oee_events])

        await self._call(run)

    async def totals(self, scope: str, scope_id: str, start: float, end: float,
                     by: str) -> list[tuple[tuple[Any, ...], Totals]]:
        where = _where(scope, scope_id)
        return await self._call(lambda conn: period_totals(conn, where, start, end, by))

    async def minor_stops(self, scope: str, scope_id: str, start: float, end: float, limit_s: float) -> float:
        where = _where(scope, scope_id)
        return await self._call(lambda conn: minor_stop_s(conn, where, start, end, limit_s))

    async def events(self, scope: str, scope_id: str, start: float, end: float, states: tuple[str, ...],
                     limit: int) -> list[dict[str, Any]]:
        """State events overlapping [start, end), oldest first, as the viewer's state band reads them."""
        where, args = _where(scope, scope_id)
        state_sql = f" AND state IN ({', '.join('?' for _ in states)})" if states else ""

        def run(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            cur = conn.execute(
                f'SELECT id, site, line, thing_id, state, start, "end", planned_s, reason FROM oee_events '
                f'WHERE {where} AND start < ? AND "end" >= ?{state_sql} ORDER BY start LIMIT ?',
                (*args, end, start, *states, limit))
            return [{"id": r[0], "site": r[1], "line": r[2], "thingId": r[3], "state": r[4], "start": iso_utc(r[5]),
                     "end": iso_utc(r[6]), "durationS": round(r[6] - r[5], 3), "plannedS": round(r[7], 3),
                     "reason": r[8]} for r in cur]

        return await self._call(run)

    async def pareto(self, scope: str, scope_id: str, start: float, end: float,
                     states: tuple[str, ...]) -> list[tuple[str, str, float, int]]:
        where = _where(scope, scope_id)
        return await self._call(lambda conn: stop_pareto(conn, where, start, end, states))


def _request(q: Mapping[str, str], allowed: set[str], *, by_hour: bool = True) -> tuple[str, str, float, float]:
    """Scope, its id and the range; with `by_hour` the range starts at the full hour (period records are
    hourly)."""
    known_params(q, allowed)
    scope = q.get("scope", "all")
    if scope not in ("machine", "line", "site", "all"):
        raise Invalid("scope must be machine, line, site or all")
    scope_id = q.get("id", "")
    if scope != "all" and not scope_id:
        raise Invalid(f"scope={scope} needs an id" + (" (site/line)" if scope == "line" else ""))
    if scope == "line" and "/" not in scope_id:
        raise Invalid("a line's id is site/line, e.g. izmir-bakery/line-a")
    end = parse_time(q["to"], "to") if q.get("to") else time.time()
    start = parse_time(q["from"], "from") if q.get("from") else end - 86400.0
    if not start < end:
        raise Invalid("from must be before to")
    if end - start > MAX_RANGE_S:
        raise Invalid("the range may span at most 400 days")
    return scope, scope_id, start - start % 3600.0 if by_hour else start, end


def _microstop(value: str | None) -> float:
    """`microstopS`: stops shorter than this are minor stops (default 300 s, the gateways' default)."""
    if value is None or value == "":
        return DEFAULT_MICROSTOP_S
    try:
        limit = float(value)
    except ValueError:
        raise Invalid("microstopS must be a number of seconds") from None
    if not 0 <= limit <= 3600:
        raise Invalid("microstopS must be 0..3600")
    return limit


def routes(oee: CentralOee) -> list[tuple[str, str, Callable[[web.Request], Any], str]]:
    """The aggregator's OEE routes: (method, path, handler, least role)."""

    async def get_oee(request: web.Request) -> web.Response:
        """OEE of a machine, a line (site/line), a site or every site, per shift, hour or day."""
        by = request.query.get("by", "shift")
        if by not in BY:
            raise Invalid(f"by must be one of {', '.join(BY)}")
        scope, scope_id, start, end = _request(request.query, {"scope", "id", "from", "to", "by"})
        rows = await oee.totals(scope, scope_id, start, end, by)
        return web.json_response(oee_answer(scope, scope_id, start, end, by, rows))

    async def get_downtime(request: web.Request) -> web.Response:
        """The six big losses and the stops by reason, across sites."""
        states = tuple(s for s in request.query.get("state", ",".join(STOP_STATES)).split(",") if s)
        if not states or any(s not in OEE_STATES or s == "running" for s in states):
            raise Invalid(f"state: one or more of {', '.join(s for s in OEE_STATES if s != 'running')}")
        scope, scope_id, start, end = _request(request.query, {"scope", "id", "from", "to", "state", "microstopS"})
        limit = _microstop(request.query.get("microstopS"))
        rows = await oee.totals(scope, scope_id, start, end, "none")
        total = rows[0][1] if rows else Totals()
        return web.json_response(downtime_answer(scope, scope_id, start, end, total,
                                                 await oee.pareto(scope, scope_id, start, end, states),
                                                 await oee.minor_stops(scope, scope_id, start, end, limit)))

    async def get_events(request: web.Request) -> web.Response:
        """State events overlapping the range, oldest first: the state bands of a line, a site or a machine."""
        q = request.query
        states = tuple(s for s in q.get("state", "").split(",") if s)
        if any(s not in OEE_STATES for s in states):
            raise Invalid(f"state: one or more of {', '.join(OEE_STATES)}")
        scope, scope_id, start, end = _request(q, {"scope", "id", "from", "to", "state", "limit"}, by_hour=False)
        limit = int_param(q.get("limit"), "limit", 5000, 1, 50000)
        return web.json_response({"items": await oee.events(scope, scope_id, start, end, states, limit),
                                  "limit": limit})

    return [("GET", "/api/v1/oee", get_oee, "viewer"), ("GET", "/api/v1/downtime", get_downtime, "viewer"),
            ("GET", "/api/v1/oee/events", get_events, "viewer")]
