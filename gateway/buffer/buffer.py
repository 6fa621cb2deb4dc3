"""TelemetryBuffer: group commit into DuckDB, broker acknowledgements after commit, housekeeping.

Ingest hands every accepted sample to `add()` and every received QoS 1 message to `ack_later()`.
One writer task commits what is pending as one batch when the inflow pauses
(`commit_idle_ms`), when the oldest pending point is `commit_interval_ms` old, when
`commit_max_points` are pending, or when `commit_max_messages` wait for their acknowledgement;
only then are the messages of that batch acknowledged to the broker, in the order they arrived.
A crash before the commit leaves them unacknowledged, so the broker redelivers them; a crash
after the commit but before the acknowledgement makes the broker redeliver messages whose
sequence marks are already stored, so they are dropped. Nothing acknowledged is lost and nothing
is stored twice.

Housekeeping (roll-ups, retention, the disk budget) runs on a thread and DuckDB cursor of its own,
beside the commits rather than in front of them: the acknowledgements, and with them the broker's
window of unacknowledged messages, do not wait for a maintenance pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import duckdb

from gateway.buffer.points import Deadband, PointBatch, deadband_for, sample_points
from gateway.buffer.store import BufferStore, Maintenance, OpenState, directory_bytes
from gateway.common.readings import Sample
from gateway.common.series import SeriesCatalogue, SeriesIndexed, SeriesKey
from gateway.common.tasks import cancel_and_wait
from gateway.config import GatewayConfig
from gateway.memory import duckdb_limit_mb, machine_memory_mb
from gateway.metrics import GatewayMetrics

if TYPE_CHECKING:
    import pyarrow as pa  # the outbox and history reads only: not loaded unless they run

log = logging.getLogger(__name__)
T = TypeVar("T")
LOW_WATER = 0.9  # after a drop, the data directory is brought to this share of its budget
RESUME = 0.95  # reject_new stores again below this share
OUTBOX = "uplink"
PASS_ATTEMPTS = 3  # a maintenance pass that meets a write conflict is tried again, this often in all
CHECKPOINT_ATTEMPTS = 5  # a maintenance pass's checkpoint tries this often while other transactions run


class Ackable(Protocol):
    """What the buffer needs of an MQTT connection to acknowledge messages (`gateway.ingest.mqtt.BrokerAcks`)."""

    def ack_many(self, acks: Sequence[tuple[int, int]]) -> Any:
        """Acknowledge (message id, QoS) pairs, in this order."""

    def is_connected(self) -> bool: ...


class TelemetryBuffer(SeriesIndexed):
    """The DuckDB buffer of one gateway: historian, outbox, and the reason acks wait for a commit."""

    def __init__(self, config: GatewayConfig, metrics: GatewayMetrics, *, uplink: bool = False) -> None:
        self._cfg = config.buffer
        self._m = metrics
        self.data_dir = Path(config.gateway.data_dir)
        self.memory_limit_mb = duckdb_limit_mb(self._cfg.memory_limit_mb, machine_memory_mb())
        self.store = BufferStore(self.data_dir / "buffer.duckdb", memory_limit_mb=self.memory_limit_mb,
                                 checkpoint_mb=self._cfg.checkpoint_mb)
        self._uplink = uplink
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="duckdb-writer")
        self._readers = ThreadPoolExecutor(2, thread_name_prefix="duckdb-reader")
        self._maintainer = ThreadPoolExecutor(1, thread_name_prefix="duckdb-maintenance")
        # One maintenance pass or disk-budget recovery at a time; the file is reopened only under it.
        self._housekeeping = threading.Lock()
        self.catalogue = SeriesCatalogue()
        self._deadbands: dict[int, Deadband] = {}
        self._next_series = 1
        self._next_id = 1
        self._batch = PointBatch()
        self._acks: list[tuple[Ackable, int, int]] = []
        self._wake = asyncio.Event()
        self._first_at = 0.0
        self._arrivals = 0
        self._hurry: asyncio.Future[None] | None = None  # the commit loop's wait, ended early by a full window
        self._commit_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._opened = False
        self.marks: list[tuple[str, str, int, float, int | None]] = []
        self.used_bytes = 0
        self.wal_bytes = 0  # the WAL's size at the last maintenance pass
        self.refusing = False  # the disk budget is used up and nothing may be removed: new points refused
        self.commit_failing = False
        self.commit_errors = 0
        self.last_error = ""
        self.synced_id = 0
        self._made_room = False
        self._committing = 0

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Open the file, learn series and sequence marks, start the writer and housekeeping."""
        state: OpenState = await self._write(self.store.open)
        self._opened = True
        for sid, key, ttype, numeric in state.series:
            self._remember_series(sid, key, ttype, numeric)
        self._next_series = self.catalogue.next_id
        self._next_id = state.next_id
        self.marks = state.seq_marks
        self.synced_id = int(await self._write(lambda: self.store.get_meta(f"outbox.{OUTBOX}")))
        self._m.buffer_disk_budget.set(self._cfg.disk_budget_mb * 2**20)
        await self._write(self._budget_now)  # a full disk is known before the first message
        self._tasks = [asyncio.create_task(self._commit_loop(), name="buffer-commit"),
                       asyncio.create_task(self._maintenance_loop(), name="buffer-maintenance")]
        log.info("telemetry buffer opened", extra={"series": len(self.series_keys), "next_point_id": self._next_id,
                                                   "path": str(self.store.path)})

    async def stop(self) -> None:
        """Commit what is pending (acknowledging it), then checkpoint and close the file."""
        await cancel_and_wait(*self._tasks)
        self._tasks = []
        # a pass already running finishes on its thread before the file is closed under it
        await asyncio.get_running_loop().run_in_executor(None, self._maintainer.shutdown)
        if self._opened:
            try:
                await self.flush()
            except Exception:
                log.exception("final buffer commit failed; the broker will redeliver what was not acknowledged")
            await self._write(self.store.close)
            self._opened = False
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)

    async def _write(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn)

    async def read(self, fn: Callable[[], T]) -> T:
        """Run a blocking read against the store on a reader thread."""
        return await asyncio.get_running_loop().run_in_executor(self._readers, fn)

    # ----------------------------------------------------------------- hot path (event loop)
    def add(self, thing_id: str, thing_type: str, samples: Sequence[Sample], recv: float,
            mark: tuple[str, int, int] | None) -> None:
        """Queue the points of accepted samples, and the device's sequence mark (boot, highest seq,
        anti-replay bitmap), for the next commit."""
        b = self._batch
        if mark is not None:
            b.seq_marks[(thing_id, mark[0])] = (mark[1], mark[2])
        if self.refusing:
            self._m.buffer_refused.inc(sum(1 for s in samples for _ in sample_points(s)))
            return
        series = self.catalogue.ids_of(thing_id)
        deadbands = self._deadbands
        for s in samples:
            feature, ts, seq = s.feature, s.ts, s.seq
            for path, num, text in sample_points(s):
                sid = series.get((feature, path))
                if sid is None:
                    sid = self._new_series(thing_id, thing_type, feature, path, num is not None)
                    series = self.catalogue.ids_of(thing_id)  # a new Thing's first series made its mapping
                if deadbands and num is not None:
                    db = deadbands.get(sid)
                    if db is not None and not db.keep(num, ts):
                        self._m.buffer_deadband.inc()
                        continue
                b.series.append(sid)
                b.ts.append(ts)
                b.recv.append(recv)
                b.seq.append(seq)
                b.value.append(num)
                b.text.append(text)
        self._arrived()

    def new_series(self, thing_id: str, samples: Sequence[Sample]) -> tuple[int, int]:
        """(series the Thing has, how many more these samples would create)."""
        ids = self.catalogue.ids_of(thing_id)
        new = {(s.feature, path) for s in samples for path, _n, _t in sample_points(s)
               if (s.feature, path) not in ids}
        return self.catalogue.count_of(thing_id), len(new)

    def ack_later(self, client: Ackable, mid: int, qos: int) -> None:
        """Acknowledge this message to the broker once everything received before it is committed."""
        self._acks.append((client, mid, qos))
        self._arrived()
        hurry = self._hurry
        if hurry is not None and len(self._acks) >= self._cfg.commit_max_messages and not hurry.done():
            hurry.set_result(None)  # the broker's window may be filling: commit now

    def _arrived(self) -> None:
        self._arrivals += 1
        if not self._wake.is_set():
            self._first_at = time.monotonic()
            self._wake.set()

    def _new_series(self, thing_id: str, thing_type: str, feature: str, path: str, numeric: bool) -> int:
        sid = self._next_series
        self._next_series += 1
        key = SeriesKey(thing_id, feature, path)
        self._remember_series(sid, key, thing_type, numeric)
        self._batch.new_series.append((sid, key, thing_type, numeric))
        return sid

    def _remember_series(self, sid: int, key: SeriesKey, thing_type: str, numeric: bool) -> None:
        self.catalogue.remember(sid, key, thing_type, numeric)
        if self._cfg.deadband:
            db = deadband_for(self._cfg.deadband, thing_type, key)
            if db is not None:
                self._deadbands[sid] = db

    @property
    def pending_points(self) -> int:
        """Points not yet committed (waiting, or in a commit that has not finished)."""
        return len(self._batch) + self._committing

    # ----------------------------------------------------------------- group commit
    async def _commit_loop(self) -> None:
        cfg = self._cfg
        interval, idle = cfg.commit_interval_ms / 1000, cfg.commit_idle_ms / 1000
        backoff = 0.5
        while True:
            await self._wake.wait()
            await self._due(interval, idle)
            try:
                await self.flush()
            except Exception as exc:
                first = not self._made_room
                self._made_room = True  # room is made once per failure episode, not on every retry
                await self._write(functools.partial(self._recover, make_room=first))
                if cfg.disk_policy == "reject_new" and _disk_error(exc):
                    self._refuse_pending()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
            else:
                backoff = 0.5
                self._made_room = False

    async def _due(self, interval: float, idle: float) -> None:
        """Return when the pending batch is to be committed: `interval` after its first point, when
        nothing arrived for `idle` (the broker may be waiting for our acknowledgements), at
        `commit_max_points`, or as soon as `commit_max_messages` wait for their acknowledgement.

        The inflow is looked at by a timer callback every `idle`, not by this task: at a line's rate
        it looks dozens of times per commit, and a callback costs a fraction of a task's wake-up."""
        cfg = self._cfg
        loop = asyncio.get_running_loop()
        due = self._hurry = loop.create_future()
        seen = -1
        timer: asyncio.TimerHandle | None = None

        def look() -> None:
            nonlocal seen, timer
            if due.done():
                return
            left = interval - (time.monotonic() - self._first_at)
            if (left <= 0 or self._arrivals == seen or len(self._batch) >= cfg.commit_max_points
                    or len(self._acks) >= cfg.commit_max_messages):
                due.set_result(None)
                return
            seen = self._arrivals
            timer = loop.call_later(min(idle, left) if idle > 0 else 0, look)

        look()
        try:
            await due
        finally:
            if timer is not None:
                timer.cancel()
            self._hurry = None

    async def flush(self) -> None:
        """Commit everything pending now and acknowledge its messages; on failure keep it for a retry."""
        async with self._commit_lock:
            batch, acks = self._batch, self._acks
            self._batch, self._acks = PointBatch(), []
            self._wake.clear()
            if batch.series or batch.new_series or batch.seq_marks:
                first_id = self._next_id
                start = time.perf_counter()
                self._committing = len(batch)
                try:
                    await self._write(lambda: self.store.commit(batch, first_id))
                except Exception as exc:
                    self._requeue(batch, acks)
                    self._commit_failed(exc)
                    raise
                finally:
                    self._committing = 0
                self._next_id += len(batch)
                self._m.buffer_commit_seconds.observe(time.perf_counter() - start)
                self._m.buffer_commits.inc()
                self._m.buffer_points.inc(len(batch))
                if self.commit_failing:
                    log.warning("buffer commits work again", extra={"failed_attempts": self.commit_errors})
                    self.commit_failing = False
            # One write per connection and commit, in arrival order. After a reconnect the broker
            # redelivers what the old connection did not acknowledge; sequence marks drop the copies.
            for client, pairs in _by_client(acks):
                if client.is_connected():
                    client.ack_many(pairs)

    def _requeue(self, failed: PointBatch, acks: list[tuple[Ackable, int, int]]) -> None:
        """Put a failed batch back in front of what arrived since, keeping arrival order."""
        newer = self._batch
        for name in ("series", "ts", "recv", "seq", "value", "text", "new_series"):
            getattr(failed, name).extend(getattr(newer, name))
        failed.seq_marks.update(newer.seq_marks)
        self._batch = failed
        self._acks = acks + self._acks
        self._arrived()

    def _refuse_pending(self) -> None:
        """reject_new on a full disk: give up the pending points, keep sequence marks and acknowledgements."""
        refused = len(self._batch)
        if refused:
            b = self._batch
            for name in ("series", "ts", "recv", "seq", "value", "text"):
                getattr(b, name).clear()
            self._m.buffer_refused.inc(refused)
            log.warning("disk full: pending points refused (reject_new)", extra={"points": refused})
        self.refusing = True

    def _commit_failed(self, exc: Exception) -> None:
        self.commit_errors += 1
        self._m.buffer_commit_errors.inc()
        self.last_error = f"{type(exc).__name__}: {str(exc)[:200]}"
        if not self.commit_failing:
            log.error("buffer commit failed; points are kept and not acknowledged, retrying",
                      extra={"error": self.last_error})
        self.commit_failing = True

    def _recover(self, make_room: bool) -> None:
        """After a failed commit: make room by the disk policy; reopen the file if DuckDB gave up on it."""
        with self._housekeeping:
            try:
                if make_room:
                    self._budget(force=True)
                else:
                    self.store.con.execute("SELECT 1")
            except Exception as exc:  # the file may be invalidated: reopen it
                log.warning("reopening the buffer file after an error", extra={"error": str(exc)[:200]})
                with contextlib.suppress(Exception):
                    self.store.close()
                try:
                    self.store.open()
                except Exception as again:
                    log.error("the buffer file cannot be reopened yet", extra={"error": str(again)[:200]})

    # ----------------------------------------------------------------- housekeeping (maintenance thread)
    async def _maintenance_loop(self) -> None:
        while True:
            await asyncio.sleep(self._cfg.maintenance_interval_s)
            try:
                await self.maintain()
            except Exception:
                log.exception("buffer maintenance failed; retrying next interval")

    async def maintain(self, now: float | None = None) -> Maintenance:
        """Roll up, apply retention, keep the disk budget: one pass (also callable by tests and the CLI).

        The pass runs on the maintenance thread while commits go on."""
        at = time.time() if now is None else now
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self._maintainer, functools.partial(self._maintain, at))
        self._m.buffer_rollup_rows.inc(result.rolled)
        return result

    def _maintain(self, now: float) -> Maintenance:
        attempt = 1
        while True:
            try:
                with self._housekeeping:
                    return self._pass(now)
            except duckdb.TransactionException as exc:
                # A write conflict: DuckDB fails the second writer of a row, and the pass writes no row a
                # commit writes. Should one happen anyway, the pass (each step safe to repeat) is tried
                # again, never a commit.
                if attempt == PASS_ATTEMPTS:
                    raise
                log.warning("buffer maintenance met a write conflict; trying again",
                            extra={"attempt": attempt, "error": str(exc)[:200]})
                time.sleep(0.1 * attempt)
                attempt += 1

    def _pass(self, now: float) -> Maintenance:
        cfg = self._cfg
        cur = self.store.reader()  # this thread's own cursor: the writer's connection is the commits'
        rolled = self.store.rollup(now, cfg.late_s, cur)
        raw, rolled_deleted = self.store.retention(now, cfg.raw_retention_days,
                                                   {"1m": cfg.rollup_1m_retention_days,
                                                    "1h": cfg.rollup_1h_retention_days}, cur)
        self.store.trim_marks(cur)
        if raw:
            self._m.buffer_dropped.labels("retention").inc(raw)
        if raw or rolled_deleted or self.store.wal_over_threshold():
            self._checkpoint(cur)
        self._budget()
        return Maintenance(rolled, raw, rolled_deleted)

    def _budget_now(self) -> None:
        with self._housekeeping:
            self._budget()

    def _checkpoint(self, cur: duckdb.DuckDBPyConnection) -> None:
        """Checkpoint now. DuckDB checkpoints by itself when the WAL passes `buffer.checkpoint_mb`, but
        not while another transaction is open; a WAL many times the threshold is reported on /ready.
        A commit or a read in progress is waited out for a moment before the next pass is left to try."""
        for attempt in range(CHECKPOINT_ATTEMPTS):
            if self.store.checkpoint(cur):
                return
            time.sleep(0.05 * (attempt + 1))
        log.warning("buffer checkpoint postponed: other transactions kept running; retrying next pass",
                    extra={"wal_bytes": self.store.wal_bytes()})

    def _budget(self, force: bool = False) -> None:
        """Measure the data directory and apply the disk policy when it is over budget (on any thread,
        with this thread's cursor, under `_housekeeping`)."""
        cur = self.store.reader()
        budget = self._cfg.disk_budget_mb * 2**20
        used = self._used()
        if not force and (budget == 0 or used < budget * (RESUME if self.refusing else 1.0)):
            if self.refusing:
                log.warning("disk budget has room again; storing new points", extra={"used_bytes": used})
            self.refusing = False
            return
        policy = self._cfg.disk_policy
        if policy != "reject_new":
            max_id = self.synced_id if (policy == "drop_oldest_synced" and self._uplink) else None
            target = used - budget * LOW_WATER if budget else used * 0.05
            total = self.store.point_count()
            if total:
                per_point = max(1.0, (used - self._other_bytes()) / total)
                deleted, unsent = self.store.drop_oldest(math.ceil(target / per_point), max_id,
                                                         synced_id=self.synced_id if self._uplink else None,
                                                         cur=cur)
                if deleted:  # counted before the checkpoint, which a full disk can fail: the delete stands
                    self._m.buffer_dropped.labels(policy).inc(deleted)
                    self._m.buffer_unsent_dropped.inc(unsent)
                    log.warning("disk budget reached: removed the oldest raw points",
                                extra={"policy": policy, "points": deleted, "used_bytes": used,
                                       "budget_bytes": int(budget)})
                    self.store.checkpoint(cur)
                    used = self._used()
        over = bool(budget) and used >= budget
        if over and not self.refusing:
            log.warning("disk budget used up: new points are counted and not stored",
                        extra={"policy": policy, "used_bytes": used, "budget_bytes": int(budget)})
        self.refusing = over

    def _used(self) -> int:
        used = max(0, directory_bytes(self.data_dir) - self.store.duckdb_free_bytes())
        self.used_bytes = used
        self._m.buffer_disk_bytes.set(used)
        self._m.buffer_duckdb_memory.set(self.store.memory_bytes())  # bounded by buffer.memory_limit_mb
        self.wal_bytes = self.store.wal_bytes()
        self._m.buffer_wal_bytes.set(self.wal_bytes)
        return used

    def _other_bytes(self) -> int:
        """Bytes of the data directory that are not the buffer file (registry, models, ...)."""
        buffer_files = {self.store.path.name, self.store.path.name + ".wal"}
        total = 0
        for p in self.data_dir.rglob("*"):
            if p.is_file() and p.name not in buffer_files:
                with contextlib.suppress(FileNotFoundError):
                    total += p.stat().st_size
        return total

    # ----------------------------------------------------------------- outbox (for the uplink)
    @property
    def committed_id(self) -> int:
        """The highest point id committed so far."""
        return self._next_id - 1

    async def read_outbox(self, limit: int = 50_000, *, after: int | None = None,
                          upto: int | None = None) -> pa.Table:
        """Unsent points in id order (id, series, ts, recv, seq, value, text) after the durable cursor
        (or `after`), up to `upto`; series names are in `series_keys`."""
        lo = self.synced_id if after is None else after
        return await self.read(lambda: self.store.outbox(lo, limit, upto))

    async def confirm_outbox(self, last_id: int, state: dict[str, float] | None = None) -> None:
        """The aggregator has every point up to `last_id`: advance the durable cursor, together with
        `state` (see `set_state`) in the same transaction."""
        values = dict(state or {})
        if last_id > self.synced_id:
            values[f"outbox.{OUTBOX}"] = last_id
        if values:
            await self._write(lambda: self.store.set_metas(values))
        self.synced_id = max(self.synced_id, last_id)

    async def get_state(self, key: str, default: float = 0.0) -> float:
        """A durable number kept in the buffer file (the uplink keeps its batch numbers here)."""
        return await self._write(lambda: self.store.get_meta(key, default))

    async def set_state(self, values: dict[str, float]) -> None:
        """Durable numbers, all written in one transaction: after a crash, all of them or none."""
        values = dict(values)
        await self._write(lambda: self.store.set_metas(values))

    async def oldest_unsent_recv(self) -> float | None:
        after = self.synced_id
        return await self.read(lambda: self.store.recv_of_first_after(after))

    # ----------------------------------------------------------------- reads
    async def read_points(self, thing_ids: list[str] | None, start: float, end: float) -> pa.Table:
        """Stored points of some Things in `[start, end)` (thing_id, feature, path, ts, value, text)."""
        return await self.read(lambda: self.store.points_of(thing_ids, start, end))


def _by_client(acks: list[tuple[Ackable, int, int]]) -> list[tuple[Ackable, list[tuple[int, int]]]]:
    """Consecutive acknowledgements grouped by connection (there is one, except around a reconnect)."""
    out: list[tuple[Ackable, list[tuple[int, int]]]] = []
    for client, mid, qos in acks:
        if not out or out[-1][0] is not client:
            out.append((client, []))
        out[-1][1].append((mid, qos))
    return out


def _disk_error(exc: BaseException) -> bool:
    """A write that failed for lack of space (or a file size limit), as DuckDB or the OS reports it."""
    text = str(exc).lower()
    return isinstance(exc, OSError) or "no space" in text or "too large" in text or "could not write" in text
