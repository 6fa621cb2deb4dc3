"""AnomalyDetector: the live detection service of a gateway.

Takes every telemetry change from the event bus, and every `tick_ms` hands the collected readings to
the DetectorCore on its own worker thread (rules, statistics, one batched ONNX run per equipment type).
What comes out is stored in the anomaly log, written to the Thing's `status` feature, announced on the
bus (`AnomalyDetected`, ...) and offered to the notification sinks. Model activations on disk are picked
up while running; a model that fails its checks is refused and the previous one keeps working.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from gateway.bus import AnomalyEvent, EventBus, StateChanged, ThingLifecycle
from gateway.common.errors import Conflict, NotFound
from gateway.common.series import flatten
from gateway.common.tasks import cancel_and_wait
from gateway.config import GatewayConfig
from gateway.detect.anomalies import AnomalyLog
from gateway.detect.core import Anomaly, DetectorCore, DetectSettings, Transition
from gateway.detect.models import ModelBundle, ModelError, ModelRegistry
from gateway.detect.rules import load_rules
from gateway.detect.sinks import AnomalySink, MqttAlertSink, WebhookSink
from gateway.detect.stats import StatsSettings
from gateway.metrics import GatewayMetrics
from gateway.twin.registry import TwinRegistry

log = logging.getLogger(__name__)

STATUS_FEATURE = "status"
MAX_DRAIN = 200_000
# A tick's worth of readings: fewer than this wait for more, up to QUIET_TICKS times tick_ms. Each tick costs a
# hand-off to the worker thread, a wake-up of the event loop and the array steps whatever it holds; at
# 1,000 msg/s a tick per tick_ms held 50 readings and cost about as much in hand-offs as in scoring.
# The longest wait stays within what a reading may take from publish to AnomalyDetected (p99 100 ms):
# 75 ms at the default tick_ms.
TICK_READINGS = 200
QUIET_TICKS = 1.5
_SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}


class AnomalyNotFound(NotFound):
    code = "anomaly_not_found"


class AnomalyStateError(Conflict):
    code = "anomaly_state"


class Silencer(Protocol):
    """What silences notifications: the alarm journal's shelves, asked once per event."""

    def silenced(self, thing_id: str, anomaly_type: str, now: float) -> bool: ...


