"""Dead letters: every rejected MQTT message, with reason, topic, first 256 bytes and time.

Rejections are queued in memory (bounded; overflow counted) and written to the registry's SQLite
file in batches, so a flood of bad input costs one insert per batch, never one per message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from gateway.common.sqlite import SqliteWorker
from gateway.common.tasks import cancel_and_wait
from gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)
TABLE = "dead_letters"
HEAD_BYTES = 256
LOG_EVERY_S = 60.0


@dataclass(frozen=True, slots=True)
class DeadLetter:
    received: float
    reason: str
    topic: str
    payload: bytes
    detail: str


class DeadLetterLog:
    """Counts, logs (once a minute per reason) and stores rejected messages."""

    def __init__(self, sqlite: SqliteWorker, metrics: GatewayMetrics, *, keep: int = 10_000,
                 flush_interval_s: float = 1.0) -> None:
        self._sqlite = sqlite
        self._metrics = metrics
        self._keep = keep
        self._interval = flush_interval_s
        self._pending: deque[DeadLetter] = deque()
        self._max_pending = max(keep, 1000)
        self._last_logged: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        self.total = 0

    def add(self, reason: str, topic: str, payload: bytes, detail: str) -> None:
        """Record one rejection; never raises, never blocks."""
        self.total += 1
        self._metrics.rejected.labels(reason).inc()
        now = time.time()
        if now - self._last_logged.get(reason, 0.0) >= LOG_EVERY_S:
            self._last_logged[reason] = now
            log.warning("rejected MQTT message", extra={"reason": reason, "topic": topic[:200], "detail": detail})
        if len(self._pending) >= self._max_pending:
            self._metrics.dead_letter_overflow.inc()
            return
        self._pending.append(DeadLetter(now, reason, topic[:512], bytes(payload[:HEAD_BYTES]), detail[:500]))

    async def start(self) -> None:
        await self._sqlite.call(_create)
        self._task = asyncio.create_task(self._loop(), name="dead-letter-flush")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        await self.flush()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.flush()
            except Exception:  # disk trouble: keep the service running, retry next tick
                log.exception("dead-letter flush failed")

    async def flush(self) -> None:
        if not self._pending:
            return
        batch = list(self._pending)
        self._pending.clear()
        keep = self._keep
        await self._sqlite.call(lambda db: _insert(db, batch, keep))

    async def recent(self, limit: int = 100, reason: str | None = None) -> list[dict[str, Any]]:
        """The newest stored dead letters (payload head as text with undecodable bytes escaped)."""
        await self.flush()
        return await self._sqlite.call(lambda db: _recent(db, limit, reason))


def _create(db: sqlite_utils.Database) -> None:
    db.conn.execute(
        f"CREATE TABLE IF NOT EXISTS {TABLE} (id INTEGER PRIMARY KEY AUTOINCREMENT, received REAL, "
        "reason TEXT, topic TEXT, payload BLOB, detail TEXT)"
    )


def _insert(db: sqlite_utils.Database, batch: list[DeadLetter], keep: int) -> None:
    conn = db.conn
    conn.execute("BEGIN")
    try:
        conn.executemany(
            f"INSERT INTO {TABLE} (received, reason, topic, payload, detail) VALUES (?, ?, ?, ?, ?)",
            [(d.received, d.reason, d.topic, d.payload, d.detail) for d in batch],
        )
        conn.execute(f"DELETE FROM {TABLE} WHERE id <= (SELECT MAX(id) FROM {TABLE}) - ?", (keep,))
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _recent(db: sqlite_utils.Database, limit: int, reason: str | None) -> list[dict[str, Any]]:
    sql = f"SELECT id, received, reason, topic, payload, detail FROM {TABLE}"
    args: list[Any] = []
    if reason:
        sql += " WHERE reason = ?"
        args.append(reason)
    sql += " ORDER BY id DESC LIMIT ?"
    args.append(limit)
    out = []
    for row in db.conn.execute(sql, args):
        out.append({
            "id": row[0], "received": row[1], "reason": row[2], "topic": row[3],
            "payload": bytes(row[4]).decode("utf-8", "backslashreplace"), "detail": row[5],
        })
    return out
