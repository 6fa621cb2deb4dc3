"""AlarmJournal: every operator action on an anomaly (acknowledged, resolved, shelved, unshelved) with
who, when and their comment, and the shelves that silence a known condition (a Thing and an anomaly
type) for some hours, with who and why. Its own SQLite file (`<data_dir>/alarms.sqlite`), beside the
anomaly log, which keeps the anomalies themselves.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.common.timefmt import iso_utc
from gateway.sqlite import SqliteWorker

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

    def __init__(self, path: Path) -> None:
        self._db = SqliteWorker(path)

    async def start(self) -> None:
        await self._db.open()
        await self._db.call(lambda db: db.conn.executescript(SCHEMA))

    async def stop(self) -> None:
        await self._db.close()

    async def record(self, anomaly_id: str, action: str, by: str, comment: str = "", at: float | None = None) -> None:
        when = time.time() if at is None else at

        def run(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute("INSERT INTO alarm_actions (anomaly_id, at, action, by, comment) VALUES (?, ?, ?, ?, ?)",
                             (anomaly_id, when, action, by, comment))

        await self._db.call(lambda db: run(db.conn))

    async def actions(self, anomaly_id: str) -> list[Action]:
        rows = await self._db.call(lambda db: db.conn.execute(
            "SELECT anomaly_id, at, action, by, comment FROM alarm_actions WHERE anomaly_id = ? ORDER BY at, id",
            (anomaly_id,)).fetchall())
        return [Action(*r) for r in rows]

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

        return await self._db.call(lambda db: run(db.conn))

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
