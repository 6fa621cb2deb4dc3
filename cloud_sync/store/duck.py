"""DuckDB backend of the aggregator: the gateway's file layout plus gateways and Things, in one file.

Every batch is applied in one transaction that also moves the gateway's `last_seq`, so a batch is
applied completely or not at all, and never twice.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from cloud_sync.store import Applied, GatewayRow, StoreError
from cloud_sync.store.anomalies import AnomalySql
from gateway.buffer.store import BufferStore
from gateway.common.series import SeriesKey, base_name
from gateway.common.timefmt import parse_iso
from gateway.common.wire import Batch

_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS gateways (gateway_id VARCHAR PRIMARY KEY, site VARCHAR, line VARCHAR, "
    "last_seq BIGINT, last_seen DOUBLE, points BIGINT, backlog VARCHAR, lag_s DOUBLE, clock_offset_s DOUBLE)",
    "CREATE TABLE IF NOT EXISTS things (id VARCHAR PRIMARY KEY, site VARCHAR, line VARCHAR, gateway_id VARCHAR, "
    "type VARCHAR, version BIGINT, last_updated DOUBLE, doc VARCHAR, deleted BOOLEAN)",
]


ANOMALIES = AnomalySql("?")


class DuckStore(BufferStore):
    """One DuckDB file for every site and line."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir / "aggregator.duckdb", memory_limit_mb=2048, checkpoint_mb=64)
        self.numeric_series: set[int] = set()
        self.series_keys: dict[int, tuple[SeriesKey, str]] = {}
        self._series: dict[tuple[str, str, str], int] = {}
        self._next_series = 1
        self._next_id = 1
        self._lock = threading.Lock()  # writes are serialized (one transaction at a time)

    def open(self) -> None:  # type: ignore[override]
        state = super().open()
        for stmt in _SCHEMA + ANOMALIES.schema():
            self.con.execute(stmt)
        for sid, key, ttype, numeric in state.series:
            self._remember(sid, key, ttype, numeric)
        self._next_series = max(self.series_keys, default=0) + 1
        self._next_id = state.next_id

    def _remember(self, sid: int, key: SeriesKey, ttype: str, numeric: bool) -> None:
        self._series[(key.thing_id, key.feature, key.path)] = sid
        self.series_keys[sid] = (key, ttype)
        if numeric:
            self.numeric_series.add(sid)

    # ----------------------------------------------------------------- ingest
    def apply(self, batch: Batch, received_at: float) -> Applied:
        with self._lock:
            return self._apply(batch, received_at)

    def _apply(self, batch: Batch, received_at: float) -> Applied:
        con = self.con
        row = con.execute("SELECT last_seq FROM gateways WHERE gateway_id = ?", [batch.gateway_id]).fetchone()
        last = int(row[0]) if row else 0
        if batch.batch_seq <= last:
            return Applied("duplicate")
        if batch.batch_seq != last + 1:
            return Applied("out_of_order", expected=last + 1)
        pts = batch.points
        n = pts.num_rows
        types = {d["id"]: str(d.get("type", "")) for d in batch.things}
        new_series: list[tuple[int, SeriesKey, str, bool]] = []
        local_to_global = []
        is_num = pts.column("value").is_valid().to_numpy(zero_copy_only=False) if n else []
        first_num: dict[int, bool] = {}
        for i, num in zip(pts.column("series").to_pylist(), is_num, strict=True) if n else ():
            first_num.setdefault(i, bool(num))
        for i, (thing, feature, path) in enumerate(batch.series):
            sid = self._series.get((thing, feature, path))
            if sid is None:
                sid = self._next_series + len(new_series)
                new_series.append((sid, SeriesKey(thing, feature, path), types.get(thing, ""), first_num.get(i, True)))
            local_to_global.append(sid)
        mapping = pa.array(local_to_global, pa.int32())
        first_id = self._next_id
        con.execute("BEGIN")
        try:
            if new_series:
                con.executemany("INSERT INTO series VALUES (?, ?, ?, ?, ?, ?)",
                                [(s, k.thing_id, t, k.feature, k.path, num) for s, k, t, num in new_series])
            if n:
                table = pa.table({
                    "id": pa.array(range(first_id, first_id + n), pa.int64()),
                    "series": mapping.take(pts.column("series")),
                    "ts": pts.column("ts"), "recv": pts.column("recv"), "seq": pts.column("seq"),
                    "value": pts.column("value"), "text": pts.column("text"),
                })
                con.register("egiz_batch", table)
                try:
                    con.execute("INSERT INTO points SELECT * FROM egiz_batch")
                finally:
                    con.unregister("egiz_batch")
            if batch.things:
                docs = pa.table({
                    "id": [d["id"] for d in batch.things], "type": [str(d.get("type", "")) for d in batch.things],
                    "version": pa.array([int(d.get("version", 0)) for d in batch.things], pa.int64()),
                    "last_updated": [_epoch(d.get("lastUpdated")) for d in batch.things],
                    "doc": [json.dumps(d, allow_nan=False) for d in batch.things],
                })
                con.register("egiz_docs", docs)
                try:
                    con.execute("DELETE FROM things USING egiz_docs d WHERE things.id = d.id "
                                "AND (things.version < d.version OR things.deleted)")
                    con.execute("INSERT INTO things SELECT d.id, ?, ?, ?, d.type, d.version, d.last_updated, d.doc, "
                                "false FROM egiz_docs d WHERE d.id NOT IN (SELECT id FROM things)",
                                [batch.site, batch.line, batch.gateway_id])
                finally:
                    con.unregister("egiz_docs")
            if batch.deleted:
                con.execute("UPDATE things SET deleted = true WHERE id IN (SELECT unnest(?))", [batch.deleted])
            if batch.anomalies:
                ANOMALIES.apply(con.execute, batch.anomalies, batch.site, batch.line, batch.gateway_id)
            newest = float(pts.column("recv").to_numpy().max()) if n else None
            lag = max(0.0, batch.sent_at - newest) if newest is not None else 0.0
            offset = received_at - batch.sent_at if batch.sent_at else 0.0
            con.execute(
                "INSERT OR REPLACE INTO gateways VALUES (?, ?, ?, ?, ?, "
                "coalesce((SELECT points FROM gateways WHERE gateway_id = ?), 0) + ?, ?, ?, ?)",
                [batch.gateway_id, batch.site, batch.line, batch.batch_seq, received_at, batch.gateway_id, n,
                 json.dumps(batch.backlog), lag, offset])
            con.execute("COMMIT")
        except Exception as exc:
            con.execute("ROLLBACK")
            raise StoreError(f"could not apply batch {batch.batch_seq} of {batch.gateway_id}: {exc}") from exc
        for s, k, t, num in new_series:
            self._remember(s, k, t, num)
        self._next_series += len(new_series)
        self._next_id += n
        return Applied("applied", points=n)

    # ----------------------------------------------------------------- reads
    def gateways(self) -> list[GatewayRow]:
        rows = self.reader().execute(
            "SELECT gateway_id, site, line, last_seq, last_seen, points, backlog, lag_s, clock_offset_s FROM gateways "
            "ORDER BY site, line, gateway_id").fetchall()
        return [GatewayRow(g, s, li, int(q), float(seen), int(p), json.loads(b or "{}"), float(lag), float(off))
                for g, s, li, q, seen, p, b, lag, off in rows]

    def things(self, *, site: str | None, line: str | None, type_: str | None, limit: int,
               offset: int) -> tuple[list[dict[str, Any]], int]:
        where, params = _thing_filter(site, line, type_)
        cur = self.reader()
        total = cur.execute(f"SELECT count(*) FROM things WHERE {where}", params).fetchone()
        rows = cur.execute(f"SELECT doc, site, line, gateway_id FROM things WHERE {where} ORDER BY id LIMIT ? OFFSET ?",
                           [*params, limit, offset]).fetchall()
        return [_doc(*r) for r in rows], int(total[0]) if total else 0

    def thing(self, thing_id: str) -> dict[str, Any] | None:
        row = self.reader().execute("SELECT doc, site, line, gateway_id FROM things WHERE id = ? AND NOT deleted",
                                    [thing_id]).fetchone()
        return _doc(*row) if row else None

    def series_of(self, thing_id: str, feature: str | None = None, prop: str | None = None) -> list[int]:
        return sorted(sid for (tid, f, path), sid in list(self._series.items())
                      if tid == thing_id and (feature is None or f == feature)
                      and (prop is None or prop in (path, base_name(path))))

    def anomalies(self, *, site: str | None, states: list[str], severities: list[str], thing_ids: list[str],
                  limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        return ANOMALIES.query(self.reader().execute, site=site, states=states, severities=severities,
                               thing_ids=thing_ids, limit=limit, offset=offset)

    def anomaly(self, anomaly_id: str) -> dict[str, Any] | None:
        return ANOMALIES.get(self.reader().execute, anomaly_id)

    def add_action(self, gateway_id: str, anomaly_id: str, action: str, doc: dict[str, Any]) -> None:
        with self._lock:
            ANOMALIES.add_action(self.con.execute, gateway_id, anomaly_id, action, doc)

    def actions_for(self, gateway_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return ANOMALIES.actions_for(self.con.execute, gateway_id)

    def maintain(self, now: float) -> int:
        with self._lock:
            return self.rollup(now, 120.0)

    def stored_seqs(self, thing_id: str, path: str) -> list[tuple[int, int]]:
        """(seq, copies) of one property of one Thing: what chaos tests compare."""
        return [(int(s), int(c)) for s, c in self.reader().execute(
            "SELECT p.seq, count(*) FROM points p JOIN series s ON p.series = s.id WHERE s.thing_id = ? "
            "AND s.path = ? GROUP BY p.seq ORDER BY p.seq", [thing_id, path]).fetchall()]


def _thing_filter(site: str | None, line: str | None, type_: str | None) -> tuple[str, list[Any]]:
    where, params = ["NOT deleted"], []
    for col, value in (("site", site), ("line", line), ("type", type_)):
        if value:
            where.append(f"{col} = ?")
            params.append(value)
    return " AND ".join(where), params


def _doc(doc: str, site: str, line: str, gateway_id: str) -> dict[str, Any]:
    d: dict[str, Any] = json.loads(doc)
    d["site"], d["line"], d["gatewayId"] = site, line, gateway_id
    return d


def _epoch(iso: Any) -> float:
    if not isinstance(iso, str):
        return 0.0
    try:
        return parse_iso(iso)
    except ValueError:
        return time.time()
