"""`egiz` as a real process: where it is, and waiting until it answers `/ready`."""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

_BESIDE = Path(sys.executable).with_name("egiz")
# The venv's own `egiz` (the one the tests import), else the one on PATH.
EGIZ = str(_BESIDE) if _BESIDE.exists() else shutil.which("egiz") or "egiz"


async def wait_ready(url: str, what: str = "gateway", *, proc: asyncio.subprocess.Process | None = None,
                     log: Path | None = None, timeout: float = 30.0, interval: float = 0.05) -> None:
    """Poll `url`/ready until it answers 200; fail when `proc` exits first or `timeout` passes."""
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + timeout
        while True:
            if proc is not None and proc.returncode is not None:
                raise AssertionError(f"the {what} exited with {proc.returncode}" + (f"; see {log}" if log else ""))
            try:
                async with http.get(url + "/ready") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, f"the {what} did not become ready"
            await asyncio.sleep(interval)


@asynccontextmanager
async def egiz_process(*args: str, url: str, log: Path, what: str = "gateway", timeout: float = 60.0,
                       **spawn: Any) -> AsyncIterator[asyncio.subprocess.Process]:
    """`egiz *args` with its output appended to `log`, yielded once `url` is ready; killed if still running
    at the end. The default timeout is generous: a loaded machine drains a backlog while starting."""
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(EGIZ, *args, stdout=out, stderr=out, **spawn)
    try:
        await wait_ready(url, what, proc=proc, log=log, timeout=timeout)
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
