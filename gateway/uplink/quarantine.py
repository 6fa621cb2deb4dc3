"""Quarantine: Things and anomalies the aggregator refuses, set aside so the rest keeps flowing.

When the aggregator answers a batch with `403 foreign_thing` (the Thing belongs to another gateway)
or a `400` naming Things (a value it can never accept), the forwarder holds those Things here and
sends the batch again without them. Their points stay in the buffer (the gateway's own history is
untouched); the quarantine records which outbox ranges held points of each Thing, so an admin can
later have them sent (`resend`, e.g. after transferring the Thing at the aggregator) or give them up
(`drop`). A held anomaly is simply not sent.

Kept in `<data_dir>/quarantine.sqlite` (a restart keeps it); every call runs on the file's own
worker thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import sqlite_utils

from gateway.sqlite import SqliteWorker

State = Literal["held", "resend"]


@dataclass(frozen=True)
class Held:
    """A Thing (or an anomaly, `kind`) set aside: why, since when, and how many points wait."""

    id: str
    kind: Literal["thing", "anomaly"]
    reason: str
    since: float
    state: State
    points: int = 0
    ranges: int = 0

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "kind": self.kind, "reason": self.reason, "since": self.since, "state": self.state,
                "points": self.points, "ranges": self.ranges}


@dataclass(frozen=True)
class Range:
    """Points of one Thing in the outbox ids `(lo, hi]` that were left out of a batch."""

    thing_id: str
    lo: int
    hi: int
    points: int


_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS held (id TEXT PRIMARY KEY, kind TEXT NOT NULL, reason TEXT NOT NULL, "
    "since REAL NOT NULL, state TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS ranges (thing_id TEXT NOT NULL, lo INTEGER NOT NULL, hi INTEGER NOT NULL, "
    "points INTEGER NOT NULL, PRIMARY KEY (thing_id, lo, hi))",
]


class Quarantine:
    """What the forwarder holds back; `held` is the in-memory copy it filters batches with."""

    def __init__(self, data_dir: Path) -> None:
        self._db = SqliteWorker(data_dir / "quarantine.sqlite")
        self.held: dict[str, Held] = {}

    async def start(self) -> None:
        def create(db: sqlite_utils.Database) -> None:
            for statement in _SCHEMA:
                db.execute(statement)

        await self._db.open()
        await self._db.call(create)
        await self._reload()

    async def stop(self) -> None:
        await self._db.close()

    async def _reload(self) -> None:
        def load(db: sqlite_utils.Database) -> dict[str, Held]:
            rows = db.execute(
                "SELECT h.id, h.kind, h.reason, h.since, h.state, coalesce(sum(r.points), 0), count(r.lo) "
                "FROM held h LEFT JOIN ranges r ON r.thing_id = h.id GROUP BY h.id ORDER BY h.since, h.id").fetchall()
            return {r[0]: Held(r[0], r[1], r[2], float(r[3]), r[4], int(r[5]), int(r[6])) for r in rows}

        self.held = await self._db.call(load)

    # ----------------------------------------------------------------- what the forwarder asks
    def holds_thing(self, thing_id: str) -> bool:
        h = self.held.get(thing_id)
        return h is not None and h.kind == "thing" and h.state == "held"

    def holds_anomaly(self, anomaly_id: str) -> bool:
        h = self.held.get(anomaly_id)
        return h is not None and h.kind == "anomaly" and h.state == "held"

    @property
    def points(self) -> int:
        return sum(h.points for h in self.held.values())

    async def hold(self, thing_ids: list[str], anomaly_ids: list[str], reason: str) -> list[str]:
        """Set Things and anomalies aside (again, for ones being re-sent); returns those not held before."""
        now = time.time()
        rows = [(t, "thing") for t in thing_ids] + [(a, "anomaly") for a in anomaly_ids]

        def write(db: sqlite_utils.Database) -> list[str]:
            new = []
            with db.conn:
                for ident, kind in rows:
                    if self.holds_thing(ident) or self.holds_anomaly(ident):
                        continue
                    cur = db.execute("UPDATE held SET state = 'held', reason = ? WHERE id = ?", [reason[:300], ident])
                    if cur.rowcount == 0:
                        db.execute("INSERT INTO held VALUES (?, ?, ?, ?, 'held')", [ident, kind, reason[:300], now])
                    new.append(ident)
            return new

        added = await self._db.call(write)
        await self._reload()
        return added

    async def record(self, ranges: list[Range]) -> None:
        """Outbox ranges whose points of held Things were left out (written before the batch is sent)."""
        if not ranges:
            return

        def write(db: sqlite_utils.Database) -> None:
            with db.conn:
                db.conn.executemany("INSERT OR REPLACE INTO ranges VALUES (?, ?, ?, ?)",
                                    [(r.thing_id, r.lo, r.hi, r.points) for r in ranges])

        await self._db.call(write)
        await self._reload()

    def resending(self) -> str | None:
        """A Thing an admin asked to re-send, if any."""
        return next((h.id for h in self.held.values() if h.state == "resend" and h.kind == "thing"), None)

    async def first_range(self, thing_id: str) -> Range | None:
        def read(db: sqlite_utils.Database) -> Range | None:
            row = db.execute("SELECT thing_id, lo, hi, points FROM ranges WHERE thing_id = ? ORDER BY lo LIMIT 1",
                             [thing_id]).fetchone()
            return None if row is None else Range(row[0], int(row[1]), int(row[2]), int(row[3]))

        return await self._db.call(read)

    async def sent(self, rng: Range | None, thing_id: str) -> None:
        """The aggregator confirmed a re-sent range (or there was none left): forget it, and the Thing
        once nothing of it is left and it is still being re-sent."""
        def write(db: sqlite_utils.Database) -> None:
            with db.conn:
                if rng is not None:
                    db.execute("DELETE FROM ranges WHERE thing_id = ? AND lo = ? AND hi = ?", [rng.thing_id, rng.lo,
                                                                                             rng.hi])
                left = db.execute("SELECT count(*) FROM ranges WHERE thing_id = ?", [thing_id]).fetchone()[0]
                if not left:
                    db.execute("DELETE FROM held WHERE id = ? AND state = 'resend'", [thing_id])

        await self._db.call(write)
        await self._reload()

    # ----------------------------------------------------------------- what an admin does
    async def resend(self, ident: str) -> Held | None:
        """Send a held Thing's points (and let its new ones through) or let a held anomaly go up again."""
        h = self.held.get(ident)
        if h is None:
            return None

        def write(db: sqlite_utils.Database) -> None:
            with db.conn:
                if h.kind == "anomaly":
                    db.execute("DELETE FROM held WHERE id = ?", [ident])
                else:
                    db.execute("UPDATE held SET state = 'resend' WHERE id = ?", [ident])

        await self._db.call(write)
        await self._reload()
        return h

    async def drop(self, ident: str) -> Held | None:
        """Give up what is held of a Thing or an anomaly: it is not sent (the gateway's own history keeps
        the points); the Thing's new points are sent again (and held again if still refused)."""
        h = self.held.get(ident)
        if h is None:
            return None

        def write(db: sqlite_utils.Database) -> None:
            with db.conn:
                db.execute("DELETE FROM ranges WHERE thing_id = ?", [ident])
                db.execute("DELETE FROM held WHERE id = ?", [ident])

        await self._db.call(write)
        await self._reload()
        return h
