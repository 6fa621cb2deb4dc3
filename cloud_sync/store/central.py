"""What both central stores do the same way: apply a batch in one transaction, and keep gateways,
Things and anomalies in the same tables with the same SQL.

A backend (`duck.DuckStore`, `pg.PgStore`) supplies only what its engine does differently: the
transaction, how new series get their ids, how points go in, and the point reads. The series
catalogue learns new series only after their transaction committed, so a rolled-back batch leaves
nothing behind in memory.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from cloud_sync.store import Applied, GatewayRow, Refused, StoreError
from cloud_sync.store.anomalies import AnomalySql, Execute, where
from gateway.common.alarms import JournalQuery
from gateway.common.pointfile import one
from gateway.common.series import SeriesCatalogue, SeriesIndexed, SeriesKey
from gateway.common.wire import Action, Batch


@dataclass(frozen=True)
class NewSeries:
    """A series a batch brings that the store does not know yet."""

    key: SeriesKey
    thing_type: str
    numeric: bool  # by its first point in the batch


@dataclass(frozen=True)
class Prepared:
    """A batch ready for the engine: its points with the store's series ids, and what it adds."""

    points: pa.Table  # series (store ids), ts, recv, seq, value, text
    new_series: list[tuple[int, NewSeries]]
    lag_s: float  # how old the newest point was when the gateway sent the batch
    clock_offset_s: float  # received_at - sent_at: the gateway's clock against ours


def new_series_of(batch: Batch, catalogue: SeriesCatalogue) -> list[tuple[int, NewSeries]]:
    """(index in the batch's series list, series) of every series the catalogue does not know."""
    missing = [i for i, k in enumerate(batch.series) if k not in catalogue]
    if not missing:
        return []
    types = {d.id: d.type for d in batch.things}
    first_numeric: dict[int, bool] = {}
    if batch.points.num_rows:
        valid = batch.points.column("value").is_valid().to_numpy(zero_copy_only=False)
        for i, num in zip(batch.points.column("series").to_numpy(), valid, strict=True):
            first_numeric.setdefault(int(i), bool(num))
    out = []
    for i in missing:
        thing, feature, path = batch.series[i]
        out.append((i, NewSeries(SeriesKey(thing, feature, path), types.get(thing, ""), first_numeric.get(i, True))))
    return out


def prepare(batch: Batch, ids: Sequence[int], new: list[tuple[int, NewSeries]], received_at: float) -> Prepared:
    """The batch's points re-keyed to the store's series ids (`ids[i]` for the batch's series i)."""
    pts = batch.points
    table = pa.table({
        "series": pa.array(ids, pa.int32()).take(pts.column("series")),
        "ts": pts.column("ts"), "recv": pts.column("recv"), "seq": pts.column("seq"),
        "value": pts.column("value"), "text": pts.column("text"),
    })
    newest = float(np.max(pts.column("recv").to_numpy())) if pts.num_rows else None
    lag = max(0.0, batch.sent_at - newest) if newest is not None else 0.0
    offset = received_at - batch.sent_at if batch.sent_at else 0.0
    return Prepared(table, [(ids[i], s) for i, s in new], lag, offset)


