"""PostgreSQL backend of the aggregator: several aggregator replicas share one database.

A batch is applied in one transaction that first locks its gateway's row (`SELECT ... FOR UPDATE`):
two replicas receiving the same retried batch serialize on that lock, and the second sees the new
`last_seq` and answers "duplicate". Points go in by COPY into a table partitioned by device time
(one partition per `storage.partition_days`, created on demand under an advisory lock).
"""

from __future__ import annotations

import io
import json
import math
import threading
import time
from typing import Any

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.csv as pacsv

from cloud_sync.store import Applied, GatewayRow, StoreError
from cloud_sync.store.anomalies import AnomalySql
from gateway.common.series import SeriesKey, base_name
from gateway.common.wire import Batch

_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS egiz_gateways (gateway_id text PRIMARY KEY, site text NOT NULL, line text NOT NULL, "
    "last_seq bigint NOT NULL, last_seen double precision, points bigint NOT NULL DEFAULT 0, backlog jsonb, "
    "lag_s double precision, clock_offset_s double precision)",
    "CREATE TABLE IF NOT EXISTS egiz_series (id serial PRIMARY KEY, thing_id text NOT NULL, feature text NOT NULL, "
    "path text NOT NULL, type text, numeric boolean, UNIQUE (thing_id, feature, path))",
    "CREATE TABLE IF NOT EXISTS egiz_points (series integer NOT NULL, ts double precision NOT NULL, "
    "recv double precision, seq bigint, value double precision, text text) PARTITION BY RANGE (ts)",
    "CREATE INDEX IF NOT EXISTS egiz_points_series_ts ON egiz_points (series, ts)",
    "CREATE TABLE IF NOT EXISTS egiz_things (id text PRIMARY KEY, site text, line text, gateway_id text, type text, "
    "version bigint, last_updated double precision, doc jsonb, deleted boolean NOT NULL DEFAULT false)",
]
ANOMALIES = AnomalySql("%s", prefix="egiz_")
_LOCK_SCHEMA = 7_310_001
_LOCK_PARTITION = 7_310_002


