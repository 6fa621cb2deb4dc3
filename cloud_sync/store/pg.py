"""PostgreSQL backend of the aggregator: several aggregator replicas share one database.

A batch is applied in one transaction that first locks its gateway's row (`SELECT ... FOR UPDATE`):
two replicas receiving the same retried batch serialize on that lock, and the second sees the new
`last_seq` and answers "duplicate". Points go in by COPY into a table partitioned by device time
(one partition per `storage.partition_days`, created on demand under an advisory lock).
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pyarrow.csv as pacsv

from cloud_sync.store import Refused, StoreError
from cloud_sync.store.anomalies import Execute
from cloud_sync.store.central import CentralSql, CentralStore, NewSeries, Prepared
from gateway.common.series import SeriesKey
from gateway.common.wire import Batch

_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS egiz_series (id serial PRIMARY KEY, thing_id text NOT NULL, feature text NOT NULL, "
    "path text NOT NULL, type text, numeric boolean, UNIQUE (thing_id, feature, path))",
    "CREATE TABLE IF NOT EXISTS egiz_points (series integer NOT NULL, ts double precision NOT NULL, "
    "recv double precision, seq bigint, value double precision, text text) PARTITION BY RANGE (ts)",
    "CREATE INDEX IF NOT EXISTS egiz_points_series_ts ON egiz_points (series, ts)",
]
_LOCK_SCHEMA = 7_310_001
_LOCK_PARTITION = 7_310_002


class PgStore(CentralStore):
    """The aggregator's tables in one PostgreSQL database."""

    sql = CentralSql("%s", prefix="egiz_", lock_row=" FOR UPDATE")
    engine_errors = (psycopg.Error,)

    def __init__(self, dsn: str, *, partition_days: int = 1, max_partitions: int = 16) -> None:
        super().__init__()
        self._dsn = dsn
        self._width = partition_days * 86400
        self._max_partitions = max_partitions  # partitions one batch may span (each may be created)
        self._local = threading.local()
        self._all: list[psycopg.Connection[Any]] = []
        self._partitions: set[int] = set()
        self._pending_partitions: set[int] = set()

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
            for stmt in _SCHEMA + self.sql.schema():
                conn.execute(stmt)
        self._load_series(None)

    def close(self) -> None:
        for conn in self._all:
            conn.close()
        self._all.clear()

    def _load_series(self, thing_id: str | None) -> None:
        sql = "SELECT id, thing_id, feature, path, type, numeric FROM egiz_series"
        rows = self._conn().execute(sql + (" WHERE thing_id = %s" if thing_id else ""),
                                    [thing_id] if thing_id else []).fetchall()
        for sid, t, f, p, ty, n in rows:
            self.catalogue.remember(int(sid), SeriesKey(t, f, p), ty, bool(n))

    def series_of(self, thing_id: str, feature: str | None = None, prop: str | None = None) -> list[int]:
        self._load_series(thing_id)  # another replica may have added series
        return super().series_of(thing_id, feature, prop)

    # ----------------------------------------------------------------- the engine's half
    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Execute]:
        conn = self._conn()
        self._pending_partitions = set()
        with conn.transaction():
            yield conn.execute

    def _reader(self) -> Execute:
        return self._conn().execute

    def _series_ids(self, execute: Execute, batch: Batch, new: list[tuple[int, NewSeries]]) -> list[int]:
        ids = [self.catalogue.get(k) or 0 for k in batch.series]
        if not new:
            return ids
        keys = [s.key for _i, s in new]
        columns = [[k.thing_id for k in keys], [k.feature for k in keys], [k.path for k in keys]]
        execute("INSERT INTO egiz_series (thing_id, feature, path, type, numeric) "
                "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::boolean[]) "
                "ON CONFLICT (thing_id, feature, path) DO NOTHING",
                [*columns, [s.thing_type for _i, s in new], [s.numeric for _i, s in new]])
        rows = execute("SELECT s.id, s.thing_id, s.feature, s.path FROM egiz_series s JOIN "
                       "unnest(%s::text[], %s::text[], %s::text[]) AS m(t, f, p) ON s.thing_id = m.t "
                       "AND s.feature = m.f AND s.path = m.p", columns).fetchall()
        found = {(t, f, p): int(sid) for sid, t, f, p in rows}
        for i, s in new:
            ids[i] = found[(s.key.thing_id, s.key.feature, s.key.path)]
        return ids

    def _insert_points(self, execute: Execute, prepared: Prepared) -> None:
        self._ensure_partitions(execute, prepared)
        buf = io.BytesIO()
        pacsv.write_csv(prepared.points, buf, pacsv.WriteOptions(include_header=False))
        with self._conn().cursor().copy("COPY egiz_points (series, ts, recv, seq, value, text) FROM STDIN "
                                        "(FORMAT csv)") as copy:
            copy.write(buf.getvalue())

    def _ensure_partitions(self, execute: Execute, prepared: Prepared) -> None:
        """The partitions the batch's points fall in (only those: not every one between its oldest and
        newest point), at most `max_partitions` of them, or Refused (400) naming the Things whose points
        lie outside the busiest ones."""
        w = self._width
        cells = np.floor(prepared.points.column("ts").to_numpy() / w).astype(np.int64)
        starts, counts = np.unique(cells, return_counts=True)
        if len(starts) > self._max_partitions:
            keep = starts[np.argsort(-counts, kind="stable")[:self._max_partitions]]
            stray = np.unique(prepared.points.column("series").to_numpy()[~np.isin(cells, keep)])
            things = sorted({self._thing_of(int(sid), prepared) for sid in stray})
            raise Refused(400, "too_many_partitions",
                          f"the batch's points span {len(starts)} storage partitions of {w // 86400} day(s), "
                          f"limit {self._max_partitions} (storage.max_partitions_per_batch); device times of "
                          f"{', '.join(things[:5])} are far apart", things)
        for cell in starts.tolist():
            start = int(cell) * w
            if start in self._partitions or start in self._pending_partitions:
                continue
            execute("SELECT pg_advisory_xact_lock(%s)", [_LOCK_PARTITION])
            execute(f"CREATE TABLE IF NOT EXISTS egiz_points_p{start} PARTITION OF egiz_points "
                    f"FOR VALUES FROM ({start}) TO ({start + w})", [])
            self._pending_partitions.add(start)

    def _thing_of(self, sid: int, prepared: Prepared) -> str:
        """The Thing of a store series id: a known one, or one this batch adds."""
        known = self.catalogue.series_keys.get(sid)
        if known is not None:
            return known[0].thing_id
        return next((s.key.thing_id for i, s in prepared.new_series if i == sid), "?")

    def _committed(self, prepared: Prepared) -> None:
        self._partitions |= self._pending_partitions  # only partitions whose transaction committed

    # ----------------------------------------------------------------- upkeep and point reads
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
