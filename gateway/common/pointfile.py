"""A DuckDB file of series and points (plus roll-ups and a few durable numbers), as plain blocking
methods: the layout the gateway's buffer and the aggregator's DuckDB store share, so a history answer
is read the same way from either.

One writer thread holds the connection; every other thread (readers, the gateway's maintenance pass)
gets its own cursor, and DuckDB's MVCC keeps them consistent while the writer commits. The methods a
maintenance pass runs take the cursor to write with (`cur`); without one they use the writer's connection.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from pathlib import Path
from typing import Any, Protocol

import duckdb
import numpy as np

from gateway.common.series import SeriesKey

log = logging.getLogger(__name__)

ROLLUPS = {"1m": 60, "1h": 3600}

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS series (id INTEGER, thing_id VARCHAR, type VARCHAR, feature VARCHAR, path VARCHAR, "
    "numeric BOOLEAN)",
    "CREATE TABLE IF NOT EXISTS points (id BIGINT, series INTEGER, ts DOUBLE, recv DOUBLE, seq BIGINT, "
    "value DOUBLE, text VARCHAR)",
    "CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, num DOUBLE)",
    *(
        f"CREATE TABLE IF NOT EXISTS rollup_{name} (series INTEGER, bucket DOUBLE, min DOUBLE, max DOUBLE, "
        "sum DOUBLE, count BIGINT, last DOUBLE, last_ts DOUBLE)"
        for name in ROLLUPS
    ),
]

class Rows(Protocol):
    """A query's result: a DuckDB cursor, or a DB-API cursor of another engine."""

    def fetchall(self) -> list[Any]: ...


def one(result: Rows) -> tuple[Any, ...] | None:
    """The first row of a result, read to its end. A result left unfinished (as `fetchone()` leaves
    it) keeps its read transaction open until the cursor's next query, and while another transaction
    is open DuckDB does not checkpoint a commit that updates rows: the WAL, and DuckDB's memory with
    it, would grow until the memory limit refuses the next commit."""
    rows = result.fetchall()
    return rows[0] if rows else None


def _put_meta(con: duckdb.DuckDBPyConnection, values: dict[str, float]) -> None:
    """Write durable numbers: an UPDATE of the keys that exist, an INSERT of those that do not.

    Not `INSERT OR REPLACE`: DuckDB runs it as a delete and an insert against the key's index, and
    each such statement left 1-2.5 KiB of native memory behind that no checkpoint returned (linear
    over 20,000 statements, each slower than the one before). The uplink writes its batch numbers
    twice a batch and the maintenance pass its watermarks at every pass: thousands of statements an
    hour on a busy line, MiB an hour that never came back. An UPDATE of the value column leaves the
    index alone.
    """
    keys = list(values)
    marks = ", ".join("?" for _ in keys)
    whens = " ".join("WHEN ? THEN ?" for _ in keys)
    row = one(con.execute(f"UPDATE meta SET num = CASE key {whens} END WHERE key IN ({marks})",
                          [x for kv in values.items() for x in kv] + keys))
    if row is not None and int(row[0]) == len(keys):
        return
    have = {k for (k,) in con.execute(f"SELECT key FROM meta WHERE key IN ({marks})", keys).fetchall()}
    new = [k for k in keys if k not in have]
    if new:
        con.execute(f"INSERT INTO meta VALUES {', '.join('(?, ?)' for _ in new)}",
                    [x for k in new for x in (k, values[k])])


