"""OEE across sites at the aggregator: the period records and state events gateways forward, kept in
`<aggregator.data_dir>/oee.sqlite`, and `GET /api/v1/oee` and `GET /api/v1/downtime` over them.

A record carries its machine's whole totals so far; the newest `updated_at` wins, so a repeated or
late record never counts twice. A line's, a site's or the fleet's figures are the sums of their
machines' records put through the one set of formulas (`gateway.common.oee`): the time-weighted
combination of their lines.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from gateway.common.errors import Invalid
from gateway.common.history import parse_time
from gateway.common.oee import STOP_STATES, SUMMED, Totals, downtime_answer, oee_answer
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


def _where(scope: str, scope_id: str) -> tuple[str, list[Any]]:
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
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="aggregator-oee")
        self._conn: sqlite3.Connection | None = None

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            assert self._conn is not None, "CentralOee.open() was not awaited"
            return fn(self._conn)

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    async def open(self) -> None:
        def open_() -> None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(SCHEMA)

        await asyncio.get_running_loop().run_in_executor(self._executor, open_)

    async def close(self) -> None:
        def close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._executor, close)
        self._executor.shutdown(wait=True)

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
        where, args = _where(scope, scope_id)
        first = {"hour": "hour", "day": "day", "shift": "day", "none": "''"}[by]
        group = {"hour": "hour", "day": "day", "shift": "day, shift", "none": "''"}[by]
        sums = ", ".join(f"SUM({k}) AS {k}" for k in SUMMED)

        def run(conn: sqlite3.Connection) -> list[tuple[tuple[Any, ...], Totals]]:
            cur = conn.execute(
                f"SELECT {first} AS k1, {'shift' if by == 'shift' else 'NULL'} AS k2, MIN(hour) AS first_hour, {sums} "
                f"FROM oee_periods WHERE {where} AND planned = 1 AND hour >= ? AND hour < ? GROUP BY {group} "
                "ORDER BY first_hour", (*args, start, end))
            names = [d[0] for d in cur.description]
            return [((r[0], r[1], r[2]), Totals.of(dict(zip(names, r, strict=True)))) for r in cur.fetchall()]

        return await self._call(run)

    async def minor_stops(self, scope: str, scope_id: str, start: float, end: float, limit_s: float) -> float:
        where, args = _where(scope, scope_id)

        def run(conn: sqlite3.Connection) -> float:
            row = conn.execute(f"SELECT SUM(planned_s) FROM oee_events WHERE {where} AND start >= ? AND start < ? "
                               "AND state IN ('down', 'offline') AND \"end\" - start < ?",
                               (*args, start, end, limit_s)).fetchone()
            return float(row[0] or 0.0)

        return await self._call(run)

    async def pareto(self, scope: str, scope_id: str, start: float, end: float,
                     states: tuple[str, ...]) -> list[tuple[str, str, float, int]]:
        where, args = _where(scope, scope_id)

        def run(conn: sqlite3.Connection) -> list[tuple[str, str, float, int]]:
            return [(r[0], r[1], r[2], r[3]) for r in conn.execute(
                f"SELECT reason, state, SUM(planned_s) AS s, COUNT(*) FROM oee_events WHERE {where} AND start >= ? "
                f"AND start < ? AND state IN ({', '.join('?' for _ in states)}) AND planned_s > 0 "
                "GROUP BY reason, state ORDER BY s DESC", (*args, start, end, *states))]

        return await self._call(run)


def _request(q: Mapping[str, str], allowed: set[str]) -> tuple[str, str, float, float]:
    unknown = sorted(set(q) - allowed)
    if unknown:
        raise Invalid(f"unknown parameter(s) {', '.join(unknown)}")
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
    return scope, scope_id, start - start % 3600.0, end


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

    return [("GET", "/api/v1/oee", get_oee, "viewer"), ("GET", "/api/v1/downtime", get_downtime, "viewer")]
