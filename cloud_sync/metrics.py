"""Prometheus metrics of the aggregator, on a registry owned by the service (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class AggregatorMetrics:
    """Every counter and gauge the aggregator exports at `/metrics`."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.batches = Counter("egiz_aggregator_batches_total", "Batches by result", ["result"], registry=r)
        self.points = Counter("egiz_aggregator_points_total", "Points stored", registry=r)
        self.bytes = Counter("egiz_aggregator_bytes_total", "Bytes of batches received", registry=r)
        self.apply_seconds = Histogram("egiz_aggregator_apply_seconds", "Time to apply one batch", registry=r,
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
        self.gateways = Gauge("egiz_aggregator_gateways", "Gateways known", registry=r)
        self.auth_failures = Counter("egiz_aggregator_auth_failures_total", "Refused requests", ["status"],
                                     registry=r)
        self.http_requests = Counter("egiz_aggregator_http_requests_total", "HTTP requests", ["method", "status"],
                                     registry=r)
        self.ws_refused = Counter("egiz_aggregator_ws_refused_total",
                                  "WebSocket clients refused at aggregator.ws_max_clients", registry=r)
        self.ws_clients = Gauge("egiz_aggregator_ws_clients", "WebSocket clients connected", registry=r)

    def refused(self, status: int) -> None:
        self.auth_failures.labels(str(status)).inc()

    def observed(self, method: str, status: int, seconds: float) -> None:
        self.http_requests.labels(method, str(status)).inc()
