"""Prometheus metrics of one gateway, on a registry owned by the service (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class GatewayMetrics:
    """Every counter and gauge the gateway exports at `/metrics`."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.messages = Counter("egiz_mqtt_messages_total", "MQTT messages received", ["kind"], registry=r)
        self.accepted = Counter("egiz_ingest_accepted_messages_total", "Telemetry messages applied", registry=r)
        self.points = Counter("egiz_ingest_points_total", "Telemetry points applied (flattened)", registry=r)
        self.rejected = Counter("egiz_ingest_rejected_total", "Messages dead-lettered", ["reason"], registry=r)
        self.duplicates = Counter(
            "egiz_ingest_duplicate_samples_total", "Samples dropped as duplicates (seq)", registry=r
        )
        self.gaps = Counter("egiz_ingest_seq_gap_messages_total", "Messages missing according to seq gaps", registry=r)
        self.reboots = Counter("egiz_ingest_node_reboots_total", "New boot ids seen", registry=r)
        self.dead_letter_overflow = Counter(
            "egiz_dead_letter_overflow_total", "Dead letters not stored (queue full)", registry=r
        )
        self.mqtt_connected = Gauge("egiz_mqtt_connected", "1 while connected to the broker", registry=r)
        self.mqtt_reconnects = Counter(
            "egiz_mqtt_reconnects_total", "Broker (re)connection attempts that failed", registry=r
        )
        self.commands = Counter("egiz_commands_total", "Commands sent to nodes", ["result"], registry=r)
        self.things = Gauge("egiz_twin_things", "Things in the registry", registry=r)
        self.twin_flush_errors = Gauge("egiz_twin_flush_errors", "Failed twin flushes since start", registry=r)
        self.bus_dropped = Counter(
            "egiz_bus_dropped_events_total", "Events dropped for slow subscribers", ["policy"], registry=r
        )
        self.ws_clients = Gauge("egiz_ws_clients", "Open WebSocket connections", registry=r)
        self.ws_disconnected_slow = Counter(
            "egiz_ws_slow_disconnects_total", "WebSocket clients closed for being too slow", registry=r
        )
        self.http_requests = Counter("egiz_http_requests_total", "HTTP requests", ["method", "status"], registry=r)
        self.http_latency = Histogram(
            "egiz_http_request_seconds",
            "HTTP request time",
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
        )
        self.auth_failures = Counter("egiz_auth_failures_total", "Requests refused by auth", ["status"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
