"""Forwarder: the gateway side of the uplink — outbox → batches → aggregator, exactly once in effect.

Each batch has the next `batch_seq` and covers a range of outbox ids. The range and number are
written to the buffer file, in one transaction, *before* the batch is sent, so after a crash the
same batch is sent again under the same number; the aggregator applies each `(gateway_id,
batch_seq)` at most once and answers a repeat with "duplicate". The cursor moves only after the
aggregator confirmed, in one transaction with the batch number.

With `order = "live_first"` and a large backlog the forwarder opens a live window at the head of
the outbox: new points go first (dashboards stay current) and the old ones backfill behind them,
one batch each turn. Points up to `low` are confirmed, as are those in `(live_from, live]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
import pyarrow as pa

from gateway.alarms.journal import AlarmJournal
from gateway.buffer.buffer import TelemetryBuffer
from gateway.common.backoff import full_jitter, retry_after
from gateway.common.errors import Conflict, NotFound
from gateway.common.wire import (
    MAX_JOURNAL,
    Action,
    AnomalyDoc,
    Batch,
    OeeEventDoc,
    OeePeriodDoc,
    ThingDoc,
    encode,
    fit_anomaly,
)
from gateway.config import GatewayConfig
from gateway.detect.core import Anomaly
from gateway.detect.detector import AnomalyDetector
from gateway.metrics import GatewayMetrics
from gateway.oee.tracker import OeeTracker
from gateway.twin.registry import TwinRegistry
from gateway.uplink.client import UplinkClient
from gateway.uplink.quarantine import Quarantine, Range

log = logging.getLogger(__name__)
BYTES_PER_POINT_ON_DISK = 7.6  # measured (bench/buffer.py); backlog bytes are estimated from it
ACTIONS_PATH = "/api/v1/ingest/actions"
INGEST_PATH = "/api/v1/ingest/batches"


@dataclass
class Plan:
    seq: int
    lo: int  # the batch covers outbox ids in (lo, hi]
    hi: int
    live: bool


class SetAside(Exception):
    """The aggregator will never take these Things or anomalies as they are: hold them, send the rest."""

    def __init__(self, thing_ids: list[str], anomaly_ids: list[str], detail: str) -> None:
        super().__init__(detail)
        self.thing_ids = thing_ids
        self.anomaly_ids = anomaly_ids
        self.detail = detail


class RetryLater(Exception):
    """The aggregator is unreachable or busy; `after` is its Retry-After, if it gave one."""

    def __init__(self, detail: str, after: float | None = None) -> None:
        super().__init__(detail)
        self.after = after


class Forwarder(UplinkClient):
    """Sends the buffer's outbox to the aggregator; started by the gateway service when `[uplink]` has a url."""

    def __init__(self, config: GatewayConfig, buffer: TelemetryBuffer, registry: TwinRegistry,
                 metrics: GatewayMetrics, detector: AnomalyDetector | None = None,
                 oee: OeeTracker | None = None, journal: AlarmJournal | None = None) -> None:
        super().__init__(config.uplink)
        self._cfg = config
        self._buffer = buffer
        self._registry = registry
        self._m = metrics
        self._wake = asyncio.Event()
        self.batch_seq = 0
        self.live_from = 0
        self.live = 0
        self._inflight: Plan | None = None
        self._live_turn = False
        self._things_sent_at = 0.0
        self._deleted_sent_at = 0.0
        self._detector = detector
        self._anomalies_sent_at = 0.0  # updated_at of the newest anomaly change the aggregator confirmed
        self._journal = journal
        self._oee = oee
        self._oee_sent_at = 0.0  # the same for OEE period records and state events
        self.last_error = ""
        self.failing_since: float | None = None
        self.last_success = 0.0
        self.quarantine = Quarantine(config.gateway.data_dir)

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        await self.quarantine.start()
        b = self._buffer
        self.batch_seq = int(await b.get_state("uplink.batch_seq"))
        self.live_from = int(await b.get_state("uplink.live_from"))
        self.live = int(await b.get_state("uplink.live"))
        seq = int(await b.get_state("uplink.inflight_seq"))
        if seq > self.batch_seq:  # sent before a crash, not confirmed: send exactly that batch again
            self._inflight = Plan(seq, int(await b.get_state("uplink.inflight_lo")),
                                  int(await b.get_state("uplink.inflight_hi")),
                                  bool(await b.get_state("uplink.inflight_live")))
        self._launch(self._run(), "uplink-forwarder")
        log.info("uplink forwarding", extra={"url": self._up.url, "batch_seq": self.batch_seq,
                                             "cursor": b.synced_id, "order": self._up.order})

    async def stop(self) -> None:
        await super().stop()
        await self.quarantine.stop()

    # ----------------------------------------------------------------- loop
    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                sent = await self.step()
            except SetAside as exc:
                if await self._set_aside(exc):
                    continue  # the same batch again at once, without them
                attempt += 1  # it names nothing new: do not spin, back off as for any failure
                self._failed(exc.detail)
                await asyncio.sleep(full_jitter(attempt, self._up.retry_min_s, self._up.retry_max_s))
                continue
            except RetryLater as exc:
                attempt += 1
                self._failed(str(exc))
                delay = full_jitter(attempt, self._up.retry_min_s, self._up.retry_max_s)
                if exc.after is not None:
                    delay = max(delay, min(exc.after, self._up.retry_max_s))
                await asyncio.sleep(delay)
                continue
            except Exception as exc:  # a bug must not stop forwarding for good; logged, retried
                attempt += 1
                log.exception("uplink step failed")
                self._failed(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(full_jitter(attempt, self._up.retry_min_s, self._up.retry_max_s))
                continue
            attempt = 0
            if self.failing_since is not None:
                log.warning("uplink works again", extra={"down_s": round(time.time() - self.failing_since, 1)})
                self.failing_since = None
            if not sent:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._up.interval_s)
                self._wake.clear()

    def _failed(self, detail: str) -> None:
        self._m.uplink_batches.labels("retry").inc()
        if self.failing_since is None:
            self.failing_since = time.time()
            log.warning("uplink failing; points stay in the buffer and are retried", extra={"error": detail[:300]})
        self.last_error = detail[:300]

    async def step(self) -> bool:
        """Send one batch if there is anything to send; True when something was sent."""
        plan = self._inflight or self._plan()
        now = time.time()
        things_due = now - self._things_sent_at >= self._up.things_interval_s
        resend = self.quarantine.resending()
        if plan is None and not things_due and resend is None:
            await self._report_backlog()
            return False
        anomalies, anomalies_upto = [], self._anomalies_sent_at
        if things_due and self._detector is not None:
            changed, anomalies_upto = await self._detector.log.changed_since(self._anomalies_sent_at)
            anomalies = await self._anomaly_docs([a for a in changed if not self.quarantine.holds_anomaly(a.id)
                                                  and not self.quarantine.holds_thing(a.thing_id)])
        oee_periods: list[OeePeriodDoc] = []
        oee_events: list[OeeEventDoc] = []
        oee_upto = self._oee_sent_at
        if things_due and self._oee is not None:
            oee_periods, oee_events, oee_upto = await self._oee.changed_since(self._oee_sent_at)
        if plan is None:
            if resend is None and not anomalies and not oee_periods and not oee_events \
                    and not self._registry.changed_since(self._things_sent_at) and not self._deleted_since():
                self._things_sent_at = now
                await self._report_backlog()
                await self._poll_actions()
                return False
            hi = self._buffer.synced_id
            plan = Plan(self.batch_seq + 1, hi, hi, False)
        points = await self._buffer.read_outbox(self._up.batch_points, after=plan.lo, upto=plan.hi)
        points = await self._without_held(points, plan)
        resent: Range | None = None
        if resend is not None:
            resent = await self.quarantine.first_range(resend)
            if resent is not None and not self._behind_cursor(resent):
                # Not confirmed yet: the range's own batch carries these points now that the Thing is
                # no longer held; sending them here too would double them.
                await self.quarantine.sent(resent, resend)
                resent = None
            if resent is not None:
                held = await self._buffer.read_outbox(self._up.batch_points, after=resent.lo, upto=resent.hi)
                points = pa.concat_tables([points, self._of_things(held, {resend})])
        things, deleted = ([], []) if not things_due else self._thing_changes()
        things = [t for t in things if not self.quarantine.holds_thing(t.id)]
        deleted = [d for d in deleted if not self.quarantine.holds_thing(d)]
        backlog = await self._backlog()
        batch = self._batch(plan, points, things, deleted, backlog)
        batch.anomalies = anomalies
        batch.oee_periods, batch.oee_events = oee_periods, oee_events
        if self._inflight is None:
            # The batch, and the live window it may have opened, are durable before anything is sent.
            await self._buffer.set_state({"uplink.inflight_seq": plan.seq, "uplink.inflight_lo": plan.lo,
                                          "uplink.inflight_hi": plan.hi, "uplink.inflight_live": float(plan.live),
                                          "uplink.live_from": self.live_from, "uplink.live": self.live})
            self._inflight = plan
        body = await asyncio.get_running_loop().run_in_executor(None, encode, batch)
        actions = await self._send(plan, body, batch)
        await self._confirmed(plan)
        if things_due:
            self._things_sent_at = now
            self._deleted_sent_at = now
            self._anomalies_sent_at = anomalies_upto
            self._oee_sent_at = oee_upto
        if resend is not None:
            await self.quarantine.sent(resent, resend)
            if resend not in self.quarantine.held:
                self._things_sent_at = 0.0  # released: its document goes up with the next batch
                log.warning("a held Thing was re-sent and released", extra={"thing": resend})
        await self._apply_actions(actions)
        await self._report_backlog()
        return True

    # ----------------------------------------------------------------- quarantine
    def _series_of_things(self, points: pa.Table) -> np.ndarray:
        """The Thing id of each point (by its buffer series)."""
        keys = self._buffer.series_keys
        sids = points.column("series").to_numpy()
        uniq, index = np.unique(sids, return_inverse=True)
        names = np.array([keys[int(sid)][0].thing_id for sid in uniq], dtype=object)
        return names[index] if len(uniq) else np.array([], dtype=object)

    def _behind_cursor(self, rng: Range) -> bool:
        """Whether the aggregator confirmed the batch that covered this outbox range."""
        return rng.hi <= self._buffer.synced_id or (bool(self.live_from) and rng.lo >= self.live_from
                                                     and rng.hi <= self.live)

    def _of_things(self, points: pa.Table, thing_ids: set[str]) -> pa.Table:
        if not points.num_rows:
            return points
        owners = self._series_of_things(points)
        return points.filter(pa.array([t in thing_ids for t in owners], pa.bool_()))

    async def _without_held(self, points: pa.Table, plan: Plan) -> pa.Table:
        """The points of Things not held; the held ones' share of the range is recorded (durably, before
        the batch goes out) so an admin can have it sent later."""
        if not points.num_rows or not any(h.kind == "thing" and h.state == "held"
                                          for h in self.quarantine.held.values()):
            return points
        owners = self._series_of_things(points)
        held = np.array([self.quarantine.holds_thing(t) for t in owners], dtype=bool)
        if not held.any():
            return points
        names, counts = np.unique(owners[held], return_counts=True)
        await self.quarantine.record([Range(str(t), plan.lo, plan.hi, int(c)) for t, c in zip(names, counts,
                                                                                            strict=True)])
        return points.filter(pa.array(~held))

    async def _set_aside(self, exc: SetAside) -> bool:
        """Hold what a refusal names; False when it names nothing that was not held already."""
        new = await self.quarantine.hold(exc.thing_ids, exc.anomaly_ids, exc.detail)
        if not new:
            return False
        self._m.uplink_quarantined.inc(len(new))
        log.warning("the aggregator refuses some Things; they are held in the quarantine and the rest is sent",
                    extra={"things": exc.thing_ids[:10], "anomalies": exc.anomaly_ids[:10],
                           "detail": exc.detail[:300]})
        return True

    async def _poll_actions(self) -> None:
        """A quiet gateway still asks for operators' actions (every `uplink.things_interval_s`)."""
        if self._detector is None or self._http is None:
            return
        try:
            async with self._http.get(self._up.url.rstrip("/") + ACTIONS_PATH) as r:
                doc = await r.json(content_type=None) if r.status == 200 else {}
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.debug("could not ask for central actions", extra={"error": str(exc)[:200]})
            return
        await self._apply_actions(_actions(doc))

    async def _anomaly_docs(self, changed: list[Anomaly]) -> list[AnomalyDoc]:
        """The anomalies as they go upstream: each with its journal (the newest entries) and, while its
        condition is shelved and it is not resolved, the shelf."""
        journal = self._journal
        if journal is None:
            return [AnomalyDoc.parse(fit_anomaly(a.to_json())) for a in changed]
        now = time.time()
        actions = await journal.actions_of([a.id for a in changed], MAX_JOURNAL)
        docs = []
        for a in changed:
            doc = a.to_json()
            doc["journal"] = [{k: v for k, v in x.to_json().items() if k != "anomalyId"} for x in actions.get(a.id, [])]
            shelf = journal.shelf_of(a.thing_id, a.anomaly_type, now) if a.state != "resolved" else None
            doc["shelved"] = {k: v for k, v in shelf.to_json().items() if k not in ("endedAt", "endedBy")} \
                if shelf is not None else None
            docs.append(AnomalyDoc.parse(fit_anomaly(doc)))
        return docs

    async def _apply_actions(self, actions: list[Action]) -> None:
        """Operators' acknowledgements and resolutions made centrally, applied here where anomalies live;
        the new state goes back up with the next batch. Repeats (a lost response) are harmless."""
        if self._detector is None:
            return
        for act in actions:
            by = f"{act.by or 'central'} (central)"
            try:
                if act.action == "ack":
                    await self._detector.acknowledge(act.anomaly_id, by, act.note)
                else:
                    await self._detector.resolve(act.anomaly_id, by, act.note, act.false_positive)
                if self._journal is not None:
                    await self._journal.record(act.anomaly_id, "acknowledged" if act.action == "ack" else "resolved",
                                               by, act.note, once=True)  # a repeated action is one entry
            except (NotFound, Conflict) as exc:
                log.info("central action not applied", extra={"anomaly": act.anomaly_id, "action": act.action,
                                                              "reason": str(exc)})

    def _plan(self) -> Plan | None:
        up = self._up
        low, head = self._buffer.synced_id, self._buffer.committed_id
        if up.order == "live_first" and not self.live_from and head - low > up.live_backlog_points:
            self.live_from = self.live = head - up.batch_points
            log.info("uplink backlog large: newest points first, history backfills",
                     extra={"backlog_points": head - low})
        if self.live_from:
            live = Plan(self.batch_seq + 1, self.live, min(self.live + up.batch_points, head), True)
            backfill = Plan(self.batch_seq + 1, low, min(low + up.batch_points, self.live_from), False)
            self._live_turn = not self._live_turn  # alternate, so a busy line cannot starve the backfill
            if self.live < head and (self._live_turn or low >= self.live_from):
                return live
            return backfill
        if low < head:
            return Plan(self.batch_seq + 1, low, min(low + up.batch_points, head), False)
        return None

    def _batch(self, plan: Plan, points: pa.Table, things: list[ThingDoc], deleted: list[str],
               backlog: dict[str, float]) -> Batch:
        keys = self._buffer.series_keys
        uniq, index = np.unique(points.column("series").to_numpy(), return_inverse=True)
        names = [(k.thing_id, k.feature, k.path) for k, _type in (keys[int(sid)] for sid in uniq)]
        table = pa.table({"series": pa.array(index.astype(np.int32), pa.int32()),
                          **{c: points.column(c) for c in ("ts", "recv", "seq", "value", "text")}})
        g = self._cfg.gateway
        return Batch(g.id, plan.seq, g.site, g.line, plan.lo, plan.hi, names, table, things, deleted, backlog,
                     time.time())

    def _thing_changes(self) -> tuple[list[ThingDoc], list[str]]:
        docs = [ThingDoc.parse(t.to_document()) for t in self._registry.changed_since(self._things_sent_at)]
        return docs, self._deleted_since()

    def _deleted_since(self) -> list[str]:
        return [tid for when, tid in self._registry.deletions if when > self._deleted_sent_at]

    async def _send(self, plan: Plan, body: bytes, batch: Batch) -> list[Action]:
        """POST one batch; returns the operators' actions the aggregator hands back (see `_apply_actions`)."""
        assert self._http is not None
        url = self._up.url.rstrip("/") + INGEST_PATH
        try:
            async with self._http.post(url, data=body, headers={"Content-Type": "application/vnd.apache.arrow.stream"}
                                       ) as r:
                doc = await r.json(content_type=None) if r.content_length != 0 else {}
                if r.status == 200:
                    self._m.uplink_batches.labels(doc.get("status", "applied")).inc()
                    self._m.uplink_points.inc(batch.points.num_rows)
                    self._m.uplink_bytes.inc(len(body))
                    self.last_success = time.time()
                    return _actions(doc)
                if r.status == 409 and isinstance(doc.get("expected"), int):
                    # The aggregator lost batches it had confirmed (restored from a backup): continue
                    # with its numbering; the points of this range are sent under the expected number.
                    expected = int(doc["expected"])
                    log.warning("aggregator expects another batch number; renumbering",
                                extra={"sent": plan.seq, "expected": expected})
                    self.batch_seq = expected - 1
                    plan.seq = expected
                    await self._buffer.set_state({"uplink.batch_seq": self.batch_seq,
                                                  "uplink.inflight_seq": plan.seq})
                    raise RetryLater("renumbered", after=0)
                after = retry_after(r.headers.get("Retry-After"))
                detail = f"{r.status} {doc.get('error', '')}: {str(doc.get('detail', ''))[:200]}"
                named = _named(doc)
                if (r.status == 403 and doc.get("error") == "foreign_thing") or (r.status == 400 and any(named)):
                    self._m.uplink_batches.labels("refused").inc()
                    raise SetAside(*named, detail)
                if r.status == 400:
                    # Refused whole without naming a Thing: this batch can never go as it is. Its Things
                    # and anomalies are held (an admin sees why) instead of retrying it for ever.
                    self._m.uplink_batches.labels("refused").inc()
                    every = sorted({k[0] for k in batch.series} | {t.id for t in batch.things} | set(batch.deleted))
                    if every or batch.anomalies:
                        raise SetAside(every, [a.id for a in batch.anomalies], detail)
                if r.status in (401, 403):
                    log.error("the aggregator refuses this gateway's token", extra={"status": r.status})
                elif r.status == 400:
                    log.error("the aggregator refused a batch; it is kept and retried",
                              extra={"batch_seq": plan.seq, "detail": detail})
                raise RetryLater(detail, after)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise RetryLater(f"{type(exc).__name__}: {exc}") from None

    async def _confirmed(self, plan: Plan) -> None:
        """The cursor, the batch number and the live window move in one transaction: a crash between
        them would send a confirmed range again under a new number, which the aggregator would apply."""
        cursor, live_from, live = self._buffer.synced_id, self.live_from, self.live
        if plan.live:
            live = plan.hi
        elif live_from and plan.hi >= live_from:
            cursor, live_from, live = live, 0, 0  # the gap is closed: one cursor again
        else:
            cursor = plan.hi
        await self._buffer.confirm_outbox(cursor, {"uplink.batch_seq": plan.seq, "uplink.live_from": live_from,
                                                   "uplink.live": live})
        self.live_from, self.live = live_from, live
        self.batch_seq = plan.seq
        self._inflight = None
        await self._report_backlog()

    async def _backlog(self) -> dict[str, float]:
        points = max(0, self._buffer.committed_id - self._buffer.synced_id - max(0, self.live - self.live_from))
        oldest = await self._buffer.oldest_unsent_recv() if points else None
        return {"points": float(points), "bytes": points * BYTES_PER_POINT_ON_DISK,
                "age_s": max(0.0, time.time() - oldest) if oldest else 0.0}

    async def _report_backlog(self) -> None:
        b = await self._backlog()
        self._m.uplink_backlog_points.set(b["points"])
        self._m.uplink_backlog_bytes.set(b["bytes"])
        self._m.uplink_backlog_age.set(b["age_s"])


def _named(doc: Any) -> tuple[list[str], list[str]]:
    """The Thing and anomaly ids a refusal names (`thingIds`, `anomalyIds`)."""
    out: tuple[list[str], list[str]] = ([], [])
    for key, into in (("thingIds", out[0]), ("anomalyIds", out[1])):
        raw = doc.get(key) if isinstance(doc, dict) else None
        into.extend(str(x)[:200] for x in (raw if isinstance(raw, list) else [])[:10_000] if isinstance(x, str))
    return out


def _actions(doc: Any) -> list[Action]:
    """The operators' actions of an aggregator answer; a malformed one is logged and skipped."""
    raw = doc.get("actions") if isinstance(doc, dict) else None
    out = []
    for a in raw if isinstance(raw, list) else []:
        try:
            out.append(Action.parse(a))
        except ValueError as exc:
            log.warning("a central action was not understood", extra={"reason": str(exc)})
    return out
