"""Per-device health: online/offline since when and why, poll success rate, latency percentiles,
requests per cycle, the circuit breaker; and the connectors' Prometheus metrics."""

from __future__ import annotations

import contextlib
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.common.timefmt import iso_utc

WINDOW = 100  # polls the success rate and the latency percentiles are computed over


class ConnectorMetrics:
    """The connectors' series at `/metrics`, labelled by device name."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.polls = Counter("egiz_connector_polls_total", "Device poll cycles by result", ["device", "result"],
                             registry=r)
        self.requests = Counter("egiz_connector_requests_total", "Protocol requests sent by polls", ["device"],
                                registry=r)
        self.errors = Counter("egiz_connector_errors_total", "Device errors by reason", ["device", "reason"],
                              registry=r)
        self.values = Counter("egiz_connector_tag_values_total", "Tag values delivered to the twin",
                              ["device", "quality"], registry=r)
        self.online = Gauge("egiz_connector_online", "1 while the device answers", ["device"], registry=r)
        self.breaker_open = Gauge("egiz_connector_breaker_open", "1 while the circuit breaker is open",
                                  ["device"], registry=r)
        self.success_rate = Gauge("egiz_connector_poll_success_ratio", "Share of the last 100 polls that succeeded",
                                  ["device"], registry=r)
        self.poll_seconds = Histogram("egiz_connector_poll_seconds", "Time of one poll cycle", ["device"],
                                      registry=r, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
                                                           5.0))
        self.overruns = Counter("egiz_connector_poll_overruns_total", "Poll cycles skipped because one ran late",
                                ["device"], registry=r)
        self.writes = Counter("egiz_connector_writes_total", "Tag writes by result", ["device", "result"], registry=r)

    def forget(self, device: str) -> None:
        """A removed device's series disappear."""
        for metric in (self.online, self.breaker_open, self.success_rate, self.poll_seconds, self.requests,
                       self.overruns):
            with contextlib.suppress(KeyError):
                metric.remove(device)


@dataclass(frozen=True, slots=True)
class HealthSnapshot:
    """What the Thing's `connectivity` feature shows for a connector device."""

    state: Literal["online", "offline"]
    since: float
    last_error: str
    success_rate: float
    p50_ms: float
    p99_ms: float
    requests_per_cycle: int
    breaker: Literal["closed", "open"]

    def properties(self, device: str, protocol: str) -> dict[str, Any]:
        return {"state": self.state, "since": iso_utc(self.since), "lastError": self.last_error,
                "pollSuccessRate": round(self.success_rate, 4), "latencyP50Ms": round(self.p50_ms, 3),
                "latencyP99Ms": round(self.p99_ms, 3), "requestsPerCycle": self.requests_per_cycle,
                "breaker": self.breaker, "device": device, "protocol": protocol}


class DeviceHealth:
    """Counts one device's polls; knows when its state changed."""

    def __init__(self, now: float) -> None:
        self.state: Literal["online", "offline"] = "offline"
        self.since = now
        self.last_error = "not polled yet"
        self.breaker: Literal["closed", "open"] = "closed"
        self.requests_per_cycle = 0
        self._results: deque[bool] = deque(maxlen=WINDOW)
        self._latency: deque[float] = deque(maxlen=WINDOW)

    def succeeded(self, seconds: float, requests: int, now: float) -> bool:
        """True when this changed the state (offline → online)."""
        self._results.append(True)
        self._latency.append(seconds)
        self.requests_per_cycle = requests
        self.breaker = "closed"
        if self.state != "online":
            self.state, self.since = "online", now
            return True
        return False

    def failed(self, error: str, now: float) -> bool:
        """True when this changed the state or the reason."""
        self._results.append(False)
        changed = self.state != "offline" or error != self.last_error
        if self.state != "offline":
            self.since = now
        self.state, self.last_error = "offline", error
        return changed

    @property
    def success_rate(self) -> float:
        return sum(self._results) / len(self._results) if self._results else 0.0

    def snapshot(self) -> HealthSnapshot:
        lat = sorted(self._latency)
        return HealthSnapshot(self.state, self.since, self.last_error, self.success_rate,
                              _pct(lat, 0.50) * 1000, _pct(lat, 0.99) * 1000, self.requests_per_cycle, self.breaker)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]
