"""BufferStore: the gateway's DuckDB file (the shared point layout of `gateway.common.pointfile`, plus
sequence marks and the outbox), as plain blocking methods.

The async side (`TelemetryBuffer`) calls the write methods from one writer thread and the read
methods from reader threads, each with its own cursor; DuckDB's MVCC keeps readers consistent while
the writer commits. The maintenance pass (roll-ups, retention, the disk budget) writes through its
own cursor beside the commits: it only deletes points and superseded sequence marks, which commits
only append, and writes tables and meta keys the writer thread never writes, so the two do not
conflict. Points are appended as batches of NumPy columns in one transaction together with the new
series and the per-device sequence marks, so after a crash the stored points and the "already stored"
marks always agree: that is what makes redelivered messages safe to drop.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np

from gateway.buffer.points import PointBatch, nullable_int64
from gateway.common.pointfile import ROLLUPS, PointFile, one
from gateway.common.series import SeriesKey

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

MAX_BOOTS_PER_THING = 4  # sequence marks kept per Thing, newest first

_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS seq_state (thing_id VARCHAR, boot VARCHAR, seq BIGINT, updated DOUBLE)",
    # the anti-replay bitmap below `seq`; NULL in files written before it existed (= all seen)
    "ALTER TABLE seq_state ADD COLUMN IF NOT EXISTS seen BLOB",
    # the commit that wrote the row: marks are appended, the newest row of a (Thing, boot) is its mark;
    # NULL in files written before (one row per (Thing, boot) then)
    "ALTER TABLE seq_state ADD COLUMN IF NOT EXISTS n BIGINT",
]


@dataclass(frozen=True)
class OpenState:
    """What the async side needs to resume after a start: series ids, sequence marks, next point id."""

    series: list[tuple[int, SeriesKey, str, bool]]
    seq_marks: list[tuple[str, str, int, float, int | None]]
    next_id: int


@dataclass(frozen=True)
class Maintenance:
    """What one maintenance pass did."""

    rolled: int
    deleted_raw: int
    deleted_rollup: int


class BufferStore(PointFile):
    """The gateway's buffer file: the shared point layout plus sequence marks and the outbox;
    `open()` creates the schema, `commit()` appends one batch atomically."""

    # One DuckDB thread on a line gateway: a second made neither the roll-ups nor a history read
    # faster on a loaded two-core board, and its allocator arena and buffers added 1-7 MiB to the
    # peak with 200 Things at 1k msg/s (docs/performance.md). The aggregator keeps two.
    threads = 1

    _commits: int  # the number of the last commit that wrote sequence marks (seq_state.n)

    # ----------------------------------------------------------------- lifecycle (writer thread)
    def open(self) -> OpenState:
        series = self.open_file()
        for stmt in _SCHEMA:
            self.con.execute(stmt)
        marks = [(t, b, int(s), float(u), None if w is None else int.from_bytes(w, "little")) for t, b, s, u, w in
                 self.con.execute("SELECT thing_id, boot, seq, updated, seen FROM seq_state QUALIFY row_number() "
                                  "OVER (PARTITION BY thing_id, boot ORDER BY coalesce(n, 0) DESC) = 1").fetchall()]
        row = one(self.con.execute("SELECT max(n) FROM seq_state"))
        self._commits = int(row[0]) if row and row[0] is not None else 0
        return OpenState(series, marks, self.high_id() + 1)

    # ----------------------------------------------------------------- writes (writer thread)
    def commit(self, batch: PointBatch, first_id: int) -> None:
        """New series, points and sequence marks in one transaction: all or nothing.

        A commit runs a few times a second, so its fixed cost is most of what the buffer costs: the
        columns (dicts of NumPy arrays) are read by name from this function's locals (DuckDB's
        replacement scan; registering and unregistering a view costs about as much as the insert).
        The sequence marks are appended, numbered by commit, never updated: an UPDATE joined with the
        batch's marks on every commit made DuckDB slower and larger by the hour, and kept it from
        checkpointing while a reader was busy. The maintenance pass removes the superseded rows.
        """
        con = self.con
        n = self._commits + 1
        egiz_points = batch.columns(first_id) if batch.series else None  # noqa: F841 (read by the SQL below)
        egiz_marks = _marks_table(batch, list(batch.seq_marks)) if batch.seq_marks else None  # noqa: F841
        if batch.new_series:  # many at once when Things register: 10k Things bring 80k series
            egiz_series = {  # noqa: F841 (read by the SQL below)
                "id": np.array([i for i, _k, _t, _n in batch.new_series], np.int32),
                "thing_id": np.array([k.thing_id for _i, k, _t, _n in batch.new_series], object),
                "type": np.array([t for _i, _k, t, _n in batch.new_series], object),
                "feature": np.array([k.feature for _i, k, _t, _n in batch.new_series], object),
                "path": np.array([k.path for _i, k, _t, _n in batch.new_series], object),
                "numeric": np.array([n for _i, _k, _t, n in batch.new_series], np.bool_),
            }
        con.execute("BEGIN")
        try:
            if batch.new_series:
                con.execute("INSERT INTO series SELECT * FROM egiz_series")
            if batch.series:
                con.execute("INSERT INTO points SELECT * FROM egiz_points")
            if batch.seq_marks:
                con.execute("INSERT INTO seq_state SELECT thing_id, boot, seq, epoch(now()), seen, $n FROM egiz_marks",
                            {"n": n})
            con.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(duckdb.Error):  # a failed COMMIT has already ended it
                con.execute("ROLLBACK")
            raise
        if batch.seq_marks:
            self._commits = n

    def retention(self, now: float, raw_days: float, rollup_days: dict[str, float],
                  cur: duckdb.DuckDBPyConnection | None = None) -> tuple[int, int]:
        """Delete raw points and roll-up rows older than their retention; never raw points not yet rolled
        (by time: older than every roll-up's watermark; by id: up to every roll-up's last id, as points
        may be committed while the maintenance pass runs)."""
        con = cur or self.con
        self.set_meta("ids.high", self.high_id(con), con)
        wm = min(self.get_meta(f"rollup_{n}.ts", 0.0, con) for n in ROLLUPS)
        rolled_id = min(self.get_meta(f"rollup_{n}.id", 0.0, con) for n in ROLLUPS)
        cut = min(now - raw_days * 86400, wm)
        res = one(con.execute("DELETE FROM points WHERE ts < ? AND id <= ?", [cut, rolled_id]))
        raw = int(res[0]) if res else 0
        rolled = 0
        for name, days in rollup_days.items():
            res = one(con.execute(f"DELETE FROM rollup_{name} WHERE bucket < ?", [now - days * 86400]))
            rolled += int(res[0]) if res else 0
        return raw, rolled

    def trim_marks(self, cur: duckdb.DuckDBPyConnection | None = None) -> int:
        """Keep only the newest row of each (Thing, boot), of each Thing's newest `MAX_BOOTS_PER_THING`
        boots; returns how many rows were removed. Commits only append rows, numbered higher than any
        this pass sees, so the pass and the commits never write the same row."""
        res = one((cur or self.con).execute(
            "DELETE FROM seq_state WHERE (thing_id, boot, coalesce(n, 0)) NOT IN ("
            "  SELECT thing_id, boot, max(coalesce(n, 0)) FROM seq_state GROUP BY thing_id, boot"
            "  QUALIFY row_number() OVER (PARTITION BY thing_id ORDER BY max(updated) DESC) "
            f"<= {MAX_BOOTS_PER_THING})"
        ))
        return int(res[0]) if res else 0

    def drop_oldest(self, count: int, max_id: int | None, *, synced_id: int | None = None,
                    cur: duckdb.DuckDBPyConnection | None = None) -> tuple[int, int]:
        """Delete the `count` oldest raw points (by arrival), only up to `max_id` when given.

        Returns (deleted, of which not yet confirmed by the uplink when `synced_id` is given).
        """
        if count <= 0:
            return 0, 0
        con = cur or self.con
        self.set_meta("ids.high", self.high_id(con), con)
        where = "" if max_id is None else f"WHERE id <= {int(max_id)}"
        row = one(con.execute(f"SELECT id FROM points {where} ORDER BY id LIMIT 1 OFFSET ?", [count - 1]))
        if row is None:
            row = one(con.execute(f"SELECT max(id) FROM points {where}"))
            if row is None or row[0] is None:
                return 0, 0
        upto = int(row[0])
        unsent = 0
        if synced_id is not None and upto > synced_id:
            got = one(con.execute("SELECT count(*) FROM points WHERE id > ? AND id <= ?", [synced_id, upto]))
            unsent = int(got[0]) if got else 0
        res = one(con.execute("DELETE FROM points WHERE id <= ?", [upto]))
        return (int(res[0]) if res else 0), unsent

    def outbox(self, after_id: int, limit: int, upto: int | None = None) -> pa.Table:
        """Points with `after_id < id <= upto` in id order: id, series, ts, recv, seq, value, text."""
        hi = "" if upto is None else f" AND id <= {int(upto)}"
        return self._arrow_cursor().sql(
            f"SELECT id, series, ts, recv, seq, value, text FROM points WHERE id > ?{hi} ORDER BY id LIMIT ?",
            params=[after_id, limit],
        ).to_arrow_table()

    def recv_of_first_after(self, after_id: int) -> float | None:
        row = one(self.reader().execute("SELECT recv FROM points WHERE id > ? ORDER BY id LIMIT 1", [after_id]))
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


def _marks_table(batch: PointBatch, keys: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    """Sequence marks of some (Thing, boot)s: the highest seq and the anti-replay bitmap as bytes."""
    marks = batch.seq_marks
    tops = [marks[k] for k in keys]
    return {
        "thing_id": np.array([t for t, _ in keys], object),
        "boot": np.array([b for _, b in keys], object),
        "seq": nullable_int64([top for top, _ in tops]),
        "seen": np.array([seen.to_bytes((seen.bit_length() + 7) // 8, "little") for _, seen in tops], object),
    }


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