class PointFile:
    """One DuckDB file of series and points; `open_file()` creates the schema and lists the series."""

    threads = 2  # DuckDB's worker threads for this file's queries

    def __init__(self, path: Path, *, memory_limit_mb: float, checkpoint_mb: float) -> None:
        self.path = path
        self._memory_limit_mb = memory_limit_mb
        self._checkpoint_mb = checkpoint_mb
        self._con: duckdb.DuckDBPyConnection | None = None
        self._local = threading.local()
        self._cursors: list[duckdb.DuckDBPyConnection] = []

    def high_id(self, cur: duckdb.DuckDBPyConnection | None = None) -> int:
        """The highest point id ever given out: ids are never reused, even after every point is deleted."""
        row = one((cur or self.con).execute("SELECT max(id) FROM points"))
        ids = [int(row[0]) if row and row[0] is not None else 0, int(self.get_meta("ids.high", cur=cur))]
        ids += [int(self.get_meta_max(prefix, cur)) for prefix in ("outbox.", *(f"rollup_{n}.id" for n in ROLLUPS))]
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
        """A cursor of this thread (reader threads and the maintenance thread each get their own)."""
        cur = getattr(self._local, "cursor", None)
        if cur is None:
            cur = self._local.cursor = self.con.cursor()
            self._cursors.append(cur)
        return cur

    def _arrow_cursor(self) -> duckdb.DuckDBPyConnection:
        """A second cursor of this thread for relation queries (Arrow without a copy), kept apart from
        the reader cursor's plain queries."""
        cur = getattr(self._local, "arrow", None)
        if cur is None:
            cur = self._local.arrow = self.con.cursor()
            self._cursors.append(cur)
        return cur

    def set_meta(self, key: str, num: float, cur: duckdb.DuckDBPyConnection | None = None) -> None:
        """One durable number, in the caller's transaction if one is open (the roll-up's)."""
        _put_meta(cur or self.con, {key: num})

    def set_metas(self, values: dict[str, float]) -> None:
        """Several numbers in one transaction: a crash keeps all of them or none."""
        if not values:
            return
        con = self.con
        con.execute("BEGIN")
        try:
            _put_meta(con, values)
            con.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(duckdb.Error):  # a failed COMMIT has already ended it
                con.execute("ROLLBACK")
            raise

    def get_meta(self, key: str, default: float = 0.0, cur: duckdb.DuckDBPyConnection | None = None) -> float:
        row = one((cur or self.con).execute("SELECT num FROM meta WHERE key = ?", [key]))
        return float(row[0]) if row else default

    def get_meta_max(self, prefix: str, cur: duckdb.DuckDBPyConnection | None = None) -> float:
        row = one((cur or self.con).execute("SELECT max(num) FROM meta WHERE starts_with(key, ?)", [prefix]))
        return float(row[0]) if row and row[0] is not None else 0.0

    def rollup(self, now: float, late_s: float, cur: duckdb.DuckDBPyConnection | None = None) -> int:
        """Roll closed buckets up incrementally; late points become extra partial rows merged on read.

        Each pass takes points with `wm <= ts < closed` (first time their bucket is closed) plus
        points that arrived since the last pass with `ts < wm` (late); together they cover every
        point exactly once. Points committed while it runs have higher ids than `hi` (one writer
        gives out ids in commit order), so they wait for the next pass.
        """
        con = cur or self.con
        hi_row = one(con.execute("SELECT max(id) FROM points"))
        hi = int(hi_row[0]) if hi_row and hi_row[0] is not None else 0
        rolled = 0
        for name, width in ROLLUPS.items():
            wm = self.get_meta(f"rollup_{name}.ts", 0.0, con)
            last = int(self.get_meta(f"rollup_{name}.id", 0.0, con))
            closed = math.floor((now - late_s) / width) * width
            if closed <= wm and hi <= last:
                continue
            con.execute("BEGIN")
            try:
                # Two branches instead of one OR, so each can skip row groups by its own zone maps.
                res = one(con.execute(
                    f"INSERT INTO rollup_{name} "
                    f"SELECT series, floor(ts / {width}) * {width}, min(value), max(value), sum(value), count(*), "
                    "arg_max(value, ts), max(ts) FROM ("
                    "  SELECT series, ts, value FROM points WHERE ts >= $wm AND ts < $closed AND id <= $hi"
                    "  UNION ALL"
                    "  SELECT series, ts, value FROM points WHERE id > $last AND id <= $hi AND ts < $wm"
                    ") WHERE value IS NOT NULL GROUP BY ALL",
                    {"hi": hi, "wm": wm, "closed": max(closed, wm), "last": last},
                ))
                rolled += int(res[0]) if res else 0
                self.set_meta(f"rollup_{name}.ts", max(closed, wm), con)
                self.set_meta(f"rollup_{name}.id", hi, con)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return rolled

    def checkpoint(self, cur: duckdb.DuckDBPyConnection | None = None) -> bool:
        """Write the WAL into the file and release blocks freed by deletes; False when another
        transaction is open (the caller tries again later: DuckDB's own checkpoint at its threshold is
        skipped in the same case, so a WAL left behind stays until someone asks again). Commits wait
        while it runs, on any cursor."""
        try:
            (cur or self.con).execute("CHECKPOINT")
        except duckdb.TransactionException:
            return False
        return True

    def wal_bytes(self) -> int:
        """Size of the write-ahead log: what DuckDB holds in memory until the next checkpoint."""
        try:
            return self.path.with_name(self.path.name + ".wal").stat().st_size
        except FileNotFoundError:
            return 0

    def wal_over_threshold(self) -> bool:
        """The WAL has passed the checkpoint threshold this file was opened with."""
        return self.wal_bytes() > self._checkpoint_mb * 2**20

    # ----------------------------------------------------------------- sizes (any thread)
    def duckdb_free_bytes(self) -> int:
        row = one(self.reader().execute("SELECT block_size, free_blocks FROM pragma_database_size()"))
        return int(row[0]) * int(row[1]) if row else 0

    def memory_bytes(self) -> int:
        """What DuckDB holds in memory: cached blocks, data not yet checkpointed, indexes (at most its
        memory limit, which it evicts down to)."""
        row = one(self.reader().execute("SELECT sum(memory_usage_bytes) FROM duckdb_memory()"))
        return int(row[0] or 0) if row else 0

    def point_count(self, max_id: int | None = None) -> int:
        where = "" if max_id is None else f" WHERE id <= {int(max_id)}"
        row = one(self.reader().execute(f"SELECT count(*) FROM points{where}"))
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
        row = one(self.reader().execute(
            "SELECT count(*) FROM points WHERE series IN (SELECT unnest($s)) AND ts >= $a AND ts < $b",
            {"s": series, "a": start, "b": end},
        ))
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

    def open_file(self) -> list[tuple[int, SeriesKey, str, bool]]:
        """Connect, create the schema, and return every stored series (id, key, type, numeric)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = duckdb.connect(str(self.path), config={
            "memory_limit": f"{int(self._memory_limit_mb)}MB",
            "threads": self.threads,
            # Fewer, larger checkpoints: every point is written to the WAL once and into the file
            # once per checkpoint; a larger threshold means fewer partial row groups rewritten.
            "checkpoint_threshold": f"{int(self._checkpoint_mb)}MB",
            # DuckDB keeps up to 128 MB of freed memory for reuse by default; a gateway on a small
            # board gives it back instead.
            "allocator_flush_threshold": "8MB",
        })
        for stmt in SCHEMA:
            con.execute(stmt)
        self._con = con
        return [(int(i), SeriesKey(t, f, p), ty or "", bool(n)) for i, t, ty, f, p, n in
                con.execute("SELECT id, thing_id, type, feature, path, numeric FROM series").fetchall()]