class PgStore:
    """The aggregator's tables in one PostgreSQL database."""

    def __init__(self, dsn: str, *, partition_days: int = 1) -> None:
        self._dsn = dsn
        self._width = partition_days * 86400
        self._local = threading.local()
        self._all: list[psycopg.Connection[Any]] = []
        self._partitions: set[int] = set()
        self.numeric_series: set[int] = set()
        self.series_keys: dict[int, tuple[SeriesKey, str]] = {}
        self._series: dict[tuple[str, str, str], int] = {}

    def _conn(self) -> psycopg.Connection[Any]:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            try:
                conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=10)
            except psycopg.Error as exc:
                raise StoreError(f"cannot connect to PostgreSQL: {exc}") from exc
            self._local.conn = conn
            self._all.append(conn)
        return conn

    def open(self) -> None:
        conn = self._conn()
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [_LOCK_SCHEMA])  # replicas start together
            for stmt in _SCHEMA + ANOMALIES.schema():
                conn.execute(stmt)
        self._load_series(conn, None)

    def close(self) -> None:
        for conn in self._all:
            conn.close()
        self._all.clear()

    def _remember(self, sid: int, key: SeriesKey, ttype: str, numeric: bool) -> None:
        self._series[(key.thing_id, key.feature, key.path)] = sid
        self.series_keys[sid] = (key, ttype or "")
        if numeric:
            self.numeric_series.add(sid)

    def _load_series(self, conn: psycopg.Connection[Any], thing_id: str | None) -> None:
        sql = "SELECT id, thing_id, feature, path, type, numeric FROM egiz_series"
        rows = conn.execute(sql + (" WHERE thing_id = %s" if thing_id else ""),
                            [thing_id] if thing_id else []).fetchall()
        for sid, t, f, p, ty, n in rows:
            self._remember(int(sid), SeriesKey(t, f, p), ty, bool(n))

    # ----------------------------------------------------------------- ingest
    def apply(self, batch: Batch, received_at: float) -> Applied:
        conn = self._conn()
        try:
            with conn.transaction():
                return self._apply(conn, batch, received_at)
        except psycopg.Error as exc:
            raise StoreError(f"could not apply batch {batch.batch_seq} of {batch.gateway_id}: {exc}") from exc

    def _apply(self, conn: psycopg.Connection[Any], batch: Batch, received_at: float) -> Applied:
        conn.execute("INSERT INTO egiz_gateways (gateway_id, site, line, last_seq) VALUES (%s, %s, %s, 0) "
                     "ON CONFLICT (gateway_id) DO NOTHING", [batch.gateway_id, batch.site, batch.line])
        row = conn.execute("SELECT last_seq FROM egiz_gateways WHERE gateway_id = %s FOR UPDATE",
                           [batch.gateway_id]).fetchone()
        last = int(row[0]) if row else 0
        if batch.batch_seq <= last:
            return Applied("duplicate")
        if batch.batch_seq != last + 1:
            return Applied("out_of_order", expected=last + 1)
        pts = batch.points
        n = pts.num_rows
        mapping = self._series_ids(conn, batch)
        if n:
            ts = pts.column("ts").to_numpy()
            self._ensure_partitions(conn, float(ts.min()), float(ts.max()))
            table = pa.table({"series": pa.array(mapping, pa.int32()).take(pts.column("series")),
                              "ts": pts.column("ts"), "recv": pts.column("recv"), "seq": pts.column("seq"),
                              "value": pts.column("value"), "text": pts.column("text")})
            buf = io.BytesIO()
            pacsv.write_csv(table, buf, pacsv.WriteOptions(include_header=False))
            with conn.cursor().copy("COPY egiz_points (series, ts, recv, seq, value, text) FROM STDIN "
                                    "(FORMAT csv)") as copy:
                copy.write(buf.getvalue())
        for d in batch.things:
            conn.execute(
                "INSERT INTO egiz_things VALUES (%s, %s, %s, %s, %s, %s, %s, %s, false) ON CONFLICT (id) DO UPDATE "
                "SET site = EXCLUDED.site, line = EXCLUDED.line, gateway_id = EXCLUDED.gateway_id, "
                "type = EXCLUDED.type, version = EXCLUDED.version, last_updated = EXCLUDED.last_updated, "
                "doc = EXCLUDED.doc, deleted = false "
                "WHERE egiz_things.version < EXCLUDED.version OR egiz_things.deleted",
                [d["id"], batch.site, batch.line, batch.gateway_id, str(d.get("type", "")), int(d.get("version", 0)),
                 time.time(), json.dumps(d, allow_nan=False)])
        if batch.deleted:
            conn.execute("UPDATE egiz_things SET deleted = true WHERE id = ANY(%s)", [batch.deleted])
        if batch.anomalies:
            ANOMALIES.apply(conn.execute, batch.anomalies, batch.site, batch.line, batch.gateway_id)
        newest = float(pts.column("recv").to_numpy().max()) if n else None
        lag = max(0.0, batch.sent_at - newest) if newest is not None else 0.0
        conn.execute("UPDATE egiz_gateways SET site = %s, line = %s, last_seq = %s, last_seen = %s, "
                     "points = points + %s, backlog = %s, lag_s = %s, clock_offset_s = %s WHERE gateway_id = %s",
                     [batch.site, batch.line, batch.batch_seq, received_at, n, json.dumps(batch.backlog), lag,
                      received_at - batch.sent_at if batch.sent_at else 0.0, batch.gateway_id])
        return Applied("applied", points=n)

    def _series_ids(self, conn: psycopg.Connection[Any], batch: Batch) -> list[int]:
        missing = [k for k in batch.series if k not in self._series]
        if missing:
            types = {d["id"]: str(d.get("type", "")) for d in batch.things}
            numeric = _first_numeric(batch)
            index = {k: i for i, k in enumerate(batch.series)}
            conn.execute(
                "INSERT INTO egiz_series (thing_id, feature, path, type, numeric) "
                "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::boolean[]) "
                "ON CONFLICT (thing_id, feature, path) DO NOTHING",
                [[k[0] for k in missing], [k[1] for k in missing], [k[2] for k in missing],
                 [types.get(k[0], "") for k in missing], [numeric.get(index[k], True) for k in missing]])
            rows = conn.execute(
                "SELECT s.id, s.thing_id, s.feature, s.path, s.type, s.numeric FROM egiz_series s JOIN "
                "unnest(%s::text[], %s::text[], %s::text[]) AS m(t, f, p) ON s.thing_id = m.t AND s.feature = m.f "
                "AND s.path = m.p", [[k[0] for k in missing], [k[1] for k in missing], [k[2] for k in missing]],
            ).fetchall()
            for sid, t, f, p, ty, num in rows:
                self._remember(int(sid), SeriesKey(t, f, p), ty, bool(num))
        return [self._series[k] for k in batch.series]

    def _ensure_partitions(self, conn: psycopg.Connection[Any], lo: float, hi: float) -> None:
        w = self._width
        for start in range(math.floor(lo / w) * w, math.floor(hi / w) * w + 1, w):
            if start in self._partitions:
                continue
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [_LOCK_PARTITION])
            name = f"egiz_points_p{start}"
            conn.execute(f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF egiz_points "
                         f"FOR VALUES FROM ({start}) TO ({start + w})")
            self._partitions.add(start)

    # ----------------------------------------------------------------- reads
    def gateways(self) -> list[GatewayRow]:
        rows = self._conn().execute(
            "SELECT gateway_id, site, line, last_seq, coalesce(last_seen, 0), points, backlog, coalesce(lag_s, 0), "
            "coalesce(clock_offset_s, 0) FROM egiz_gateways ORDER BY site, line, gateway_id").fetchall()
        return [GatewayRow(g, s, li, int(q), float(seen), int(p), b or {}, float(lag), float(off))
                for g, s, li, q, seen, p, b, lag, off in rows]

    def things(self, *, site: str | None, line: str | None, type_: str | None, limit: int,
               offset: int) -> tuple[list[dict[str, Any]], int]:
        where, params = ["NOT deleted"], []
        for col, value in (("site", site), ("line", line), ("type", type_)):
            if value:
                where.append(f"{col} = %s")
                params.append(value)
        cond = " AND ".join(where)
        conn = self._conn()
        total = conn.execute(f"SELECT count(*) FROM egiz_things WHERE {cond}", params).fetchone()
        rows = conn.execute(f"SELECT doc, site, line, gateway_id FROM egiz_things WHERE {cond} ORDER BY id "
                            "LIMIT %s OFFSET %s", [*params, limit, offset]).fetchall()
        return [{**doc, "site": s, "line": li, "gatewayId": g} for doc, s, li, g in rows], int(total[0]) if total else 0

    def thing(self, thing_id: str) -> dict[str, Any] | None:
        row = self._conn().execute("SELECT doc, site, line, gateway_id FROM egiz_things WHERE id = %s AND NOT deleted",
                                   [thing_id]).fetchone()
        return {**row[0], "site": row[1], "line": row[2], "gatewayId": row[3]} if row else None

    def series_of(self, thing_id: str, feature: str | None = None, prop: str | None = None) -> list[int]:
        self._load_series(self._conn(), thing_id)  # another replica may have added series
        return sorted(sid for (tid, f, path), sid in list(self._series.items())
                      if tid == thing_id and (feature is None or f == feature)
                      and (prop is None or prop in (path, base_name(path))))

    def anomalies(self, *, site: str | None, states: list[str], severities: list[str], thing_ids: list[str],
                  limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        return ANOMALIES.query(self._conn().execute, site=site, states=states, severities=severities,
                               thing_ids=thing_ids, limit=limit, offset=offset)

    def anomaly(self, anomaly_id: str) -> dict[str, Any] | None:
        return ANOMALIES.get(self._conn().execute, anomaly_id)

    def add_action(self, gateway_id: str, anomaly_id: str, action: str, doc: dict[str, Any]) -> None:
        conn = self._conn()
        with conn.transaction():
            ANOMALIES.add_action(conn.execute, gateway_id, anomaly_id, action, doc)

    def actions_for(self, gateway_id: str) -> list[dict[str, Any]]:
        conn = self._conn()
        with conn.transaction():
            return ANOMALIES.actions_for(conn.execute, gateway_id)

    def maintain(self, now: float) -> int:
        return 0  # buckets are computed from raw points (partition pruning keeps them fast)

    def point_count(self) -> int:
        row = self._conn().execute("SELECT count(*) FROM egiz_points").fetchone()
        return int(row[0]) if row else 0

    def stored_seqs(self, thing_id: str, path: str) -> list[tuple[int, int]]:
        return [(int(s), int(c)) for s, c in self._conn().execute(
            "SELECT p.seq, count(*) FROM egiz_points p JOIN egiz_series s ON p.series = s.id WHERE s.thing_id = %s "
            "AND s.path = %s GROUP BY p.seq ORDER BY p.seq", [thing_id, path]).fetchall()]

    def raw(self, series: list[int], start: float, end: float, limit: int, *,
            text: bool = True) -> dict[str, np.ndarray]:
        rows = self._conn().execute(
            "SELECT series, ts, value, text FROM egiz_points WHERE series = ANY(%s) AND ts >= %s AND ts < %s "
            "ORDER BY series, ts LIMIT %s", [series, start, end, limit]).fetchall()
        return _columns(rows, ("series", "ts", "value", "text"))

    def count(self, series: list[int], start: float, end: float) -> int:
        row = self._conn().execute("SELECT count(*) FROM egiz_points WHERE series = ANY(%s) AND ts >= %s AND ts < %s",
                                   [series, start, end]).fetchone()
        return int(row[0]) if row else 0

    def buckets(self, series: list[int], start: float, end: float, width: float) -> dict[str, np.ndarray]:
        rows = self._conn().execute(
            "SELECT series, floor(ts / %s) * %s AS t, min(value), max(value), avg(value), count(value), "
            "(array_agg(value ORDER BY ts DESC))[1] FROM egiz_points WHERE series = ANY(%s) AND ts >= %s AND ts < %s "
            "AND value IS NOT NULL GROUP BY series, t ORDER BY series, t",
            [width, width, series, start, end]).fetchall()
        return _columns(rows, ("series", "t", "min", "max", "avg", "count", "last"))

    def context_points(self, series: list[int], start: float, end: float) -> dict[str, np.ndarray]:
        rows = self._conn().execute(
            "(SELECT ts, text FROM egiz_points WHERE series = ANY(%s) AND ts < %s ORDER BY ts DESC LIMIT 1) "
            "UNION ALL (SELECT ts, text FROM egiz_points WHERE series = ANY(%s) AND ts >= %s AND ts < %s) ORDER BY 1",
            [series, start, series, start, end]).fetchall()
        return _columns(rows, ("ts", "text"))


def _first_numeric(batch: Batch) -> dict[int, bool]:
    out: dict[int, bool] = {}
    if batch.points.num_rows:
        valid = batch.points.column("value").is_valid().to_numpy(zero_copy_only=False)
        for i, num in zip(batch.points.column("series").to_pylist(), valid, strict=True):
            out.setdefault(i, bool(num))
    return out


def _columns(rows: list[tuple[Any, ...]], names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Rows → numpy columns like DuckDB's fetchnumpy (masked where a value is missing)."""
    out: dict[str, np.ndarray] = {}
    cols = list(zip(*rows, strict=True)) if rows else [() for _ in names]
    for name, col in zip(names, cols, strict=True):
        if name == "text":
            out[name] = np.array(col, dtype=object)
        elif any(v is None for v in col):
            out[name] = np.ma.masked_array([0.0 if v is None else v for v in col], mask=[v is None for v in col])
        else:
            out[name] = np.array(col, dtype=np.int64 if name in ("series", "count") else float)
    return out
