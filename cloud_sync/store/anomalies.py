"""Anomalies across sites, and operators' actions on them waiting for their gateway — the same SQL for
both backends (DuckDB and PostgreSQL differ only in the parameter placeholder).

Gateways own their anomalies: each batch carries the documents that changed, applied in the batch's
transaction (newest state wins, by id), each with its journal (who acknowledged, resolved or shelved it,
with their comments) and the shelf silencing its condition. A shelf ends by itself at its `until`, so the
shelved filter compares with the time of the query. An acknowledgement or resolution made centrally is queued here
and handed to the gateway in its next ingest response; once a batch shows the anomaly in that state,
the action is done and removed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from gateway.common.alarms import JournalQuery
from gateway.common.pointfile import one
from gateway.common.wire import Action, AnomalyDoc

Execute = Callable[[str, Sequence[Any]], Any]  # returns a cursor; read it with fetchall() or `one()`
ACTION_TTL_S = 86400.0  # an action for a gateway that never comes back is dropped after a day
JOURNAL_COLUMNS = (("anomaly_type", "VARCHAR"), ("acknowledged_by", "VARCHAR"),
                   ("resolved_at", "DOUBLE PRECISION"), ("shelved_until", "DOUBLE PRECISION"))
COLUMNS = ("id, site, line, gateway_id, thing_id, state, severity, opened_at, score, doc, anomaly_type, "
           "acknowledged_by, resolved_at, shelved_until")


def where(placeholder: str, base: str, filters: Sequence[tuple[str, Sequence[Any]]]) -> tuple[str, list[Any]]:
    """`base AND col IN (...)` for every filter with values (an empty one filters nothing), and its params."""
    parts, params = [base], []  # type: list[str], list[Any]
    for col, values in filters:
        if values:
            parts.append(f"{col} IN ({', '.join([placeholder] * len(values))})")
            params.extend(values)
    return " AND ".join(parts), params


class AnomalySql:
    def __init__(self, placeholder: str, prefix: str = "") -> None:
        self.p = placeholder
        self.anomalies = f"{prefix}anomalies"
        self.actions = f"{prefix}anomaly_actions"

    def schema(self) -> list[str]:
        return [
            f"CREATE TABLE IF NOT EXISTS {self.anomalies} (id VARCHAR PRIMARY KEY, site VARCHAR, line VARCHAR, "
            "gateway_id VARCHAR, thing_id VARCHAR, state VARCHAR, severity VARCHAR, opened_at DOUBLE PRECISION, "
            "score DOUBLE PRECISION, doc VARCHAR)",
            f"CREATE TABLE IF NOT EXISTS {self.actions} (gateway_id VARCHAR, anomaly_id VARCHAR, action VARCHAR, "
            "doc VARCHAR, created DOUBLE PRECISION)",
            # the journal's filters, added to a store written before them (its rows fill in as they change)
            *(f"ALTER TABLE {self.anomalies} ADD COLUMN IF NOT EXISTS {col} {kind}" for col, kind in JOURNAL_COLUMNS),
        ]

    def apply(self, execute: Execute, docs: list[AnomalyDoc], site: str, line: str, gateway_id: str) -> None:
        """Inside the batch's transaction: the newest state of each anomaly; actions it fulfils removed."""
        p = self.p
        for d in docs:
            # the stored row updated, a missing one inserted: not a DELETE and an INSERT of the same key,
            # which in DuckDB leaves native memory behind for good (docs/performance.md)
            values = [site, line, gateway_id, d.thing_id, d.state, d.severity, d.opened_at, d.score,
                      json.dumps(d.doc, allow_nan=False), d.anomaly_type, d.acknowledged_by, d.resolved_at,
                      d.shelved.until if d.shelved is not None and d.state != "resolved" else None]
            if one(execute(f"SELECT 1 FROM {self.anomalies} WHERE id = {p}", [d.id])):
                execute(f"UPDATE {self.anomalies} SET {', '.join(f'{c} = {p}' for c in COLUMNS.split(', ')[1:])} "
                        f"WHERE id = {p}", [*values, d.id])
            else:
                execute(f"INSERT INTO {self.anomalies} ({COLUMNS}) VALUES ({', '.join([p] * 14)})", [d.id, *values])
            done = ("ack", "resolve") if d.state == "resolved" else ("ack",) if d.state != "open" else ()
            for action in done:
                execute(f"DELETE FROM {self.actions} WHERE anomaly_id = {p} AND action = {p}", [d.id, action])

    def query(self, execute: Execute, q: JournalQuery, now: float) -> tuple[list[dict[str, Any]], int]:
        """One page of the journal, newest first, as `JournalQuery` filters it (shelved: at `now`)."""
        p = self.p
        cond, params = where(p, "1 = 1", [
            ("site", [q.site] if q.site else []), ("line", [q.line] if q.line else []), ("state", q.states),
            ("severity", q.severities), ("thing_id", q.thing_ids), ("anomaly_type", q.anomaly_types),
            ("acknowledged_by", q.acknowledged_by)])
        if q.since is not None:  # still open at or after `since`
            cond += f" AND COALESCE(resolved_at, 1e18) >= {p}"
            params.append(q.since)
        if q.until is not None:
            cond += f" AND opened_at < {p}"
            params.append(q.until)
        if q.shelved is not None:
            cond += f" AND shelved_until > {p}" if q.shelved else \
                f" AND (shelved_until IS NULL OR shelved_until <= {p})"
            params.append(now)
        total = one(execute(f"SELECT count(*) FROM {self.anomalies} WHERE {cond}", params))
        rows = execute(f"SELECT doc, site, line, gateway_id, id, shelved_until FROM {self.anomalies} WHERE {cond} "
                       f"ORDER BY opened_at DESC, id LIMIT {p} OFFSET {p}", [*params, q.limit, q.offset]).fetchall()
        pending = self._pending(execute, [r[4] for r in rows])
        return [_doc(r[0], r[1], r[2], r[3], pending.get(r[4], []), r[5], now) for r in rows], \
            int(total[0]) if total else 0

    def get(self, execute: Execute, anomaly_id: str, now: float) -> dict[str, Any] | None:
        row = one(execute(f"SELECT doc, site, line, gateway_id, shelved_until FROM {self.anomalies} "
                          f"WHERE id = {self.p}", [anomaly_id]))
        if row is None:
            return None
        return _doc(row[0], row[1], row[2], row[3], self._pending(execute, [anomaly_id]).get(anomaly_id, []),
                    row[4], now)

    def add_action(self, execute: Execute, gateway_id: str, act: Action) -> None:
        p = self.p
        execute(f"DELETE FROM {self.actions} WHERE anomaly_id = {p} AND action = {p}", [act.anomaly_id, act.action])
        execute(f"INSERT INTO {self.actions} VALUES ({p}, {p}, {p}, {p}, {p})",
                [gateway_id, act.anomaly_id, act.action, json.dumps(act.to_json()), time.time()])

    def actions_for(self, execute: Execute, gateway_id: str) -> list[Action]:
        p = self.p
        execute(f"DELETE FROM {self.actions} WHERE created < {p}", [time.time() - ACTION_TTL_S])
        rows = execute(f"SELECT doc FROM {self.actions} WHERE gateway_id = {p} ORDER BY created",
                       [gateway_id]).fetchall()
        return [Action.parse(json.loads(r[0])) for r in rows]

    def _pending(self, execute: Execute, ids: list[str]) -> dict[str, list[str]]:
        if not ids:
            return {}
        rows = execute(f"SELECT anomaly_id, action FROM {self.actions} WHERE anomaly_id IN "
                       f"({', '.join([self.p] * len(ids))})", ids).fetchall()
        out: dict[str, list[str]] = {}
        for anomaly_id, action in rows:
            out.setdefault(anomaly_id, []).append(action)
        return out


def _doc(doc: str, site: str, line: str, gateway_id: str, pending: list[str], shelved_until: float | None,
         now: float) -> dict[str, Any]:
    """The stored document with where it comes from, the central actions pending, and its shelf while
    that still silences (null once it ended or the anomaly was resolved)."""
    d: dict[str, Any] = json.loads(doc) if isinstance(doc, str) else dict(doc)
    d.update(site=site, line=line, gatewayId=gateway_id, pending=sorted(pending))
    d.setdefault("journal", [])
    if shelved_until is None or shelved_until <= now:
        d["shelved"] = None
    return d

