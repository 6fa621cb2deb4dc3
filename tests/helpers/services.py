"""The machine's services a test needs: skipped with an install hint locally, a failure under CI."""

from __future__ import annotations

import os
import socket

import pytest

from gateway.broker import INSTALL_HINT, find_mosquitto

BROKER_HOST = "127.0.0.1"
BROKER_PORT = int(os.environ.get("EGIZ_TEST_BROKER_PORT", "1883"))


def need(condition: bool, message: str) -> None:
    """Skip when `condition` does not hold, but fail under CI (env `CI`), which always has what tests need."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def need_service(host: str, port: int, what: str, install: str) -> None:
    """A service listening on host:port (the machine's Mosquitto, PostgreSQL)."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return
    except OSError:
        need(False, f"needs {what} on {host}:{port}: {install}")


def need_mosquitto() -> str:
    """The mosquitto executable, for tests that start a broker of their own."""
    exe = find_mosquitto()
    need(exe is not None, f"needs the mosquitto binary: {INSTALL_HINT}")
    assert exe is not None
    return exe
