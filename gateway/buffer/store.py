"""BufferStore: every SQL statement against the gateway's DuckDB file, as plain blocking methods.

The async side (`TelemetryBuffer`) calls the write methods from one writer thread and the read
methods from reader threads, each with its own cursor; DuckDB's MVCC keeps readers consistent while
the writer commits. Points are appended as Arrow batches in one transaction together with the new
series and the per-device sequence marks, so after a crash the stored points and the "already
stored" marks always agree: that is what makes redelivered messages safe to drop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from gateway.buffer.points import PointBatch
from gateway.common.series import SeriesKey

log = logging.getLogger(__name__)

ROLLUPS = {"1m": 60, "1h": 3600}
MAX_BOOTS_PER_THING = 4  # sequence marks kept per Thing, newest first

_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS series (id INTEGER, thing_id VARCHAR, type VARCHAR, feature VARCHAR, path VARCHAR, "
    "numeric BOOLEAN)",
    "CREATE TABLE IF NOT EXISTS points (id BIGINT, series INTEGER, ts DOUBLE, recv DOUBLE, seq BIGINT, "
    "value DOUBLE, text VARCHAR)",
    "CREATE TABLE IF NOT EXISTS seq_state (thing_id VARCHAR, boot VARCHAR, seq BIGINT, updated DOUBLE)",
    "CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, num DOUBLE)",
    *(
        f"CREATE TABLE IF NOT EXISTS rollup_{name} (series INTEGER, bucket DOUBLE, min DOUBLE, max DOUBLE, "
        "sum DOUBLE, count BIGINT, last DOUBLE, last_ts DOUBLE)"
        for name in ROLLUPS
    ),
]


@dataclass(frozen=True)
class OpenState:
    """What the async side needs to resume after a start: series ids, sequence marks, next point id."""

    series: list[tuple[int, SeriesKey, str, bool]]
    seq_marks: list[tuple[str, str, int, float]]
    next_id: int


@dataclass(frozen=True)
class Maintenance:
    """What one maintenance pass did."""

    rolled: int
    deleted_raw: int
    deleted_rollup: int


class BufferStore:
    """One DuckDB file; `open()` creates the schema, `commit()` appends one batch atomically."""

    def __init__(self, path: Path, *, memory_limit_mb: float, checkpoint_mb: float) -> None:
        self.path = path
        self._memory_limit_mb = memory_limit_mb
        self._checkpoint_mb = checkpoint_mb
        self._con: duckdb.DuckDBPyConnection | None = None
        self._local = threading.local()
        self._cursors: list[duckdb.DuckDBPyConnection] = []

    # ----------------------------------------------------------------- lifecycle (writer thread)
    def open(self) -> OpenState:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = duckdb.connect(str(self.path), config={
            "memory_limit": f"{int(self._memory_limit_mb)}MB",
            "threads": 2,
            # Fewer, larger checkpoints: every point is written to the WAL once and into the file
            # once per checkpoint; a larger threshold means fewer partial row groups rewritten.
            "checkpoint_threshold": f"{int(self._checkpoint_mb)}MB",
        })
        for stmt in _SCHEMA:
            con.execute(stmt)
        self._con = con
        series = [(int(i), SeriesKey(t, f, p), ty or "", bool(n)) for i, t, ty, f, p, n in
                  con.execute("SELECT id, thing_id, type, feature, path, numeric FROM series").fetchall()]
        marks = [(t, b, int(s), float(u)) for t, b, s, u in
                 con.execute("SELECT thing_id, boot, seq, updated FROM seq_state").fetchall()]
        return OpenState(series, marks, self.high_id() + 1)

    def high_id(self) -> int:
        """The highest point id ever given out: ids are never reused, even after every point is deleted."""
        row = self.con.execute("SELECT max(id) FROM points").fetchone()
        ids = [int(row[0]) if row and row[0] is not None else 0, int(self.get_meta("ids.high"))]
        ids += [int(self.get_meta_max(prefix)) for prefix in ("outbox.", *(f"rollup_{n}.id" for n in ROLLUPS))]
        return max(ids)

    def close(self) -> None:
        if self._con is not None:
            for cur in self._cursors:
                with contextlib.suppress(duckdb.Error):
                    cur.close()
            self._cursors.clear()
            self._local = threading.local()
            try:
                self.checkpoint()
            except duckdb.Error as exc:  # a full disk: the WAL keeps the data, replayed at the next open
                log.warning("could not checkpoint the buffer on close", extra={"error": str(exc)[:200]})
            finally:
                self._con.close()
                self._con = None

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        assert self._con is not None, "BufferStore.open() was not called"
        return self._con

    def reader(self) -> duckdb.DuckDBPyConnection:
        """A cursor of this thread (reader threads each get their own)."""
        cur = getattr(self._local, "cursor", None)
        if cur is None:
            cur = self._local.cursor = self.con.cursor()
            self._cursors.append(cur)
        return cur

    def _arrow_cursor(self) -> duckdb.DuckDBPyConnection:
        """A second cursor of this thread for relation queries (Arrow without a copy): the reader cursor
        may hold the unfinished result of a `fetchone()`, which a relation query refuses to follow."""
        cur = getattr(self._local, "arrow", None)
        if cur is None:
            cur = self._local.arrow = self.con.cursor()
            self._cursors.append(cur)
        return cur

    # ----------------------------------------------------------------- writes (writer thread)
    def commit(self, batch: PointBatch, first_id: int) -> None:
        """New series, points and sequence marks in one transaction: all or nothing."""
        con = self.con
        views = []
        if batch.series:
            con.register("egiz_points", batch.to_arrow(first_id))
            views.append("egiz_points")
        if batch.seq_marks:
            con.register("egiz_marks", pa.table({
                "thing_id": [t for t, _ in batch.seq_marks],
                "boot": [b for _, b in batch.seq_marks],
                "seq": pa.array(list(batch.seq_marks.values()), pa.int64()),
            }))
            views.append("egiz_marks")
        try:
            con.execute("BEGIN")
            try:
                if batch.new_series:
                    rows = [(i, k.thing_id, ty, k.feature, k.path, n) for i, k, ty, n in batch.new_series]
                    con.executemany("INSERT INTO series VALUES (?, ?, ?, ?, ?, ?)", rows)  # rare: a new property
                if batch.series:
                    con.execute("INSERT INTO points SELECT * FROM egiz_points")
                if batch.seq_marks:
                    con.execute("DELETE FROM seq_state USING egiz_marks m "
                                "WHERE seq_state.thing_id = m.thing_id AND seq_state.boot = m.boot")
                    con.execute("INSERT INTO seq_state SELECT thing_id, boot, seq, epoch(now()) FROM egiz_marks")
                con.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(duckdb.Error):  # a failed COMMIT has already ended it
                    con.execute("ROLLBACK")
                raise
        finally:
            for view in views:
                with contextlib.suppress(duckdb.Error):
                    con.unregister(view)

    def set_meta(self, key: str, num: float) -> None:
        self.con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, num])

    def set_metas(self, values: dict[str, float]) -> None:
        """Several numbers in one statement, so one transaction: a crash keeps all of them or none."""
        if values:
            rows = ", ".join("(?, ?)" for _ in values)
            self.con.execute(f"INSERT OR REPLACE INTO meta VALUES {rows}",
                             [x for kv in values.items() for x in kv])

    def get_meta(self, key: str, default: float = 0.0, cur: duckdb.DuckDBPyConnection | None = None) -> float:
        row = (cur or self.con).execute("SELECT num FROM meta WHERE key = ?", [key]).fetchone()
        return float(row[0]) if row else default

    def get_meta_max(self, prefix: str) -> float:
        row = self.con.execute("SELECT max(num) FROM meta WHERE starts_with(key, ?)", [prefix]).fetchone()
        return float(row[0]) if row and row[0] is not None else 0.0

    def rollup(self, now: float, late_s: float) -> int:
        """Roll closed buckets up incrementally; late points become extra partial rows merged on read.

        Each pass takes points with `wm <= ts < closed` (first time their bucket is closed) plus
        points that arrived since the last pass with `ts < wm` (late); together they cover every
        point exactly once.
        """
        con = self.con
        hi_row = con.execute("SELECT max(id) FROM points").fetchone()
        hi = int(hi_row[0]) if hi_row and hi_row[0] is not None else 0
        rolled = 0
        for name, width in ROLLUPS.items():
            wm = self.get_meta(f"rollup_{name}.ts", 0.0)
            last = int(self.get_meta(f"rollup_{name}.id", 0.0))
            closed = math.floor((now - late_s) / width) * width
            if closed <= wm and hi <= last:
                continue
            con.execute("BEGIN")
            try:
                # Two branches instead of one OR, so each can skip row groups by its own zone maps.
                res = con.execute(
                    f"INSERT INTO rollup_{name} "
                    f"SELECT series, floor(ts / {width}) * {width}, min(value), max(value), sum(value), count(*), "
                    "arg_max(value, ts), max(ts) FROM ("
                    "  SELECT series, ts, value FROM points WHERE ts >= $wm AND ts < $closed AND id <= $hi"
                    "  UNION ALL"
                    "  SELECT series, ts, value FROM points WHERE id > $last AND id <= $hi AND ts < $wm"
                    ") WHERE value IS NOT NULL GROUP BY ALL",
                    {"hi": hi, "wm": wm, "closed": max(closed, wm), "last": last},
                ).fetchone()
                rolled += int(res[0]) if res else 0
                self.set_meta(f"rollup_{name}.ts", max(closed, wm))
                self.set_meta(f"rollup_{name}.id", hi)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return rolled

    def retention(self, now: float, raw_days: float, rollup_days: dict[str, float]) -> tuple[int, int]:
        """Delete raw points and roll-up rows older than their retention; never raw points not yet rolled."""
        con = self.con
        self.set_meta("ids.high", self.high_id())
        wm = min(self.get_meta(f"rollup_{n}.ts", 0.0) for n in ROLLUPS)
        cut = min(now - raw_days * 86400, wm)
        res = con.execute("DELETE FROM points WHERE ts < ?", [cut]).fetchone()
        raw = int(res[0]) if res else 0
        rolled = 0
        for name, days in rollup_days.items():
            res = con.execute(f"DELETE FROM rollup_{name} WHERE bucket < ?", [now - days * 86400]).fetchone()
            rolled += int(res[0]) if res else 0
        con.execute(
            "DELETE FROM seq_state WHERE (thing_id, boot) IN (SELECT thing_id, boot FROM "
            "(SELECT thing_id, boot, row_number() OVER (PARTITION BY thing_id ORDER BY updated DESC) AS r "
            f"FROM seq_state) WHERE r > {MAX_BOOTS_PER_THING})"
        )
        return raw, rolled

    def drop_oldest(self, count: int, max_id: int | None, *, synced_id: int | None = None) -> tuple[int, int]:
        """Delete the `count` oldest raw points (by arrival), only up to `max_id` when given.

        Returns (deleted, of which not yet confirmed by the uplink when `synced_id` is given).
        """
        if count <= 0:
            return 0, 0
        con = self.con
        self.set_meta("ids.high", self.high_id())
        where = "" if max_id is None else f"WHERE id <= {int(max_id)}"
        row = con.execute(f"SELECT id FROM points {where} ORDER BY id LIMIT 1 OFFSET ?", [count - 1]).fetchone()
        if row is None:
            row = con.execute(f"SELECT max(id) FROM points {where}").fetchone()
            if row is None or row[0] is None:
                return 0, 0
        upto = int(row[0])
        unsent = 0
        if synced_id is not None and upto > synced_id:
            got = con.execute("SELECT count(*) FROM points WHERE id > ? AND id <= ?", [synced_id, upto]).fetchone()
            unsent = int(got[0]) if got else 0
        res = con.execute("DELETE FROM points WHERE id <= ?", [upto]).fetchone()
        return (int(res[0]) if res else 0), unsent

    def checkpoint(self) -> bool:
        """Write the WAL into the file and release blocks freed by deletes; False when a reader is busy
        (DuckDB then checkpoints on its own later)."""
        try:
            self.con.execute("CHECKPOINT")
        except duckdb.TransactionException:
            return False
        return True

    # ----------------------------------------------------------------- sizes (any thread)
    def duckdb_free_bytes(self) -> int:
        row = self.reader().execute("SELECT block_size, free_blocks FROM pragma_database_size()").fetchone()
        return int(row[0]) * int(row[1]) if row else 0

    def point_count(self, max_id: int | None = None) -> int:
        where = "" if max_id is None else f" WHERE id <= {int(max_id)}"
        row = self.reader().execute(f"SELECT count(*) FROM points{where}").fetchone()
        return int(row[0]) if row else 0

    # ----------------------------------------------------------------- reads (reader threads)
    def raw(self, series: list[int], start: float, end: float, limit: int, *,
            text: bool = True) -> dict[str, np.ndarray]:
        """Raw points of some series in `[start, end)`, ordered by series then time.

        Sorting happens in numpy: the rows come back nearly sorted, and a stable sort of nearly
        sorted data is cheaper than DuckDB's ORDER BY.
        """
        cols = "series, ts, value, text" if text else "series, ts, value"
        data = self.reader().execute(
            f"SELECT {cols} FROM points WHERE series IN (SELECT unnest($s)) AND ts >= $a AND ts < $b LIMIT $n",
            {"s": series, "a": start, "b": end, "n": limit},
        ).fetchnumpy()
        order = np.lexsort((data["ts"], data["series"]))
        if not np.array_equal(order, np.arange(len(order))):
            data = {k: v[order] for k, v in data.items()}
        return data

    def count(self, series: list[int], start: float, end: float) -> int:
        row = self.reader().execute(
            "SELECT count(*) FROM points WHERE series IN (SELECT unnest($s)) AND ts >= $a AND ts < $b",
            {"s": series, "a": start, "b": end},
        ).fetchone()
        return int(row[0]) if row else 0

    def buckets(self, series: list[int], start: float, end: float, width: float) -> dict[str, np.ndarray]:
        """min/max/avg/count/last per series and bucket of `width` seconds.

        Buckets come from the widest roll-up that divides `width`, for the part already rolled up,
        and from raw points for the rest, merged per bucket.
        """
        cur = self.reader()
        source = next((n for n, w in sorted(ROLLUPS.items(), key=lambda kv: -kv[1]) if width % w == 0), None)
        parts = []
        params: dict[str, Any] = {"s": series, "a": start, "b": end, "w": width}
        raw_from = start
        if source is not None:
            wm = self.get_meta(f"rollup_{source}.ts", 0.0, cur)
            raw_from = max(start, wm)
            if wm > start:
                parts.append(
                    f"SELECT series, floor(bucket / $w) * $w AS b, min AS lo, max AS hi, sum AS total, count AS n, "
                    f"last, last_ts FROM rollup_{source} WHERE series IN (SELECT unnest($s)) AND bucket >= $a "
                    "AND bucket < least($b, $rf)"
                )
        params["rf"] = raw_from
        parts.append(
            "SELECT series, floor(ts / $w) * $w AS b, value AS lo, value AS hi, value AS total, 1 AS n, value AS last, "
            "ts AS last_ts FROM points WHERE series IN (SELECT unnest($s)) AND value IS NOT NULL "
            "AND ts >= greatest($a, $rf) AND ts < $b"
        )
        sql = (
            "SELECT series, b AS t, min(lo) AS min, max(hi) AS max, sum(total) / sum(n) AS avg, sum(n) AS count, "
            f"arg_max(last, last_ts) AS last FROM ({' UNION ALL '.join(parts)}) GROUP BY series, b ORDER BY series, b"
        )
        return cur.execute(sql, params).fetchnumpy()

    def context_points(self, series: list[int], start: float, end: float) -> dict[str, np.ndarray]:
        """Context values (e.g. batch_id) in `[start, end)`, plus the one in effect at `start`."""
        return self.reader().execute(
            "SELECT ts, text FROM ("
            "  (SELECT ts, text FROM points WHERE series IN (SELECT unnest($s)) AND ts < $a ORDER BY ts DESC LIMIT 1)"
            "  UNION ALL"
            "  SELECT ts, text FROM points WHERE series IN (SELECT unnest($s)) AND ts >= $a AND ts < $b"
            ") ORDER BY ts",
            {"s": series, "a": start, "b": end},
        ).fetchnumpy()

    def outbox(self, after_id: int, limit: int, upto: int | None = None) -> pa.Table:
        """Points with `after_id < id <= upto` in id order: id, series, ts, recv, seq, value, text."""
        hi = "" if upto is None else f" AND id <= {int(upto)}"
        return self._arrow_cursor().sql(
            f"SELECT id, series, ts, recv, seq, value, text FROM points WHERE id > ?{hi} ORDER BY id LIMIT ?",
            params=[after_id, limit],
        ).to_arrow_table()

    def recv_of_first_after(self, after_id: int) -> float | None:
        row = self.reader().execute("SELECT recv FROM points WHERE id > ? ORDER BY id LIMIT 1", [after_id]).fetchone()
        return float(row[0]) if row else None

    def points_of(self, thing_ids: list[str] | None, start: float, end: float) -> pa.Table:
        """Every stored point of some Things (all when None) in `[start, end)`, ordered by time."""
        where = "" if thing_ids is None else "AND s.thing_id IN (SELECT unnest($t))"
        params: dict[str, Any] = {"a": start, "b": end}
        if thing_ids is not None:
            params["t"] = thing_ids
        return self._arrow_cursor().sql(
            "SELECT s.thing_id, s.feature, s.path, p.ts, p.value, p.text FROM points p JOIN series s "
            f"ON p.series = s.id WHERE p.ts >= $a AND p.ts < $b {where} ORDER BY p.ts, p.id",
            params=params,
        ).to_arrow_table()

    def latest_since(self, recv_after: float) -> list[tuple[str, str, str, str, Any, Any, float, float]]:
        """The newest value of every series that received points after `recv_after`."""
        return self.reader().execute(
            "SELECT s.thing_id, s.type, s.feature, s.path, arg_max(p.value, p.id), arg_max(p.text, p.id), "
            "max(p.recv), max(p.ts) FROM points p JOIN series s ON p.series = s.id WHERE p.recv > ? "
            "GROUP BY ALL",
            [recv_after],
        ).fetchall()


def directory_bytes(path: Path) -> int:
    """Bytes the files under `path` take on disk."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.stat(os.path.join(root, name))
            except FileNotFoundError:
                continue  # removed while walking (a WAL after a checkpoint)
            total += st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size
    return total
