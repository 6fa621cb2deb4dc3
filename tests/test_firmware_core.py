"""The node firmware's host-tested core (firmware/core): configured with CMake, built with warnings as
errors under AddressSanitizer and UndefinedBehaviorSanitizer, and run with CTest (the suite includes
the check that the committed golden vectors equal what the encoder writes now); built once more
optimised without the sanitizers, where the compiler warns about other things. Then the same build
answers real commands from a real gateway over a real broker: the contract of `cmd` and `cmd/ack`
holds in both directions."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import OPERATOR_KEY, GatewayFactory, wait_for

FIRMWARE = Path(__file__).resolve().parent.parent / "firmware"


def run(*args: str, timeout: float = 240, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, input=stdin, check=False)


def need_toolchain() -> None:
    missing = [tool for tool in ("cmake", "ctest") if shutil.which(tool) is None]
    if shutil.which("c++") is None and shutil.which("g++") is None:
        missing.append("a C++ compiler")
    if missing:
        message = f"needs {', '.join(missing)} to build the firmware core: apt-get install cmake g++"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def core_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The core and its tests built once for this module, in a fresh directory."""
    need_toolchain()
    build = tmp_path_factory.mktemp("firmware-core")
    for step in (("cmake", "-S", str(FIRMWARE), "-B", str(build), "-DCMAKE_BUILD_TYPE=Debug"),
                 ("cmake", "--build", str(build), "--parallel", str(min(4, os.cpu_count() or 1)))):
        r = run(*step)
        assert r.returncode == 0, f"{' '.join(step)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return build


@pytest.mark.timeout(300)
def test_the_core_builds_and_its_ctest_suite_passes(core_build: Path) -> None:
    r = run("ctest", "--test-dir", str(core_build), "--output-on-failure", "--parallel", "2")
    assert r.returncode == 0, f"{r.stdout[-6000:]}\n{r.stderr[-2000:]}"
    summary = re.search(r"(\d+)% tests passed, (\d+) tests failed out of (\d+)", r.stdout)
    assert summary is not None, r.stdout
    assert summary.group(1) == "100" and summary.group(2) == "0"
    assert "golden_vectors" in r.stdout
    # Every suite compiled into the tests is registered with CTest (a new one cannot be forgotten).
    suites = run(str(core_build / "core_tests"), "--list").stdout.split()
    assert len(suites) >= 25
    registered = set(re.findall(r"Test +#\d+: (\S+)", r.stdout))
    assert set(suites) <= registered, f"not in firmware/CMakeLists.txt: {sorted(set(suites) - registered)}"


def test_numbers_on_the_wire_do_not_depend_on_the_c_locale(core_build: Path, tmp_path: Path) -> None:
    """Under a decimal-comma locale the node still writes and reads `229.87`, never `229,87`."""
    if shutil.which("localedef") is None:
        pytest.skip("needs localedef to make a decimal-comma locale: apt-get install locales")
    r = run("localedef", "-i", "de_DE", "-f", "UTF-8", str(tmp_path / "de_DE.UTF-8"), timeout=60)
    if not (tmp_path / "de_DE.UTF-8").exists():
        pytest.skip(f"localedef could not build de_DE.UTF-8: {r.stderr[-500:]}")
    r = subprocess.run([str(core_build / "core_tests"), "json_locale"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "LOCPATH": str(tmp_path)}, check=False)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    assert "checked under de_DE" in r.stdout, r.stdout  # the comma locale was really in force


@pytest.mark.timeout(300)
def test_the_core_compiles_without_warnings_when_optimised(tmp_path: Path) -> None:
    """Without the sanitizers' instrumentation the optimiser finds other things (values maybe used
    uninitialised): the code that goes onto the device must pass that too."""
    need_toolchain()
    for step in (("cmake", "-S", str(FIRMWARE), "-B", str(tmp_path), "-DCMAKE_BUILD_TYPE=Release",
                  "-DEGIZ_SANITIZE=OFF"),
                 ("cmake", "--build", str(tmp_path), "--target", "egiz_core", "--parallel", "2")):
        r = run(*step)
        assert r.returncode == 0, f"{' '.join(step)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"


@pytest.mark.timeout(300)
async def test_the_core_answers_a_real_gateways_commands(core_build: Path, mosquitto: tuple[str, int],
                                                         start_gateway: GatewayFactory) -> None:
    import aiomqtt

    gw = await start_gateway(mosquitto)
    tid = gw.thing_id("oven-001")
    status, body = await gw.send("POST", "/api/v1/things", {"id": tid, "type": "oven"})
    assert status in (200, 201), body
    base = f"openegiz/{gw.site}/oven/oven-001"

    async def thing() -> dict[str, Any]:
        doc: dict[str, Any] = (await gw.get(f"/api/v1/things/{tid}"))[1]
        return doc

    async def command(feature: str, desired: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Write desired properties through the API; the node core answers what the broker delivers."""
        async with aiomqtt.Client(*mosquitto, identifier=f"node-{gw.site}") as node:
            await node.subscribe(base + "/cmd", qos=1)
            status, body = await gw.send("PUT", f"/api/v1/things/{tid}/features/{feature}",
                                         {"desiredProperties": desired}, key=OPERATOR_KEY)
            assert status == 200, body
            async with asyncio.timeout(5):
                async for msg in node.messages:
                    assert isinstance(msg.payload, bytes | bytearray)
                    payload = bytes(msg.payload)
                    break
            r = await asyncio.to_thread(run, str(core_build / "core_tests"), "answer", "oven",
                                        stdin=payload.decode(), timeout=30)
            assert r.returncode == 0, f"the node did not answer {payload!r}: {r.stderr}"
            ack = r.stdout.strip()
            await node.publish(base + "/cmd/ack", ack, qos=1)
        cmd_id = body["command"]["cmdId"]
        assert json.loads(ack)["cmdId"] == cmd_id

        def answered() -> bool:
            t = gw.service.registry.get(tid)
            done = t.features.get("commands") if t is not None else None
            return done is not None and done.properties["last"]["cmdId"] == cmd_id

        await wait_for(answered, timeout=5)
        return ack, await thing()

    ack, doc = await command("thermal", {"setpoint": 215.5})
    assert json.loads(ack) == {"cmdId": json.loads(ack)["cmdId"], "status": "ok", "properties": {"setpoint": 215.5}}
    assert doc["features"]["thermal"] == {"properties": {"setpoint": 215.5}}  # reported, nothing left desired

    ack, doc = await command("sampling", {"rate_hz": 3})
    assert json.loads(ack)["properties"] == {"rate_hz": 3.003003}  # the rate in effect (333 ms)
    assert doc["features"]["sampling"] == {"properties": {"rate_hz": 3.003003}}

    ack, doc = await command("thermal", {"setpoint": 999})
    assert json.loads(ack)["status"] == "rejected"
    assert doc["features"]["thermal"]["desiredProperties"] == {"setpoint": 999}  # still wanted, not done
    assert doc["features"]["thermal"]["properties"] == {"setpoint": 215.5}
    last = doc["features"]["commands"]["properties"]["last"]
    assert last["status"] == "rejected" and "50..300" in last["detail"]

    ack, doc = await command("thermal", {"setpoint": None})  # clearing the desired value: back to the default
    assert json.loads(ack)["properties"] == {"setpoint": 190}
    assert doc["features"]["thermal"]["properties"] == {"setpoint": 190}
    assert gw.service.dead_letters.total == 0
