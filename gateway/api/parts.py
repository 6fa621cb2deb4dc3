"""The typed runtime data every route module reads (`request.app[PARTS]`), built by the service."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from gateway.alarms.journal import AlarmJournal
from gateway.buffer.buffer import TelemetryBuffer
from gateway.bus import EventBus
from gateway.common.auth import Authenticator
from gateway.config import GatewayConfig
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
    oee: OeeTracker | None = None
    journal: AlarmJournal | None = None
    quarantine: Quarantine | None = None  # the forwarder's, when the gateway forwards


PARTS = web.AppKey("parts", Parts)
