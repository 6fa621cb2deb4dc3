"""OpenEgiz Edge line gateway: MQTT ingest, live twin, event bus and API for one production line."""

__version__ = "0.1.0"
