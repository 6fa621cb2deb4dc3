"""The DuckDB telemetry buffer: the line's historian and the uplink's store-and-forward outbox."""
