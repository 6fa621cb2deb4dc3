"""`egiz gateway run` as a real process: starts, serves, tells systemd it is ready and alive, and stops
gracefully on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp
import aiomqtt

from gateway.broker import find_free_port
from tests.conftest import ADMIN_KEY, auth, unique_site


async def test_gateway_process_serves_and_stops_on_sigterm(mosquitto, tmp_path: Path) -> None:
    site, port = unique_site(), find_free_port()
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f"""
[gateway]
site = "{site}"
line = "line-a"
id = "gw-{site}"
data_dir = "{tmp_path / 'data'}"
[mqtt]
host = "{mosquitto[0]}"
port = {mosquitto[1]}
[http]
host = "127.0.0.1"
port = 1
[auth]
api_keys = [{{ key = "{ADMIN_KEY}", role = "admin" }}]
[ingest]
auto_register = true
""")
    # systemd's notify socket, as a unit with Type=notify and WatchdogSec= would provide it
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.setblocking(False)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "200000"}
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("egiz")), "gateway", "run", "--config", str(cfg),
        "--http-port", str(port), stderr=asyncio.subprocess.PIPE, env=env)
    url = f"http://127.0.0.1:{port}"
    notes: list[str] = []

    def received() -> list[str]:
        with contextlib.suppress(BlockingIOError):
            while True:
                notes.append(notify.recv(256).decode())
        return notes

    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 15
            while True:
                try:
                    async with http.get(url + "/ready") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "gateway never became ready"
                await asyncio.sleep(0.05)
            async with aiomqtt.Client(*mosquitto) as client:
                await client.publish(f"openegiz/{site}/oven/oven-001/thermal/telemetry", json.dumps(
                    {"ts": time.time(), "seq": 1, "boot": "b", "properties": {"setpoint": 185.0}}), qos=1)
            for _ in range(100):
                async with http.get(f"{url}/api/v1/things/{site}:oven-001", headers=auth()) as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.05)
            assert r.status == 200
            await asyncio.sleep(0.5)
            assert received()[0] == "READY=1", notes
            assert received().count("WATCHDOG=1") >= 3, notes  # every 0.1 s, half the watchdog period
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        received()
        notify.close()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "STOPPING=1" in notes
    lines = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    assert [x["msg"] for x in lines][-1] == "gateway stopped"  # structured logs, graceful end
    assert ADMIN_KEY not in err.decode()  # no secrets in logs
    assert (tmp_path / "data" / "registry.sqlite").exists()


async def test_port_in_use_is_one_line_and_exit_1(mosquitto, tmp_path: Path) -> None:
    with __import__("socket").socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = tmp_path / "gateway.toml"
        cfg.write_text(f"""
[gateway]
site = "s1"
line = "l1"
id = "g1"
data_dir = "{tmp_path / 'data'}"
[http]
host = "127.0.0.1"
port = {port}
[auth]
open = true
""")
        proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).with_name("egiz")), "gateway", "run", "--config", str(cfg),
            stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 1
    assert "egiz: cannot start the gateway" in err.decode()
    assert "Traceback" not in err.decode()
