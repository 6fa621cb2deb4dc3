"""The typed runtime data every route module reads (`request.app[PARTS]`), built by the service."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from aiohttp import web

from gateway.alarms.journal import AlarmJournal
from gateway.buffer.buffer import TelemetryBuffer
from gateway.bus import EventBus
from gateway.common.auth import Authenticator
from gateway.common.errors import NotFound
from gateway.config import GatewayConfig
from gateway.connectors.manager import ConnectorManager
from gateway.detect.detector import AnomalyDetector
from gateway.ingest.deadletter import DeadLetterLog
from gateway.ingest.mqtt import MqttIngest
from gateway.metrics import GatewayMetrics
from gateway.oee.tracker import OeeTracker
from gateway.provision import Provisioner
from gateway.twin.registry import TwinRegistry
from gateway.uplink.quarantine import Quarantine


@dataclass
class Parts:
    """Typed runtime data the handlers need, built by the service (the composition root)."""

    config: GatewayConfig
    registry: TwinRegistry
    bus: EventBus
    ingest: MqttIngest
    dead_letters: DeadLetterLog
    metrics: GatewayMetrics
    auth: Authenticator
    started: float
    buffer: TelemetryBuffer
    detector: AnomalyDetector | None = None
    provisioner: Provisioner | None = None
    connectors: ConnectorManager | None = None
    oee: OeeTracker | None = None
    journal: AlarmJournal | None = None
    quarantine: Quarantine | None = None  # the forwarder's, when the gateway forwards

    # The optional parts a route needs: each, or a 404 saying why this gateway runs without it.
    def need_detector(self) -> AnomalyDetector:
        return required(self.detector, "anomaly detection is switched off on this gateway (detect.enabled = false)")

    def need_journal(self) -> AlarmJournal:
        return required(self.journal, "the alarm journal needs anomaly detection (detect.enabled = true)")

    def need_connectors(self) -> ConnectorManager:
        return required(self.connectors, "this gateway runs no connectors")

    def need_provisioner(self) -> Provisioner:
        return required(self.provisioner,
                        "node discovery is switched off on this gateway (discovery.enabled = false)")

    def need_oee(self) -> OeeTracker:
        return required(self.oee, "OEE is switched off on this gateway (oee.enabled = false)")

    def need_quarantine(self) -> Quarantine:
        return required(self.quarantine, "this gateway does not forward (no uplink.url)")


PARTS = web.AppKey("parts", Parts)


T = TypeVar("T")


def required(part: T | None, absent: str) -> T:
    """The optional part a route needs, or a 404 saying why this gateway runs without it (`absent`)."""
    if part is None:
        raise NotFound(absent)
    return part
