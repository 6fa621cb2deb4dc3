"""AlarmJournal: every operator action on an anomaly (acknowledged, resolved, shelved, unshelved) with
who, when and their comment, and the shelves that silence a known condition (a Thing and an anomaly
type) for some hours, with who and why. Its own SQLite file (`<data_dir>/alarms.sqlite`), beside the
anomaly log, which keeps the anomalies themselves.

While a shelf is active the detector's notification sinks stay quiet for its condition (`silenced`,
answered from memory on the event loop); every change is reported to `on_change` with the anomalies
and conditions it concerns, so the uplink sends them again with their journal and shelf.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.common.sqlite import SqliteWorker
from gateway.common.timefmt import iso_utc

SCHEMA = """
CREATE TABLE IF NOT EXISTS alarm_actions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, anomaly_id TEXT NOT NULL, at REAL NOT NULL, action TEXT NOT NULL,
    by TEXT NOT NULL, comment TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS alarm_actions_anomaly ON alarm_actions (anomaly_id, at);
CREATE TABLE IF NOT EXISTS alarm_shelves (
    id TEXT PRIMARY KEY, thing_id TEXT NOT NULL, anomaly_type TEXT NOT NULL, since REAL NOT NULL,
    until REAL NOT NULL, by TEXT NOT NULL, reason TEXT NOT NULL, ended_at REAL, ended_by TEXT);
