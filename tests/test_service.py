"""`egiz gateway run` and `egiz aggregator run` as real processes: they start, serve, tell systemd they
are ready and alive, and stop gracefully on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
from pathlib import Path

import aiohttp
import aiomqtt

from gateway.broker import find_free_port
from tests.helpers import (
    ADMIN_KEY,
    EGIZ,
    aggregator_toml,
    auth,
    gateway_toml,
    telemetry,
    topic,
    unique_site,
    wait_ready,
)


class SystemdNotify:
    """systemd's notify socket, as a unit with Type=notify and WatchdogSec= provides it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.notes: list[str] = []

    def env(self, watchdog_usec: int = 200_000) -> dict[str, str]:
        return {**os.environ, "NOTIFY_SOCKET": str(self.path), "WATCHDOG_USEC": str(watchdog_usec)}

    def received(self) -> list[str]:
        with contextlib.suppress(BlockingIOError):
            while True:
                self.notes.append(self.sock.recv(256).decode())
        return self.notes

    def close(self) -> None:
        self.received()
        self.sock.close()


async def test_gateway_process_serves_and_stops_on_sigterm(mosquitto, tmp_path: Path) -> None:
    site, port = unique_site(), find_free_port()
    cfg = gateway_toml(tmp_path / "gateway.toml", site, mqtt={"host": mosquitto[0], "port": mosquitto[1]},
                       http={"port": 1}, ingest={"auto_register": True})
    notify = SystemdNotify(tmp_path / "notify.sock")
    proc = await asyncio.create_subprocess_exec(
        EGIZ, "gateway", "run", "--config", str(cfg), "--http-port", str(port), stderr=asyncio.subprocess.PIPE,
        env=notify.env())
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url, "gateway")
        async with aiohttp.ClientSession() as http:
            async with aiomqtt.Client(*mosquitto) as client:
                await client.publish(topic(site, "oven-001"), telemetry(1, {"setpoint": 185.0}, boot="b"), qos=1)
            for _ in range(100):
                async with http.get(f"{url}/api/v1/things/{site}:oven-001", headers=auth()) as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.05)
            assert r.status == 200
            await asyncio.sleep(0.5)
            assert notify.received()[0] == "READY=1", notify.notes
            assert notify.received().count("WATCHDOG=1") >= 3, notify.notes  # every 0.1 s, half the period
    finally:
        err = await _stop_notified(proc, notify)
    lines = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    assert [x["msg"] for x in lines][-1] == "gateway stopped"  # structured logs, graceful end
    assert ADMIN_KEY not in err.decode()  # no secrets in logs
    assert (tmp_path / "data" / "registry.sqlite").exists()


async def test_aggregator_process_tells_systemd_it_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = find_free_port()
    cfg = aggregator_toml(tmp_path, port, unique_site())
    notify = SystemdNotify(tmp_path / "notify.sock")
    proc = await asyncio.create_subprocess_exec(EGIZ, "aggregator", "run", "--config", str(cfg),
                                                stderr=asyncio.subprocess.PIPE, env=notify.env())
    try:
        await wait_ready(f"http://127.0.0.1:{port}", "aggregator")
        await asyncio.sleep(0.5)
        assert notify.received()[0] == "READY=1", notify.notes
        assert notify.received().count("WATCHDOG=1") >= 3, notify.notes
    finally:
        err = await _stop_notified(proc, notify)
    assert ADMIN_KEY not in err.decode()


async def _stop_notified(proc: asyncio.subprocess.Process, notify: SystemdNotify) -> bytes:
    """SIGTERM a service under systemd notification; it must exit 0 after telling systemd STOPPING."""
    proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    notify.close()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert notify.notes[-1] == "STOPPING=1"
    return err


async def test_port_in_use_is_one_line_and_exit_1(mosquitto, tmp_path: Path) -> None:
    with __import__("socket").socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = gateway_toml(tmp_path / "gateway.toml", "s1", http={"port": port})
        proc = await asyncio.create_subprocess_exec(EGIZ, "gateway", "run", "--config", str(cfg),
                                                    stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert "egiz: cannot start the gateway" in err.decode()
    assert "Traceback" not in err.decode()