class CentralSql:
    """The gateways and Things tables, in SQL both engines speak (only the placeholder differs)."""

    def __init__(self, placeholder: str, prefix: str = "", *, lock_row: str = "") -> None:
        self.p = placeholder
        self.gateways = f"{prefix}gateways"
        self.things = f"{prefix}things"
        self.owners = f"{prefix}owners"
        self.lock_row = lock_row  # " FOR UPDATE" where replicas share the database
        self.anomaly = AnomalySql(placeholder, prefix=prefix)

    def schema(self) -> list[str]:
        return [
            f"CREATE TABLE IF NOT EXISTS {self.gateways} (gateway_id VARCHAR PRIMARY KEY, site VARCHAR NOT NULL, "
            "line VARCHAR NOT NULL, last_seq BIGINT NOT NULL, last_seen DOUBLE PRECISION, points BIGINT NOT NULL "
            "DEFAULT 0, backlog VARCHAR, lag_s DOUBLE PRECISION, clock_offset_s DOUBLE PRECISION)",
            f"CREATE TABLE IF NOT EXISTS {self.things} (id VARCHAR PRIMARY KEY, site VARCHAR, line VARCHAR, "
            "gateway_id VARCHAR, type VARCHAR, version BIGINT, last_updated DOUBLE PRECISION, doc VARCHAR, "
            "deleted BOOLEAN NOT NULL DEFAULT false)",
            f"CREATE TABLE IF NOT EXISTS {self.owners} (thing_id VARCHAR PRIMARY KEY, gateway_id VARCHAR NOT NULL)",
            *self.anomaly.schema(),
            # a store written before owners were kept: each Thing belongs to the gateway that sent it
            f"INSERT INTO {self.owners} SELECT id, gateway_id FROM {self.things} WHERE gateway_id IS NOT NULL "
            "ON CONFLICT (thing_id) DO NOTHING",
        ]

    def claim(self, execute: Execute, batch: Batch) -> None:
        """Inside the batch's transaction: every Thing the batch touches becomes the batch's gateway's if
        nobody owns it yet; raises Refused (403 foreign_thing) naming the Things and anomalies that
        belong to another gateway (the transaction is then rolled back: nothing is applied)."""
        p, gw = self.p, batch.gateway_id
        touched = sorted({k[0] for k in batch.series} | {d.id for d in batch.things} | set(batch.deleted)
                         | {a.thing_id for a in batch.anomalies})
        foreign: list[str] = []
        for chunk in _chunks(touched, CHUNK):
            # the Things already owned are read, and only the others inserted: DuckDB plans `ON CONFLICT`
            # as a MERGE, and every such statement leaves native memory behind for good (docs/performance.md)
            owned = dict(execute(f"SELECT thing_id, gateway_id FROM {self.owners} WHERE thing_id IN "
                                 f"({', '.join([p] * len(chunk))})", chunk).fetchall())
            new = [tid for tid in chunk if tid not in owned]
            if new:  # ON CONFLICT still: a replica sharing the database may claim the same Thing meanwhile
                execute(f"INSERT INTO {self.owners} VALUES {', '.join([f'({p}, {p})'] * len(new))} "
                        "ON CONFLICT (thing_id) DO NOTHING", [v for tid in new for v in (tid, gw)])
                owned.update(execute(f"SELECT thing_id, gateway_id FROM {self.owners} WHERE thing_id IN "
                                     f"({', '.join([p] * len(new))})", new).fetchall())
            foreign += [tid for tid in chunk if owned.get(tid) != gw]
        anomalies: list[str] = []
        for chunk in _chunks(sorted({a.id for a in batch.anomalies}), CHUNK):
            anomalies += [r[0] for r in execute(
                f"SELECT id FROM {self.anomaly.anomalies} WHERE gateway_id <> {p} AND id IN "
                f"({', '.join([p] * len(chunk))})", [gw, *chunk]).fetchall()]
        if foreign or anomalies:
            named = [f"Thing {t}" for t in sorted(foreign)[:5]] + [f"anomaly {a}" for a in sorted(anomalies)[:5]]
            raise Refused(403, "foreign_thing", f"{', '.join(named)}"
                          f"{' and more' if len(foreign) + len(anomalies) > len(named) else ''} "
                          f"belong{'s' if len(foreign) + len(anomalies) == 1 else ''} to another gateway; "
                          "nothing of this batch was applied", sorted(foreign), sorted(anomalies))

    def owner(self, execute: Execute, thing_id: str) -> str | None:
        rows = execute(f"SELECT gateway_id FROM {self.owners} WHERE thing_id = {self.p}", [thing_id]).fetchall()
        return str(rows[0][0]) if rows else None

    def transfer(self, execute: Execute, thing_id: str, gateway_id: str, line: str) -> str | None:
        """Give a Thing to another gateway (the machine moved lines); returns its former owner, or None
        when no gateway ever wrote it. Its stored version is reset so the new owner's document wins."""
        p = self.p
        former = self.owner(execute, thing_id)
        if former is None:
            return None
        execute(f"UPDATE {self.owners} SET gateway_id = {p} WHERE thing_id = {p}", [gateway_id, thing_id])
        execute(f"UPDATE {self.things} SET gateway_id = {p}, line = {p}, version = -1 WHERE id = {p}",
                [gateway_id, line, thing_id])
        return former

    def last_seq(self, execute: Execute, batch: Batch) -> int:
        """The gateway's last applied batch number, its row locked for this transaction."""
        p = self.p
        select = f"SELECT last_seq FROM {self.gateways} WHERE gateway_id = {p}{self.lock_row}"
        rows = execute(select, [batch.gateway_id]).fetchall()  # all: DuckDB refuses new work over an unfinished result
        if not rows:  # the gateway's first batch: inserted once in its life (ON CONFLICT: a replica may race)
            execute(f"INSERT INTO {self.gateways} (gateway_id, site, line, last_seq) VALUES ({p}, {p}, {p}, 0) "
                    "ON CONFLICT (gateway_id) DO NOTHING", [batch.gateway_id, batch.site, batch.line])
            rows = execute(select, [batch.gateway_id]).fetchall()
        return int(rows[0][0]) if rows else 0

    def apply(self, execute: Execute, batch: Batch, prepared: Prepared, received_at: float) -> None:
        """Inside the batch's transaction: Things (newest version wins), deletions, anomalies, the gateway."""
        p = self.p
        for d in batch.things:
            # an UPDATE of the stored row and an INSERT of a missing one, not a DELETE and an INSERT of the
            # same key: DuckDB's delete-and-insert against the key's index leaves native memory behind
            doc = json.dumps(d.doc, allow_nan=False)
            execute(f"UPDATE {self.things} SET site = {p}, line = {p}, gateway_id = {p}, type = {p}, version = {p}, "
                    f"last_updated = {p}, doc = {p}, deleted = false WHERE id = {p} AND (version < {p} OR deleted)",
                    [batch.site, batch.line, batch.gateway_id, d.type, d.version, d.last_updated, doc, d.id,
                     d.version])
            execute(f"INSERT INTO {self.things} SELECT {', '.join([p] * 8)}, false WHERE NOT EXISTS "
                    f"(SELECT 1 FROM {self.things} WHERE id = {p})",
                    [d.id, batch.site, batch.line, batch.gateway_id, d.type, d.version, d.last_updated, doc, d.id])
        for tid in batch.deleted:
            execute(f"UPDATE {self.things} SET deleted = true WHERE id = {p}", [tid])
        if batch.anomalies:
            self.anomaly.apply(execute, batch.anomalies, batch.site, batch.line, batch.gateway_id)
        execute(f"UPDATE {self.gateways} SET site = {p}, line = {p}, last_seq = {p}, last_seen = {p}, "
                f"points = points + {p}, backlog = {p}, lag_s = {p}, clock_offset_s = {p} WHERE gateway_id = {p}",
                [batch.site, batch.line, batch.batch_seq, received_at, prepared.points.num_rows,
                 json.dumps(batch.backlog), prepared.lag_s, prepared.clock_offset_s, batch.gateway_id])

    def gateway_rows(self, execute: Execute) -> list[GatewayRow]:
        rows = execute(
            f"SELECT gateway_id, site, line, last_seq, coalesce(last_seen, 0), points, backlog, coalesce(lag_s, 0), "
            f"coalesce(clock_offset_s, 0) FROM {self.gateways} ORDER BY site, line, gateway_id", []).fetchall()
        return [GatewayRow(g, s, li, int(q), float(seen), int(n), _json(b) or {}, float(lag), float(off))
                for g, s, li, q, seen, n, b, lag, off in rows]

    def thing_docs(self, execute: Execute, *, site: str | None, line: str | None, type_: str | None, limit: int,
                   offset: int) -> tuple[list[dict[str, Any]], int]:
        cond, params = where(self.p, "NOT deleted", [(col, [v] if v else []) for col, v in
                                                      (("site", site), ("line", line), ("type", type_))])
        total = one(execute(f"SELECT count(*) FROM {self.things} WHERE {cond}", params))
        rows = execute(f"SELECT doc, site, line, gateway_id FROM {self.things} WHERE {cond} ORDER BY id "
                       f"LIMIT {self.p} OFFSET {self.p}", [*params, limit, offset]).fetchall()
        return [_placed(*r) for r in rows], int(total[0]) if total else 0

    def thing_doc(self, execute: Execute, thing_id: str) -> dict[str, Any] | None:
        row = one(execute(f"SELECT doc, site, line, gateway_id FROM {self.things} WHERE id = {self.p} "
                          "AND NOT deleted", [thing_id]))
        return _placed(*row) if row else None