CREATE INDEX IF NOT EXISTS alarm_shelves_until ON alarm_shelves (until);
"""
ACTIONS = ("acknowledged", "resolved", "shelved", "unshelved")
MAX_SHELVE_HOURS = 24 * 30
Condition = tuple[str, str]  # (Thing id, anomaly type)
# what changed: these anomalies, and every anomaly of these conditions
OnChange = Callable[[Sequence[str], Sequence[Condition]], Awaitable[None]]


@dataclass(frozen=True)
class Action:
    anomaly_id: str
    at: float
    action: str
    by: str
    comment: str

    def to_json(self) -> dict[str, Any]:
        return {"anomalyId": self.anomaly_id, "at": iso_utc(self.at), "action": self.action, "by": self.by,
                "comment": self.comment}


@dataclass(frozen=True)
class Shelf:
    """A known condition silenced until `until`."""

    id: str
    thing_id: str
    anomaly_type: str
    since: float
    until: float
    by: str
    reason: str
    ended_at: float | None = None
    ended_by: str | None = None

    def active(self, now: float) -> bool:
        return self.ended_at is None and self.since <= now < self.until

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "thingId": self.thing_id, "anomalyType": self.anomaly_type,
                "since": iso_utc(self.since), "until": iso_utc(self.until), "by": self.by, "reason": self.reason,
                "endedAt": iso_utc(self.ended_at) if self.ended_at is not None else None, "endedBy": self.ended_by}


class AlarmJournal:
    """Operator actions and shelves, in their own SQLite file on its own thread."""

    def __init__(self, path: Path, on_change: OnChange | None = None) -> None:
        self._db = SqliteWorker(path)
        self._on_change = on_change
        self._active: dict[str, Shelf] = {}  # shelves not ended, by id; expired ones are skipped when read

    async def start(self) -> None:
        await self._db.open()
        await self._db.call(lambda db: db.conn.executescript(SCHEMA))
        self._active = {s.id: s for s in await self.shelves(active_at=time.time())}

    def silenced(self, thing_id: str, anomaly_type: str, now: float) -> bool:
        """Whether a shelf silences this condition at `now` (from memory: the detector asks per event)."""
        return any(s.thing_id == thing_id and s.anomaly_type == anomaly_type and s.active(now)
                   for s in self._active.values())

    def shelf_of(self, thing_id: str, anomaly_type: str, now: float) -> Shelf | None:
        """The shelf silencing this condition at `now`, the one ending last when there are several."""
        shelves = [s for s in self._active.values()
                   if s.thing_id == thing_id and s.anomaly_type == anomaly_type and s.active(now)]
        return max(shelves, key=lambda s: s.until, default=None)

    async def _changed(self, anomaly_ids: Sequence[str], conditions: Sequence[Condition] = ()) -> None:
        if self._on_change is not None:
            await self._on_change(anomaly_ids, conditions)

    async def stop(self) -> None:
        await self._db.close()

    async def record(self, anomaly_id: str, action: str, by: str, comment: str = "", at: float | None = None,
                     once: bool = False) -> None:
        """Add an action; with `once`, not when the anomaly already has this action by `by` with `comment`."""
        when = time.time() if at is None else at

        def run(conn: sqlite3.Connection) -> None:
            with conn:
                if once and conn.execute("SELECT 1 FROM alarm_actions WHERE anomaly_id = ? AND action = ? AND by = ? "
                                         "AND comment = ?", (anomaly_id, action, by, comment)).fetchone():
                    return
                conn.execute("INSERT INTO alarm_actions (anomaly_id, at, action, by, comment) VALUES (?, ?, ?, ?, ?)",
                             (anomaly_id, when, action, by, comment))

        await self._db.call(lambda db: run(db.conn))
        await self._changed([anomaly_id])

    async def actions(self, anomaly_id: str) -> list[Action]:
        rows = await self._db.call(lambda db: db.conn.execute(
            "SELECT anomaly_id, at, action, by, comment FROM alarm_actions WHERE anomaly_id = ? ORDER BY at, id",
            (anomaly_id,)).fetchall())
        return [Action(*r) for r in rows]

    async def actions_of(self, anomaly_ids: Sequence[str], newest: int) -> dict[str, list[Action]]:
        """The `newest` actions of each anomaly, oldest first, by anomaly id."""
        def run(conn: sqlite3.Connection) -> dict[str, list[Action]]:
            out: dict[str, list[Action]] = {}
            for start in range(0, len(anomaly_ids), 500):
                chunk = list(anomaly_ids[start:start + 500])
                rows = conn.execute(
                    "SELECT anomaly_id, at, action, by, comment FROM (SELECT *, row_number() OVER (PARTITION BY "
                    "anomaly_id ORDER BY at DESC, id DESC) AS n FROM alarm_actions WHERE anomaly_id IN "
                    f"({', '.join('?' * len(chunk))})) WHERE n <= ? ORDER BY at, id", (*chunk, newest)).fetchall()
                for r in rows:
                    out.setdefault(r[0], []).append(Action(*r))
            return out

        return await self._db.call(lambda db: run(db.conn))

    async def shelve(self, anomaly_id: str, thing_id: str, anomaly_type: str, hours: float, by: str,
                     reason: str) -> Shelf:
        now = time.time()
        shelf = Shelf(uuid.uuid4().hex, thing_id, anomaly_type, now, now + hours * 3600.0, by, reason)

        def run(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute("INSERT INTO alarm_shelves (id, thing_id, anomaly_type, since, until, by, reason) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)", (shelf.id, thing_id, anomaly_type, shelf.since,
                                                             shelf.until, by, reason))
                conn.execute("INSERT INTO alarm_actions (anomaly_id, at, action, by, comment) VALUES (?, ?, ?, ?, ?)",
                             (anomaly_id, now, "shelved", by, f"{hours:g} h: {reason}"))

        await self._db.call(lambda db: run(db.conn))
        self._active = {k: v for k, v in self._active.items() if v.until > now}
        self._active[shelf.id] = shelf
        await self._changed([anomaly_id], [(thing_id, anomaly_type)])
        return shelf

    async def unshelve(self, shelf_id: str, by: str, anomaly_id: str = "") -> Shelf | None:
        now = time.time()

        def run(conn: sqlite3.Connection) -> Shelf | None:
            with conn:
                cur = conn.execute("UPDATE alarm_shelves SET ended_at = ?, ended_by = ? WHERE id = ? AND "
                                   "ended_at IS NULL", (now, by, shelf_id))
                if cur.rowcount and anomaly_id:
                    conn.execute("INSERT INTO alarm_actions (anomaly_id, at, action, by, comment) "
                                 "VALUES (?, ?, 'unshelved', ?, '')", (anomaly_id, now, by))
            row = conn.execute("SELECT * FROM alarm_shelves WHERE id = ?", (shelf_id,)).fetchone()
            return Shelf(*row) if row else None

        shelf = await self._db.call(lambda db: run(db.conn))
        if shelf is not None and self._active.pop(shelf_id, None) is not None:
            await self._changed([anomaly_id] if anomaly_id else [], [(shelf.thing_id, shelf.anomaly_type)])
        return shelf

    async def shelves(self, *, active_at: float | None = None) -> list[Shelf]:
        """Every shelf, newest first; with `active_at`, only those silencing at that time."""
        def run(conn: sqlite3.Connection) -> list[Shelf]:
            if active_at is None:
                rows = conn.execute("SELECT * FROM alarm_shelves ORDER BY since DESC LIMIT 1000").fetchall()
            else:
                rows = conn.execute("SELECT * FROM alarm_shelves WHERE ended_at IS NULL AND since <= ? AND until > ? "
                                    "ORDER BY since DESC", (active_at, active_at)).fetchall()
            return [Shelf(*r) for r in rows]

        return await self._db.call(lambda db: run(db.conn))

    async def acknowledged_by(self, people: Sequence[str]) -> set[str]:
        """Anomaly ids someone in `people` acknowledged (at any time, also before a later resolution)."""
        marks = ", ".join("?" for _ in people)
        rows = await self._db.call(lambda db: db.conn.execute(
            f"SELECT DISTINCT anomaly_id FROM alarm_actions WHERE action = 'acknowledged' AND by IN ({marks})",
            tuple(people)).fetchall())
        return {r[0] for r in rows}