class AnomalyDetector:
    """Rules + statistics + models over the live twin; owns the anomaly log and the sinks."""

    def __init__(self, config: GatewayConfig, registry: TwinRegistry, bus: EventBus, metrics: GatewayMetrics) -> None:
        self.config = config
        d = config.detect
        self._registry = registry
        self._bus = bus
        self._m = metrics
        self.models = ModelRegistry(config.models_dir)
        self.log = AnomalyLog(Path(config.gateway.data_dir) / "anomalies.sqlite")
        rules = load_rules(Path(d.rules_file) if d.rules_file else None)
        settings = DetectSettings(enter=d.enter_score, exit=d.exit_score, clear_s=d.clear_s, ignore=d.ignore,
                                  stats=StatsSettings(warmup=d.warmup_samples, learn=d.learn_samples,
                                                                    z_limit=d.z_limit))
        self.core = DetectorCore(rules, settings)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="detector")
        self._sub = bus.subscribe("detector", maxsize=MAX_DRAIN, wake_at=TICK_READINGS)
        self._tasks: list[asyncio.Task[None]] = []
        self._stamps: dict[str, float] = {}
        self.model_errors: dict[str, str] = {}
        self.sinks: list[tuple[AnomalySink, int]] = []
        self.silencer: Silencer | None = None  # set by the composition root when the journal exists
        for hook in d.webhooks:
            self.sinks.append((WebhookSink(hook.url, headers=dict(hook.headers)), _SEVERITY_RANK[hook.min_severity]))
        if d.mqtt_alerts:
            m = config.mqtt
            tls = m.ssl_context()
            self.sinks.append((MqttAlertSink(m.host, m.port, username=m.username or None, password=m.password or None,
                                             client_id=f"{config.mqtt_client_id}-alerts", tls_context=tls), 0))
        self.last_tick_s = 0.0
        self.in_use: dict[str, ModelBundle] = {}  # the loop's copy of what the core uses, for the API

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        await self.log.start()
        orphans = []
        for a in await self.log.active():
            if self._registry.get(a.thing_id) is None:  # its Thing was deleted while the gateway was down
                a.state, a.resolved_at, a.resolved_by = "resolved", time.time(), "thing deleted"
                orphans.append(a)
            else:
                self.core.adopt(a)
        await self.log.save(orphans)
        self._m.anomalies_active.set(len(await self.log.active()))
        await self.poll_models()
        self._sub.watch(everything=True)
        for sink, _ in self.sinks:
            await sink.start()
        self._tasks = [asyncio.create_task(self._run(), name="detector"),
                       asyncio.create_task(self._housekeeping(), name="detector-models")]
        log.info("anomaly detector started", extra={"rules": len(self.core.rules.book.rules),
                                                    "rules_source": self.core.rules.book.source,
                                                    "models": sorted(self.in_use)})

    async def stop(self) -> None:
        """Finish what arrived (a last tick), persist every active anomaly, then close."""
        await cancel_and_wait(*self._tasks)
        self._tasks = []
        try:
            events = self._sub.drain(MAX_DRAIN)
            if events:
                await self._publish(await self._call(self._process, events))
            await self.log.save(await self._call(self.core.active_snapshot))
        except Exception:  # still close the files; what was lost is logged
            log.exception("final detector tick failed")
        self._sub.close()
        for sink, _ in self.sinks:
            await sink.stop()
        await asyncio.to_thread(self._worker.shutdown, True)
        await self.log.stop()

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    # ----------------------------------------------------------------- the loop
    async def _run(self) -> None:
        """A tick at most every `tick_ms`; after it, the next waits for `TICK_READINGS` events, but no
        longer than `QUIET_TICKS` times `tick_ms` after this one began: a busy line is scored every
        `tick_ms` as before, a quiet one (or a line at a few hundred messages a second) in fewer,
        larger ticks. Every reading is scored; none waits longer than `QUIET_TICKS` times `tick_ms`."""
        period = self.config.detect.tick_ms / 1000
        longest = period * QUIET_TICKS
        while True:
            started = time.monotonic()
            events = self._sub.drain(MAX_DRAIN)
            if events:
                try:
                    transitions = await self._call(self._process, events)
                    await self._publish(transitions)
                except Exception:  # one bad tick must not end detection; it is logged and counted
                    log.exception("detector tick failed")
                    self._m.detect_errors.inc()
                self.last_tick_s = time.monotonic() - started
                self._m.detect_tick_seconds.observe(self.last_tick_s)
            await asyncio.sleep(max(0.0, period - (time.monotonic() - started)))
            await self._sub.wait(max(0.0, longest - (time.monotonic() - started)))

    def _process(self, events: list[Any]) -> list[Transition]:
        """On the worker thread: readings into the core, then one tick. Every sample of a batched
        message is scored at its device time; the transitions carry copies, safe on the loop."""
        core = self.core
        n = 0
        out: list[Transition] = []
        for ev in events:
            if isinstance(ev, StateChanged):
                if ev.source != "telemetry" or ev.thing is None:
                    continue
                ttype = ev.thing.type
                for ts, props in ev.samples or ((ev.timestamp, ev.properties),):
                    core.add(ev.thing_id, ttype, ev.feature, ts, flatten(props))
                    n += 1
            elif isinstance(ev, ThingLifecycle) and ev.kind == "ThingDeleted":
                gone = core.forget(ev.thing_id)
                if gone is not None:
                    gone.state, gone.resolved_at, gone.resolved_by = "resolved", time.time(), "thing deleted"
                    out.append(Transition("resolved", gone))
        rows = core.rows_scored
        out += [Transition(t.kind, copy.copy(t.anomaly)) for t in core.tick()]
        self._m.detect_readings.inc(n)
        self._m.detect_rows.inc(core.rows_scored - rows)
        return out

    async def _publish(self, transitions: list[Transition]) -> None:
        if not transitions:
            return
        await self.log.save([t.anomaly for t in transitions])
        now = time.time()
        for t in transitions:
            a = t.anomaly
            doc = a.to_json()
            if t.kind == "opened":
                self._m.anomalies_opened.labels(a.severity, a.anomaly_type).inc()
                log.warning("anomaly", extra={"thing": a.thing_id, "anomaly_id": a.id, "severity": a.severity,
                                              "explanation": a.explanation, "score": round(a.score, 3)})
            kind = {"opened": "AnomalyDetected", "updated": "AnomalyUpdated", "resolved": "AnomalyResolved"}[t.kind]
            self._announce(kind, a, doc, now)
        self._m.anomalies_active.set(sum(1 for a in await self.log.active()))

    def _announce(self, kind: str, a: Anomaly, doc: dict[str, Any], now: float) -> None:
        thing = self._registry.get(a.thing_id)
        self._bus.publish(AnomalyEvent(a.thing_id, thing, kind=kind, anomaly=doc, timestamp=now))  # type: ignore[arg-type]
        status_of = thing.features.get(STATUS_FEATURE) if thing is not None else None
        current = status_of.properties.get("anomaly_id") if status_of is not None else None
        # the status shows the Thing's current anomaly: a late label on an old one must not clear it
        if thing is not None and (a.state != "resolved" or current in (None, a.id)):
            active = a.state != "resolved"
            status = {"anomaly": active, "anomaly_score": round(a.score, 3) if active else 0.0,
                      "top_features": [f"{f['feature']}/{f['property']}" for f in a.top_features] if active else [],
                      "anomaly_id": a.id if active else None, "severity": a.severity if active else None,
                      "explanation": a.explanation if active else None}
            with contextlib.suppress(NotFound):  # deleted meanwhile: nothing to mark
                self._registry.merge_feature(a.thing_id, STATUS_FEATURE, properties=status, desired=None,
                                             expected_version=None, source="detector")
        if not self.sinks:
            return
        if self.silencer is not None and self.silencer.silenced(a.thing_id, a.anomaly_type, now):
            self._m.notifications_silenced.inc()  # shelved: the bus and the journal still have it
            return
        rank = _SEVERITY_RANK.get(a.severity, 0)
        event = {**doc, "event": kind, "revision": int(now * 1000)}
        for sink, min_rank in self.sinks:
            if rank >= min_rank:
                sink.offer(event)

    # ----------------------------------------------------------------- operators
    async def acknowledge(self, anomaly_id: str, by: str, note: str = "") -> Anomaly:
        now = time.time()
        a = await self._call(self.core.acknowledge, anomaly_id, by, note, now)
        if a is None:  # not active in the core
            a = await self._logged(anomaly_id)
            if a.state == "resolved":
                raise AnomalyStateError(f"anomaly {anomaly_id} is already resolved", anomaly_id=anomaly_id)
            a.state, a.acknowledged_at, a.acknowledged_by = "acknowledged", now, by
            a.note = note or a.note
        else:
            a = copy.copy(a)
        await self.log.save([a])
        self._announce("AnomalyAcknowledged", a, a.to_json(), now)
        return a

    async def resolve(self, anomaly_id: str, by: str, note: str = "", false_positive: bool = False) -> Anomaly:
        """An operator closes an anomaly, optionally as a false positive (kept, labelled, for retraining)."""
        now = time.time()
        a = await self._call(self.core.close, anomaly_id, by, note, false_positive, now)
        if a is None:  # not active in the core
            a = await self._logged(anomaly_id)
            if a.state != "resolved":  # active in the log but not in the core (its Thing was deleted)
                a.state, a.resolved_at, a.resolved_by = "resolved", now, by
            a.note = note or a.note
            a.false_positive = a.false_positive or false_positive  # a later label is still welcome
        else:
            a = copy.copy(a)
        await self.log.save([a])
        self._announce("AnomalyResolved", a, a.to_json(), now)
        self._m.anomalies_active.set(len(await self.log.active()))
        return a

    async def _logged(self, anomaly_id: str) -> Anomaly:
        """The anomaly as the log holds it, or AnomalyNotFound."""
        stored = await self.log.get(anomaly_id)
        if stored is None:
            raise AnomalyNotFound(f"no anomaly {anomaly_id!r}", anomaly_id=anomaly_id)
        return stored

    # ----------------------------------------------------------------- models
    async def _housekeeping(self) -> None:
        """Model activations on disk, active anomalies' latest score and last-seen time, pruning."""
        last_prune = 0.0
        while True:
            await asyncio.sleep(self.config.detect.model_poll_s)
            try:
                await self.poll_models()
                await self.log.save(await self._call(self.core.active_snapshot))
                if time.monotonic() - last_prune > 3600:
                    last_prune = time.monotonic()
                    await self.log.prune(self.config.detect.anomaly_keep_days)
            except Exception:  # never let housekeeping die: models would stop being picked up
                log.exception("detector housekeeping failed; retrying")
                self._m.detect_errors.inc()

    async def poll_models(self) -> None:
        """Load every type whose activation changed on disk; a refused model leaves the previous in force."""
        for ttype in self.models.types():
            stamp = self.models.pointer_stamp(ttype)
            if stamp == self._stamps.get(ttype):
                continue
            self._stamps[ttype] = stamp
            version = self.models.active_version(ttype)
            current = self.in_use.get(ttype)
            if version is None or (current is not None and current.version == version):
                continue
            try:
                bundle: ModelBundle = await self._call(self.models.load, ttype, version)
            except ModelError as exc:
                self.model_errors[ttype] = str(exc)
                self._m.detect_model_refused.labels(ttype).inc()
                log.error("model refused; the previous one stays active",
                          extra={"type": ttype, "version": version, "reason": str(exc),
                                 "active": current.version if current else None})
                continue
            await self._use(bundle)

    async def activate(self, thing_type: str, version: str) -> None:
        """Check and activate a version, and use it from the next tick (raises ModelError when refused)."""
        bundle = await self._call(self.models.activate, thing_type, version)
        await self._use(bundle)

    async def rollback(self, thing_type: str) -> str:
        bundle = await self._call(self.models.rollback, thing_type)
        await self._use(bundle)
        return str(bundle.version)

    async def _use(self, bundle: ModelBundle) -> None:
        await self._call(self.core.set_model, bundle)
        self.in_use[bundle.type] = bundle
        self._stamps[bundle.type] = self.models.pointer_stamp(bundle.type)
        self.model_errors.pop(bundle.type, None)
        self._m.detect_model_loads.labels(bundle.type).inc()
        log.info("model in use", extra={"type": bundle.type, "version": bundle.version, "hash": bundle.sha[:12]})

    def model_status(self) -> list[dict[str, Any]]:
        out = []
        for ttype in sorted(set(self.models.types()) | set(self.in_use)):
            bundle = self.in_use.get(ttype)
            out.append({"type": ttype, "active": bundle.version if bundle else None,
                        "hash": bundle.sha if bundle else None, "features": bundle.features if bundle else [],
                        "configured": self.models.active_version(ttype), "error": self.model_errors.get(ttype)})
        return out
