"""GatewayService: the composition root. Builds the parts in data-flow order, runs them, stops them
in reverse on SIGTERM (ingest first, so nothing new arrives while the buffer and the twin are flushed)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from gateway.alarms.journal import AlarmJournal
from gateway.api.app import build_app
from gateway.api.parts import Parts
from gateway.buffer.buffer import TelemetryBuffer
from gateway.buffer.restore import restore_twin
from gateway.bus import EventBus
from gateway.common import systemd
from gateway.common.auth import Authenticator
from gateway.common.http import serve
from gateway.config import GatewayConfig
from gateway.connectors.health import ConnectorMetrics
from gateway.connectors.manager import ConnectorManager
from gateway.connectors.pipeline import ConnectorPipeline
from gateway.detect.detector import AnomalyDetector
from gateway.ingest.deadletter import DeadLetterLog
from gateway.ingest.mqtt import MqttIngest
from gateway.ingest.sequence import SequenceTracker
from gateway.memory import (
    budget,
    check_budget,
    limit_native_caches,
    machine_memory_mb,
    release_heap,
    resident_mb,
    settle_heap,
)
from gateway.metrics import GatewayMetrics
from gateway.oee.tracker import OeeTracker
from gateway.provision import Provisioner
from gateway.twin.registry import TwinRegistry

if TYPE_CHECKING:
    from gateway.discovery import GatewayDiscovery
    from gateway.uplink.forwarder import Forwarder
    from gateway.uplink.models import ModelFetcher

log = logging.getLogger(__name__)


class Part(Protocol):
    """A long-lived part of the service: started once, stopped once after its in-flight work."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class GatewayService:
    """One line gateway: registry → buffer → detector → ingest → bus → API."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        limit_native_caches()
        self.metrics = GatewayMetrics()
        self.bus = EventBus(on_drop=lambda policy: self.metrics.bus_dropped.labels(policy).inc())
        data = Path(config.gateway.data_dir)
        self.registry = TwinRegistry(data / "registry.sqlite", self.bus,
                                     flush_interval_s=config.twin.flush_interval_s)
        self.dead_letters = DeadLetterLog(self.registry.sqlite, self.metrics, keep=config.ingest.dead_letter_keep)
        self.buffer = TelemetryBuffer(config, self.metrics, uplink=bool(config.uplink.url))
        self.sequences = SequenceTracker(self.metrics)
        self.ingest = MqttIngest(config, self.registry, self.dead_letters, self.metrics, self.buffer, self.sequences)
        # PLC connectors: readings enter beside MQTT ingest, into the same twin and buffer
        self.connector_metrics = ConnectorMetrics(self.metrics.registry)
        self.connectors = ConnectorManager(
            config.connectors, self.registry.sqlite,
            ConnectorPipeline(self.registry, self.buffer, self.connector_metrics, site=config.gateway.site,
                              line=config.gateway.line),
            self.connector_metrics, thing_prefix=f"{config.gateway.site}:", state_dir=data / "connectors")
        self.detector = AnomalyDetector(config, self.registry, self.bus, self.metrics) if config.detect.enabled \
            else None
        self.oee = OeeTracker(config.oee, data, config.gateway.line, self.bus, self.metrics.registry) \
            if config.oee.enabled else None
        self.journal: AlarmJournal | None = None
        if self.detector is not None:
            # a journal or shelf change sends the anomalies it concerns upstream again
            self.journal = AlarmJournal(data / "alarms.sqlite", on_change=self.detector.log.touch)
            self.detector.silencer = self.journal  # shelved conditions notify nobody
        self.forwarder: Forwarder | None = None
        if config.uplink.url:
            from gateway.uplink.forwarder import Forwarder

            self.forwarder = Forwarder(config, self.buffer, self.registry, self.metrics, self.detector, self.oee,
                                       self.journal)
        self.model_fetcher: ModelFetcher | None = None
        if config.uplink.url and config.uplink.models_interval_s and self.detector is not None:
            from gateway.uplink.models import ModelFetcher

            self.model_fetcher = ModelFetcher(config, self.detector, self.metrics)
        self.provisioner: Provisioner | None = None
        if config.discovery.enabled:
            self.provisioner = Provisioner(config, self.registry, self.metrics)
        self.discovery: GatewayDiscovery | None = None
        self.parts = Parts(config, self.registry, self.bus, self.ingest, self.dead_letters, self.metrics,
                           Authenticator(config.auth.api_keys, open_access=config.auth.open), time.time(),
                           self.buffer, self.detector, self.provisioner, self.connectors, self.oee,
                           self.journal,
                           self.forwarder.quarantine if self.forwarder is not None else None)
        self.app = build_app(self.parts)
        self._runner: web.AppRunner | None = None
        self.http_port: int | None = None
        self.running = False

    async def start(self) -> None:
        cfg = self.config
        if cfg.auth.open:
            log.warning("auth.open is on: every HTTP and WebSocket client is treated as admin (demo mode)")
        self.running = True
        await self.registry.start()
        await self.dead_letters.start()
        await self.buffer.start()
        self.sequences.load(self.buffer.marks)
        restored = await restore_twin(self.buffer, self.registry, auto_register=cfg.ingest.auto_register,
                                      line=cfg.gateway.line)
        if restored:
            log.info("live state restored from the buffer", extra={"things": restored})
        self._check_memory()
        settle_heap()  # what exists now lives as long as the gateway: not walked by every collection
        for watcher in self._watchers():
            await watcher.start()  # before ingest: the first reading is already watched
        await self.ingest.start()
        await self.connectors.start()
        if self.forwarder is not None:
            await self.forwarder.start()
        if self.model_fetcher is not None:
            await self.model_fetcher.start()
        self._runner, self.http_port = await serve(self.app, cfg.http)
        if self.provisioner is not None:
            from gateway.discovery import GatewayDiscovery

            await self.provisioner.start()
            self.discovery = GatewayDiscovery(cfg, self.provisioner, self.http_port)
            await self.discovery.start()
        log.info("gateway started", extra={"site": cfg.gateway.site, "line": cfg.gateway.line,
                                           "gateway_id": cfg.gateway.id, "http_port": self.http_port,
                                           "things": len(self.registry)})

    def _watchers(self) -> list[Part]:
        """The parts this gateway runs that act on readings as they are applied: anomaly detection, OEE
        tracking, the alarm journal."""
        return [p for p in (self.detector, self.oee, self.journal) if p is not None]

    def _check_memory(self) -> None:
        """Warn at start when this gateway may need more than its share of the machine's memory."""
        resident = resident_mb()
        if resident is None:
            return
        check_budget(budget(resident=resident, duckdb_mb=self.buffer.memory_limit_mb, things=len(self.registry),
                            ws_queue=self.config.ws.queue_size, machine_mb=machine_memory_mb()))

    async def stop(self) -> None:
        """Reverse order: stop taking messages, close clients, then persist the twin. Idempotent."""
        if not self.running:
            return
        self.running = False
        if self.discovery is not None:
            await self.discovery.stop()
            self.discovery = None
        await self.connectors.stop()  # first, like ingest: nothing new arrives while the rest is flushed
        await self.ingest.stop()
        if self.model_fetcher is not None:
            await self.model_fetcher.stop()
        if self.forwarder is not None:
            await self.forwarder.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for watcher in self._watchers():
            await watcher.stop()
        await self.buffer.stop()
        await self.dead_letters.stop()
        if self.provisioner is not None:
            await self.provisioner.stop()
        await self.registry.stop()
        release_heap()
        log.info("gateway stopped")

    async def run_until_signalled(self) -> None:
        """Run until SIGTERM or SIGINT, then stop gracefully."""
        await systemd.run_until_signalled(self, "gateway")
