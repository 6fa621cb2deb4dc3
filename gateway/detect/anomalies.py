"""The anomaly log: every anomaly from open to resolved, in SQLite, with operators' notes and labels.

Kept in its own file next to the registry so its writes never wait for twin flushes. Anomalies that
operators marked as false positives stay (labelled), because retraining learns from them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlite_utils

from gateway.common.sqlite import SqliteWorker
from gateway.detect.core import Anomaly

TABLE = "anomalies"
STATES = ("open", "acknowledged", "resolved")
_COLUMNS = {
    "id": str, "thing_id": str, "thing_type": str, "anomaly_type": str, "severity": str, "state": str,
    "score": float, "peak_score": float, "confidence": float, "explanation": str, "top_features": str,
    "opened_at": float, "last_seen_at": float, "resolved_at": float, "acknowledged_at": float,
    "acknowledged_by": str, "resolved_by": str, "note": str, "false_positive": int, "tiers": str, "context": str,
    "model_version": str, "updated_at": float,
}


def _row(a: Anomaly) -> dict[str, Any]:
    return {
        "id": a.id, "thing_id": a.thing_id, "thing_type": a.thing_type, "anomaly_type": a.anomaly_type,
        "severity": a.severity, "state": a.state, "score": a.score, "peak_score": a.peak_score,
        "confidence": a.confidence, "explanation": a.explanation, "top_features": json.dumps(a.top_features),
        "opened_at": a.opened_at, "last_seen_at": a.last_seen_at, "resolved_at": a.resolved_at,
        "acknowledged_at": a.acknowledged_at, "acknowledged_by": a.acknowledged_by, "resolved_by": a.resolved_by,
        "note": a.note, "false_positive": int(a.false_positive), "tiers": json.dumps(a.tiers),
        "context": json.dumps(a.context), "model_version": a.model_version, "updated_at": time.time(),
    }


def from_row(r: dict[str, Any]) -> Anomaly:
    return Anomaly(
        r["id"], r["thing_id"], r["thing_type"], r["anomaly_type"], r["severity"], r["state"], r["score"],
        r["peak_score"], r["confidence"], r["explanation"], json.loads(r["top_features"] or "[]"), r["opened_at"],
        r["last_seen_at"], json.loads(r["tiers"] or "{}"), json.loads(r["context"] or "{}"), r["model_version"],
        r["resolved_at"], r["acknowledged_at"], r["acknowledged_by"], r["resolved_by"], r["note"] or "",
        bool(r["false_positive"]),
    )


def ensure_table(db: sqlite_utils.Database) -> None:
    if TABLE not in db.table_names():
        db[TABLE].create(_COLUMNS, pk="id")  # type: ignore[union-attr]
        db[TABLE].create_index(["state"])  # type: ignore[union-attr]
        db[TABLE].create_index(["thing_id", "opened_at"])  # type: ignore[union-attr]
        db[TABLE].create_index(["updated_at"])  # type: ignore[union-attr]


def exclusions(db: sqlite_utils.Database, start: float, end: float) -> list[tuple[str, float, float]]:
    """(thing, from, to) of every anomaly in `[start, end]` that was not a false positive: training skips them."""
    if TABLE not in db.table_names():
        return []
    rows = db.execute(
        f"SELECT thing_id, opened_at, COALESCE(resolved_at, last_seen_at) FROM {TABLE} "
        "WHERE false_positive = 0 AND opened_at <= ? AND COALESCE(resolved_at, last_seen_at) >= ?", [end, start],
    ).fetchall()
    return [(str(t), float(a) - 60.0, float(b) + 60.0) for t, a, b in rows]


class AnomalyLog:
    """The SQLite anomaly log of one gateway."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = SqliteWorker(path)

    async def start(self) -> None:
        await self._db.open()
        await self._db.call(ensure_table)

    async def stop(self) -> None:
        await self._db.close()

    async def save(self, anomalies: Sequence[Anomaly]) -> None:
        rows = [_row(a) for a in anomalies]
        if rows:
            await self._db.call(lambda db: db[TABLE].upsert_all(rows, pk="id"))  # type: ignore[union-attr]

    async def get(self, anomaly_id: str) -> Anomaly | None:
        def get(db: sqlite_utils.Database) -> Anomaly | None:
            rows = list(db.query(f"SELECT * FROM {TABLE} WHERE id = ?", [anomaly_id]))
            return from_row(rows[0]) if rows else None

        return await self._db.call(get)

    async def active(self) -> list[Anomaly]:
        return await self._db.call(lambda db: [from_row(r) for r in db.query(
            f"SELECT * FROM {TABLE} WHERE state != 'resolved' ORDER BY opened_at")])

    async def query(self, *, states: Sequence[str] = (), thing_ids: Sequence[str] = (), severities: Sequence[str] = (),
                    since: float | None = None, until: float | None = None, limit: int = 100,
                    offset: int = 0, anomaly_types: Sequence[str] = (), acknowledged_by: Sequence[str] = (),
                    conditions: Sequence[tuple[str, str]] | None = None,
                    without_conditions: Sequence[tuple[str, str]] = ()) -> tuple[list[Anomaly], int]:
        """Newest first. `conditions`: only these (thing id, anomaly type) pairs; `without_conditions`: not these."""
        where, params = ["1 = 1"], []  # type: list[str], list[Any]
        for col, values in (("state", states), ("thing_id", thing_ids), ("severity", severities),
                            ("anomaly_type", anomaly_types), ("acknowledged_by", acknowledged_by)):
            if values:
                where.append(f"{col} IN ({', '.join('?' * len(values))})")
                params.extend(values)
        for pairs, op in ((conditions, "IN"), (without_conditions, "NOT IN")):
            if pairs is None or (op == "NOT IN" and not pairs):
                continue
            if not pairs:
                where.append("0 = 1")
                continue
            where.append(f"(thing_id, anomaly_type) {op} (VALUES {', '.join('(?, ?)' for _ in pairs)})")
            params.extend(x for pair in pairs for x in pair)
        if since is not None:
            where.append("COALESCE(resolved_at, 1e18) >= ?")
            params.append(since)
        if until is not None:
            where.append("opened_at < ?")
            params.append(until)
        clause = " AND ".join(where)

        def run(db: sqlite_utils.Database) -> tuple[list[Anomaly], int]:
            total = db.execute(f"SELECT count(*) FROM {TABLE} WHERE {clause}", params).fetchone()[0]
            rows = db.query(f"SELECT * FROM {TABLE} WHERE {clause} ORDER BY opened_at DESC LIMIT ? OFFSET ?",
                            [*params, limit, offset])
            return [from_row(r) for r in rows], int(total)

        return await self._db.call(run)

    async def touch(self, anomaly_ids: Sequence[str], conditions: Sequence[tuple[str, str]] = ()) -> None:
        """Mark these anomalies, and the unresolved ones of these (Thing id, anomaly type) conditions, as
        written now: their journal or shelf changed, so the uplink sends them again."""
        def run(db: sqlite_utils.Database) -> None:
            now = time.time()
            with db.conn:
                for start in range(0, len(anomaly_ids), 500):
                    chunk = list(anomaly_ids[start:start + 500])
                    db.execute(f"UPDATE {TABLE} SET updated_at = ? WHERE id IN ({', '.join('?' * len(chunk))})",
                               [now, *chunk])
                for thing_id, anomaly_type in conditions:
                    db.execute(f"UPDATE {TABLE} SET updated_at = ? WHERE thing_id = ? AND anomaly_type = ? "
                               "AND state != 'resolved'", [now, thing_id, anomaly_type])

        if anomaly_ids or conditions:
            await self._db.call(run)

    async def changed_since(self, since: float, limit: int = 1000) -> tuple[list[Anomaly], float]:
        """Anomalies written after `since` (oldest change first) and the newest write time among them:
        what the uplink still has to send."""
        def run(db: sqlite_utils.Database) -> tuple[list[Anomaly], float]:
            rows = list(db.query(f"SELECT * FROM {TABLE} WHERE updated_at > ? ORDER BY updated_at LIMIT ?",
                                 [since, limit]))
            return [from_row(r) for r in rows], max((float(r["updated_at"]) for r in rows), default=since)

        return await self._db.call(run)

    async def prune(self, keep_days: float) -> int:
        cutoff = time.time() - keep_days * 86400

        def prune(db: sqlite_utils.Database) -> int:
            cur = db.execute(f"DELETE FROM {TABLE} WHERE state = 'resolved' AND resolved_at < ?", [cutoff])
            return int(cur.rowcount)

        return await self._db.call(prune)
