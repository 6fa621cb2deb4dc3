"""Connector readings into the gateway's pipeline, the same path MQTT telemetry takes: the twin
(version + 1, `StateChanged` on the bus, so the WebSocket and the detector see them), then the buffer
(history and the uplink's outbox).

Quality: a `good` value is stored as it is. An `uncertain` value is stored too, and beside it the
string property `<property>_quality = "uncertain"`; a `bad` reading stores no value, only
`<property>_quality = "bad"`. When the tag is good again, `<property>_quality = "good"` is stored
once; a tag that was always good never gets the extra property.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from gateway.buffer.buffer import TelemetryBuffer
from gateway.common.readings import PropertyValue, Sample
from gateway.connectors.base import DeviceConfig, Reading
from gateway.connectors.health import ConnectorMetrics, HealthSnapshot
from gateway.twin.model import Thing
from gateway.twin.registry import TwinRegistry

CONNECTIVITY = "connectivity"


class ConnectorPipeline:
    """The `ReadingSink` of the gateway: readings and health of connector devices into their Things."""

    def __init__(self, registry: TwinRegistry, buffer: TelemetryBuffer, connector_metrics: ConnectorMetrics, *,
                 site: str, line: str) -> None:
        self._registry = registry
        self._buffer = buffer
        self._cm = connector_metrics
        self._site = site
        self._line = line
        self._not_good: set[tuple[str, str, str]] = set()  # (thing id, feature, property) last seen not good

    def thing_id(self, device: DeviceConfig) -> str:
        return f"{self._site}:{device.thing}"

    def thing(self, device: DeviceConfig) -> Thing:
        """The device's Thing, registered on first use."""
        return self._registry.ensure(self.thing_id(device), device.type, {
            "name": device.thing, "line": self._line, "registeredBy": "connector",
            "connector": {"device": device.name, "protocol": device.protocol}})

    def deliver(self, device: DeviceConfig, readings: Sequence[Reading]) -> None:
        if not readings:
            return
        thing = self.thing(device)
        samples: dict[tuple[str, float], dict[str, PropertyValue]] = {}
        counts = {"good": 0, "uncertain": 0, "bad": 0}
        for r in readings:
            counts[r.quality] += 1
            props = samples.get((r.feature, r.ts))
            if props is None:
                props = samples[(r.feature, r.ts)] = {}
            key = (thing.id, r.feature, r.property)
            if r.quality == "good":
                if key in self._not_good:
                    self._not_good.discard(key)
                    props[f"{r.property}_quality"] = "good"
            else:
                self._not_good.add(key)
                props[f"{r.property}_quality"] = r.quality
            if r.value is not None and r.quality != "bad":
                props[r.property] = r.value
        batch = [Sample(feature, ts, None, props) for (feature, ts), props in samples.items() if props]
        if not batch:
            return
        now = time.time()
        self._registry.apply_samples(thing, batch, now)
        self._buffer.add(thing.id, thing.type, batch, now, None)
        for quality, n in counts.items():
            if n:
                self._cm.values.labels(device.name, quality).inc(n)

    def health(self, device: DeviceConfig, snapshot: HealthSnapshot) -> None:
        """The device's health on its Thing's `connectivity` feature (one version step, one StateChanged)."""
        thing = self.thing(device)
        props: dict[str, Any] = snapshot.properties(device.name, device.protocol)
        self._registry.merge_feature(thing.id, CONNECTIVITY, properties=props, desired=None, expected_version=None,
                                     source="connector")
