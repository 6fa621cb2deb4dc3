"""Prometheus metrics of one gateway, on a registry owned by the service (no global state)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

MESSAGE_KINDS = ("telemetry", "status", "command_ack", "other")


class IngestCounts(Collector):
    """The counts the ingest takes per message, as plain integers handed to Prometheus when it scrapes.

    A `Counter` takes a lock on every increment; these are only ever changed on the event loop, so
    the ingest adds to plain integers and `/metrics` reads them.
    """

    def __init__(self) -> None:
        self.messages = dict.fromkeys(MESSAGE_KINDS, 0)  # MQTT messages received, by the topic they came on
        self.accepted = 0  # telemetry messages applied
        self.points = 0  # telemetry points applied (flattened)

    def collect(self) -> Iterator[Metric]:
        messages = CounterMetricFamily("egiz_mqtt_messages", "MQTT messages received", labels=["kind"])
        for kind, n in self.messages.items():
            messages.add_metric([kind], n)
        yield messages
        yield CounterMetricFamily("egiz_ingest_accepted_messages", "Telemetry messages applied", value=self.accepted)
        yield CounterMetricFamily("egiz_ingest_points", "Telemetry points applied (flattened)", value=self.points)


class GatewayMetrics:
    """Every counter and gauge the gateway exports at `/metrics`."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, ...
        GCCollector(registry=r)  # python_gc_collections_total per generation, objects collected
        self.ingest = IngestCounts()
        r.register(self.ingest)
        self.rejected = Counter("egiz_ingest_rejected_total", "Messages dead-lettered", ["reason"], registry=r)
        self.duplicates = Counter(
            "egiz_ingest_duplicate_samples_total", "Samples dropped as duplicates (seq)", registry=r
        )
        self.gaps = Counter("egiz_ingest_seq_gap_messages_total", "Messages missing according to seq gaps", registry=r)
        self.seq_late = Counter(
            "egiz_ingest_seq_late_messages_total", "Messages applied late: inside the seq window, after a higher seq",
            registry=r,
        )
        self.seq_too_old = Counter(
            "egiz_ingest_seq_too_old_total", "Samples dropped: seq below the anti-replay window", registry=r
        )
        self.provision_mismatch = Counter(
            "egiz_provision_mismatch_total",
            "Announcements of an approved node from another MAC or address (ignored)", registry=r,
        )
        self.reboots = Counter("egiz_ingest_node_reboots_total", "New boot ids seen", registry=r)
        self.dead_letter_overflow = Counter(
            "egiz_dead_letter_overflow_total", "Dead letters not stored (queue full)", registry=r
        )
        self.mqtt_connected = Gauge("egiz_mqtt_connected", "1 while connected to the broker", registry=r)
        self.mqtt_reconnects = Counter(
            "egiz_mqtt_reconnects_total", "Broker (re)connection attempts that failed", registry=r
        )
        self.buffer_points = Counter("egiz_buffer_points_total", "Points committed to the DuckDB buffer", registry=r)
        self.buffer_commits = Counter("egiz_buffer_commits_total", "Group commits to the DuckDB buffer", registry=r)
        self.buffer_commit_seconds = Histogram(
            "egiz_buffer_commit_seconds", "Time of one group commit", registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
        self.buffer_commit_errors = Counter(
            "egiz_buffer_commit_errors_total", "Group commits that failed (kept and retried)", registry=r
        )
        self.buffer_pending = Gauge("egiz_buffer_pending_points", "Points waiting for the next commit", registry=r)
        self.buffer_deadband = Counter(
            "egiz_buffer_deadband_skipped_total", "Points not stored raw because of a deadband", registry=r
        )
        self.buffer_refused = Counter(
            "egiz_buffer_refused_points_total", "Points not stored because the disk budget is used up", registry=r
        )
        self.buffer_dropped = Counter(
            "egiz_buffer_dropped_points_total", "Stored raw points removed", ["reason"], registry=r
        )
        self.buffer_unsent_dropped = Counter(
            "egiz_buffer_dropped_unsent_points_total", "Removed raw points the uplink had not yet confirmed",
            registry=r,
        )
        self.buffer_disk_bytes = Gauge("egiz_buffer_disk_used_bytes", "Bytes the data directory uses", registry=r)
        self.buffer_disk_budget = Gauge("egiz_buffer_disk_budget_bytes", "The data directory's budget", registry=r)
        self.buffer_duckdb_memory = Gauge("egiz_buffer_duckdb_memory_bytes",
                                          "Memory DuckDB holds (cache, data not yet checkpointed)", registry=r)
        self.buffer_wal_bytes = Gauge("egiz_buffer_wal_bytes", "Bytes of the buffer's WAL not yet checkpointed",
                                      registry=r)
        self.buffer_rollup_rows = Counter("egiz_buffer_rollup_rows_total", "Roll-up rows written", registry=r)
        self.uplink_batches = Counter("egiz_uplink_batches_total", "Uplink batch attempts by result", ["result"],
                                      registry=r)
        self.uplink_points = Counter("egiz_uplink_points_total", "Points the aggregator confirmed", registry=r)
        self.uplink_bytes = Counter("egiz_uplink_bytes_total", "Bytes of confirmed batches", registry=r)
        self.uplink_backlog_points = Gauge("egiz_uplink_backlog_points", "Points not yet confirmed", registry=r)
        self.uplink_backlog_bytes = Gauge("egiz_uplink_backlog_bytes", "Estimated bytes not yet confirmed",
                                          registry=r)
        self.uplink_quarantined = Counter("egiz_uplink_quarantined_total",
                                          "Things and anomalies the aggregator refused, set aside", registry=r)
        self.uplink_quarantine_things = Gauge("egiz_uplink_quarantine_things", "Things held in the quarantine",
                                              registry=r)
        self.uplink_quarantine_points = Gauge("egiz_uplink_quarantine_points",
                                              "Points of held Things waiting to be re-sent or dropped", registry=r)
        self.uplink_backlog_age = Gauge("egiz_uplink_backlog_age_seconds", "Age of the oldest unconfirmed point",
                                        registry=r)
        self.detect_readings = Counter("egiz_detect_readings_total", "Feature readings the detector took", registry=r)
        self.detect_rows = Counter("egiz_detect_rows_scored_total", "Feature rows scored by ONNX models", registry=r)
        self.detect_tick_seconds = Histogram(
            "egiz_detect_tick_seconds", "Time of one detector tick (rules, statistics, batched inference)",
            registry=r, buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
        )
        self.detect_errors = Counter("egiz_detect_errors_total", "Detector ticks that failed", registry=r)
        self.detect_model_loads = Counter("egiz_detect_model_loads_total", "Model versions put in use", ["type"],
                                          registry=r)
        self.detect_model_refused = Counter(
            "egiz_detect_model_refused_total", "Model versions refused (corrupt or mismatched)", ["type"], registry=r
        )
        self.anomalies_opened = Counter("egiz_anomalies_opened_total", "Anomalies opened",
                                        ["severity", "anomaly_type"], registry=r)
        self.anomalies_active = Gauge("egiz_anomalies_active", "Anomalies open or acknowledged", registry=r)
        self.notifications_silenced = Counter("egiz_anomaly_notifications_silenced_total",
                                              "Anomaly events a shelf kept from the notification sinks", registry=r)
        self.uplink_models = Counter("egiz_uplink_models_total", "Central model versions by result", ["result"],
                                     registry=r)
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

    def refused(self, status: int) -> None:
        self.auth_failures.labels(str(status)).inc()

    def observed(self, method: str, status: int, seconds: float) -> None:
        self.http_requests.labels(method, str(status)).inc()
        self.http_latency.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