class CentralStore(SeriesIndexed):
    """The shared half of a central store; a backend fills in the engine's half (see the module doc)."""

    sql: CentralSql
    engine_errors: tuple[type[BaseException], ...] = ()  # what the engine raises when a write fails

    def __init__(self) -> None:
        self.catalogue = SeriesCatalogue()
        self._write_lock = threading.Lock()  # one batch at a time per process (replicas lock the gateway row)

    # ----------------------------------------------------------------- the engine's half
    def _transaction(self) -> contextlib.AbstractContextManager[Execute]:
        raise NotImplementedError

    def _reader(self) -> Execute:
        raise NotImplementedError

    def _series_ids(self, execute: Execute, batch: Batch, new: list[tuple[int, NewSeries]]) -> list[int]:
        """The store's id of each of the batch's series, creating the new ones in this transaction."""
        raise NotImplementedError

    def _insert_points(self, execute: Execute, prepared: Prepared) -> None:
        raise NotImplementedError

    def _committed(self, prepared: Prepared) -> None:
        """After a commit: what the engine's half keeps in memory (next ids, known partitions)."""

    # ----------------------------------------------------------------- the shared half
    def apply(self, batch: Batch, received_at: float) -> Applied:
        """Apply one batch completely or not at all, and never twice (idempotent by gateway and batch_seq)."""
        refused: tuple[type[BaseException], ...] = (StoreError, *self.engine_errors)
        with self._write_lock:
            try:
                with self._transaction() as execute:
                    last = self.sql.last_seq(execute, batch)
                    if batch.batch_seq <= last:
                        return Applied("duplicate")
                    if batch.batch_seq != last + 1:
                        return Applied("out_of_order", expected=last + 1)
                    self.sql.claim(execute, batch)
                    new = new_series_of(batch, self.catalogue)
                    prepared = prepare(batch, self._series_ids(execute, batch, new), new, received_at)
                    if prepared.points.num_rows:
                        self._insert_points(execute, prepared)
                    self.sql.apply(execute, batch, prepared, received_at)
            except Refused:
                raise
            except refused as exc:
                raise StoreError(f"could not apply batch {batch.batch_seq} of {batch.gateway_id}: {exc}") from exc
            for sid, s in prepared.new_series:
                self.catalogue.remember(sid, s.key, s.thing_type, s.numeric)
            self._committed(prepared)
        return Applied("applied", points=prepared.points.num_rows)

    def gateways(self) -> list[GatewayRow]:
        return self.sql.gateway_rows(self._reader())

    def things(self, *, site: str | None, line: str | None, type_: str | None, limit: int,
               offset: int) -> tuple[list[dict[str, Any]], int]:
        return self.sql.thing_docs(self._reader(), site=site, line=line, type_=type_, limit=limit, offset=offset)

    def thing(self, thing_id: str) -> dict[str, Any] | None:
        return self.sql.thing_doc(self._reader(), thing_id)

    def anomalies(self, query: JournalQuery, now: float | None = None) -> tuple[list[dict[str, Any]], int]:
        return self.sql.anomaly.query(self._reader(), query, time.time() if now is None else now)

    def anomaly(self, anomaly_id: str, now: float | None = None) -> dict[str, Any] | None:
        return self.sql.anomaly.get(self._reader(), anomaly_id, time.time() if now is None else now)

    def add_action(self, gateway_id: str, act: Action) -> None:
        with self._write_lock, self._transaction() as execute:
            self.sql.anomaly.add_action(execute, gateway_id, act)

    def actions_for(self, gateway_id: str) -> list[Action]:
        with self._write_lock, self._transaction() as execute:
            return self.sql.anomaly.actions_for(execute, gateway_id)

    def owner(self, thing_id: str) -> str | None:
        return self.sql.owner(self._reader(), thing_id)

    def transfer(self, thing_id: str, gateway_id: str, line: str) -> str | None:
        with self._write_lock, self._transaction() as execute:
            return self.sql.transfer(execute, thing_id, gateway_id, line)


CHUNK = 500  # ids per statement: well under every engine's parameter limit


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _placed(doc: Any, site: str, line: str, gateway_id: str) -> dict[str, Any]:
    d: dict[str, Any] = dict(_json(doc))
    d["site"], d["line"], d["gatewayId"] = site, line, gateway_id
    return d
