"""An outside fuzzer against both OpenAPI documents: schemathesis, as a user runs it, against a real
`egiz gateway run` and a real `egiz aggregator run`, with a key of each role (and, on the aggregator,
a gateway token): no 5xx, every status documented, every body matching its schema.

The run is bounded and reproducible: a fixed number of examples per operation and a fixed seed with
deterministic generation, so CI time is flat and a failure replays.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.broker import find_free_port
from tests.helpers import (
    ADMIN_KEY,
    BROKER_PORT,
    OPERATOR_KEY,
    TOKEN,
    VIEWER_KEY,
    egiz_process,
    gateway_process,
    need,
    need_service,
    write_toml,
)

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
EXAMPLES = 5
SEED = 20261207
KEYS = {"admin": ADMIN_KEY, "operator": OPERATOR_KEY, "viewer": VIEWER_KEY}
# The WebSocket upgrade is not HTTP request/response; the viewer's redirect and files are static.
EXCLUDE = r"^/api/v1/ws$|^/viewer/|^/$"
# Three or four fuzzer processes at once take one to two minutes on two idle cores; a busy machine more.
pytestmark = pytest.mark.timeout(900)


async def fuzz(url: str, key: str, workdir: Path) -> str:
    """One schemathesis run against `url`'s OpenAPI document with Bearer `key` (its cache in `workdir`);
    its report."""
    need(SCHEMATHESIS.exists(), "needs schemathesis: pip install -e '.[dev]'")
    proc = await asyncio.create_subprocess_exec(
        str(SCHEMATHESIS), "run", f"{url}/api/v1/openapi.json", "--checks", CHECKS, "--header",
        f"Authorization: Bearer {key}", "--max-examples", str(EXAMPLES), "--seed", str(SEED),
        "--generation-deterministic", "--exclude-path-regex", EXCLUDE, "--phases", "examples,fuzzing",
        "--workers", "1", "--no-color", cwd=workdir, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 840)
    report = out.decode(errors="replace")
    assert proc.returncode == 0, report[-6000:]
    return report


def summary(report: str) -> str:
    """The run's closing figures: operations tested and test cases (generated, passed, failed)."""
    tested = re.findall(r"Tested: (\d+)", report)
    cases = re.findall(r"(\d+ generated[^\n]*)", report)
    return f"operations {tested[-1] if tested else '?'}, cases {cases[-1].strip() if cases else '?'}"


@pytest.fixture
async def gateway_url(tmp_path: Path) -> AsyncIterator[str]:
    need_service("127.0.0.1", BROKER_PORT, "Mosquitto", "apt-get install mosquitto")
    gw = gateway_process(tmp_path, BROKER_PORT, auth={"api_keys": [
        {"key": k, "role": role} for role, k in KEYS.items()]})
    async with gw.run():
        yield gw.url


@pytest.fixture
async def aggregator_url(tmp_path: Path) -> AsyncIterator[str]:
    port = find_free_port()
    config = write_toml(tmp_path / "aggregator.toml", {
        "aggregator": {"data_dir": tmp_path / "aggregator"},
        "http": {"host": "127.0.0.1", "port": port},
        "auth": {"api_keys": [{"key": k, "role": role} for role, k in KEYS.items()],
                 "gateway_tokens": [{"gateway": "gw-1", "token": TOKEN, "site": "site-1", "line": "line-1"}]},
        "log": {"format": "json", "level": "error"},
    })
    url = f"http://127.0.0.1:{port}"
    async with egiz_process("aggregator", "run", "--config", str(config), url=url, log=tmp_path / "agg.log",
                            what="aggregator"):
        yield url


async def test_the_gateway_api_survives_the_fuzzer_with_every_role(gateway_url: str, tmp_path: Path) -> None:
    reports = await asyncio.gather(*(fuzz(gateway_url, key, tmp_path) for key in KEYS.values()))
    for role, report in zip(KEYS, reports, strict=True):
        print(f"gateway/{role}: {summary(report)}")


async def test_the_aggregator_api_survives_the_fuzzer_with_every_role_and_a_gateway_token(
        aggregator_url: str, tmp_path: Path) -> None:
    keys = {**KEYS, "gateway": TOKEN}
    reports = await asyncio.gather(*(fuzz(aggregator_url, key, tmp_path) for key in keys.values()))
    for role, report in zip(keys, reports, strict=True):
        print(f"aggregator/{role}: {summary(report)}")
