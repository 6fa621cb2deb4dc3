"""The SQLite worker's former address; it lives on the shared floor, `gateway.common.sqlite`."""

from gateway.common.sqlite import SqliteWorker

__all__ = ["SqliteWorker"]
