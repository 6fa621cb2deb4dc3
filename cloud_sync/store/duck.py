"""DuckDB backend of the aggregator: the shared point layout (`gateway.common.pointfile`) plus the
gateways, Things and anomalies tables (`central.CentralSql`), in one file.

Every batch is applied in one transaction that also moves the gateway's `last_seq`, so a batch is
applied completely or not at all, and never twice.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow as pa

from cloud_sync.store.anomalies import Execute
from cloud_sync.store.central import CentralSql, CentralStore, NewSeries, Prepared
from gateway.common.pointfile import PointFile
from gateway.common.wire import Batch

log = logging.getLogger(__name__)


class DuckStore(CentralStore, PointFile):
    """One DuckDB file for every site and line."""

    sql = CentralSql("?")
    engine_errors = (duckdb.Error,)

    def __init__(self, data_dir: Path, memory_limit_mb: int = 2048, checkpoint_mb: int = 64) -> None:
        CentralStore.__init__(self)
        PointFile.__init__(self, data_dir / "aggregator.duckdb", memory_limit_mb=memory_limit_mb,
                           checkpoint_mb=checkpoint_mb)
        self._next_id = 1

    def open(self) -> None:
        for sid, key, ttype, numeric in self.open_file():
            self.catalogue.remember(sid, key, ttype, numeric)
        for stmt in self.sql.schema():
            self.con.execute(stmt)
        self._next_id = self.high_id() + 1

    # ----------------------------------------------------------------- the engine's half
    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Execute]:
        con = self.con
        con.execute("BEGIN")
        try:
            yield con.execute
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")

    def _reader(self) -> Execute:
        return self.reader().execute

    def _series_ids(self, execute: Execute, batch: Batch, new: list[tuple[int, NewSeries]]) -> list[int]:
        ids = [self.catalogue.get(k) or 0 for k in batch.series]
        first = self.catalogue.next_id  # one writer: nobody else hands out ids in between
        rows = []
        for n, (i, s) in enumerate(new):
            ids[i] = first + n
            rows.append((first + n, s.key.thing_id, s.thing_type, s.key.feature, s.key.path, s.numeric))
        if rows:
            self.con.executemany("INSERT INTO series VALUES (?, ?, ?, ?, ?, ?)", rows)
        return ids

    def _insert_points(self, execute: Execute, prepared: Prepared) -> None:
        n = prepared.points.num_rows
        table = pa.table({"id": pa.array(range(self._next_id, self._next_id + n), pa.int64()),
                          **{c: prepared.points.column(c) for c in prepared.points.column_names}})
        self.con.register("egiz_batch", table)
        try:
            self.con.execute("INSERT INTO points SELECT * FROM egiz_batch")
        finally:
            self.con.unregister("egiz_batch")

    def _committed(self, prepared: Prepared) -> None:
        self._next_id += prepared.points.num_rows

    # ----------------------------------------------------------------- upkeep and checks
    def maintain(self, now: float) -> int:
        """Roll points up, then checkpoint a WAL past its threshold: DuckDB skips its own checkpoint
        while a reader's transaction is open, and an aggregator with dashboards open always has one,
        so without this the WAL (held in memory) would grow until the memory limit."""
        with self._write_lock:
            rolled = self.rollup(now, 120.0)
            if self.wal_over_threshold() and not self.checkpoint():
                log.warning("aggregator checkpoint postponed: a reader was busy; retrying next pass",
                            extra={"wal_bytes": self.wal_bytes()})
            return rolled

    def stored_seqs(self, thing_id: str, path: str) -> list[tuple[int, int]]:
        """(seq, copies) of one property of one Thing: what chaos tests compare."""
        return [(int(s), int(c)) for s, c in self.reader().execute(
            "SELECT p.seq, count(*) FROM points p JOIN series s ON p.series = s.id WHERE s.thing_id = ? "
            "AND s.path = ? GROUP BY p.seq ORDER BY p.seq", [thing_id, path]).fetchall()]
